"""The `--fail-if` rule language: `quantized.rougeL < merged.rougeL - 1` (a rule that holds fails the gate).

Its own module so that the config (which checks rules as it loads) and the comparison table (which
evaluates them) both build on it without importing each other.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from llamaforge.errors import LlamaforgeError

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # a candidate's name


class Table(Protocol):
    """What rules read: a candidate's point estimate of a metric (compare.Comparison is one)."""

    def value(self, candidate: str, metric: str) -> float: ...


class RuleError(LlamaforgeError, ValueError):
    """A --fail-if rule that does not parse (a ValueError too, so config validation reports it)."""


_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<ref>[A-Za-z_]\w*\.[A-Za-z_]\w*)"
    r"|(?P<op><=|>=|<|>)|(?P<sign>[+-]))"
)
_OPS = {"<": operator.lt, ">": operator.gt, "<=": operator.le, ">=": operator.ge}


@dataclass(frozen=True)
class Rule:
    """`lhs OP rhs`, each side a signed sum of numbers and candidate.metric references."""

    text: str
    lhs: tuple[tuple[float, str | float], ...]  # (sign, 'cand.metric' or a number)
    op: str
    rhs: tuple[tuple[float, str | float], ...]

    def references(self) -> list[tuple[str, str]]:
        """The (candidate, metric) pairs the rule reads."""
        return [tuple(t.split(".", 1)) for _, t in (*self.lhs, *self.rhs) if isinstance(t, str)]

    def sides(self, lookup) -> tuple[float, float]:
        def total(terms):
            return sum(s * (lookup(*t.split(".", 1)) if isinstance(t, str) else t) for s, t in terms)

        return total(self.lhs), total(self.rhs)


def parse_rule(text: str) -> Rule:
    """Parse 'quantized.rougeL < merged.rougeL - 1' (ops < > <= >=; terms: numbers, candidate.metric)."""
    pos, tokens = 0, []
    stripped = text.rstrip()
    while pos < len(stripped):
        m = _TOKEN.match(stripped, pos)
        if not m:
            raise RuleError(
                f"fail_if rule '{text}': cannot read '{stripped[pos:].strip()}' (column {pos + 1}); "
                "write e.g. 'quantized.rougeL < merged.rougeL - 1'"
            )
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    ops = [i for i, (kind, _) in enumerate(tokens) if kind == "op"]
    if len(ops) != 1:
        raise RuleError(
            f"fail_if rule '{text}': needs exactly one comparison (<, >, <=, >=), found {len(ops)}"
        )
    return Rule(
        text.strip(),
        _parse_side(tokens[: ops[0]], text),
        tokens[ops[0]][1],
        _parse_side(tokens[ops[0] + 1 :], text),
    )


def _parse_side(tokens: list[tuple[str, str]], text: str) -> tuple[tuple[float, str | float], ...]:
    terms: list[tuple[float, str | float]] = []
    sign, need_term = 1.0, True
    for kind, value in tokens:
        if kind == "sign":
            if need_term:  # unary: '- 1', '--1'
                sign *= -1.0 if value == "-" else 1.0
            else:  # binary: 'a - 1'
                sign, need_term = (-1.0 if value == "-" else 1.0), True
            continue
        if not need_term:
            raise RuleError(f"fail_if rule '{text}': '{value}' follows another term without + or -")
        terms.append((sign, float(value) if kind == "num" else value))
        sign, need_term = 1.0, False
    if need_term:
        raise RuleError(f"fail_if rule '{text}': a side of the comparison is empty or ends with + or -")
    return tuple(terms)


@dataclass
class RuleResult:
    rule: str
    lhs: float
    rhs: float
    failed: bool  # the rule's condition holds, so the gate fails

    def describe(self) -> str:
        verdict = "FAILED" if self.failed else "ok"
        return f"{verdict}: {self.rule}  ({self.lhs:.4g} vs {self.rhs:.4g})"


def evaluate_rules(rules: Sequence[str | Rule], table: Table) -> list[RuleResult]:
    """Every rule with its two sides on the table's point estimates; `failed` where the condition holds."""
    results = []
    for rule in rules:
        rule = parse_rule(rule) if isinstance(rule, str) else rule
        lhs, rhs = rule.sides(table.value)
        results.append(RuleResult(rule.text, lhs, rhs, bool(_OPS[rule.op](lhs, rhs))))
    return results


def failed_rules(rules: Sequence[str | Rule], table: Table) -> list[RuleResult]:
    return [r for r in evaluate_rules(rules, table) if r.failed]
