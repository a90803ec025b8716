"""Side by side: several candidates on the same examples, one table, paired bootstrap intervals, a gate.

`compare({"base": scores_a, "tuned": scores_b})` gives a Comparison: per metric, each candidate's
number with its percentile-bootstrap interval, and its delta against the first candidate with a
*paired* interval (the same resampled examples for every candidate). Render it as text, Markdown,
JSON or a self-contained HTML page, with the `--fail-if` verdicts of rules.py underneath.
"""

from __future__ import annotations

import dataclasses
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llamaforge.errors import LlamaforgeError
from llamaforge.evaluate.rules import NAME, RuleResult
from llamaforge.evaluate.scores import (
    EvalScores,
    MetricScores,
    aggregate,
    from_sums,
    references_fingerprint,
    summable,
)

_CHUNK_CELLS = 4_000_000  # resample rows per chunk x examples, bounds bootstrap memory (~32 MB)


# ---------------------------------------------------------------- the table


@dataclass
class Cell:
    value: float
    ci: tuple[float, float] | None = None
    delta: float | None = None  # vs the first candidate
    delta_ci: tuple[float, float] | None = None

    @property
    def significant(self) -> bool:
        """The paired interval of the delta excludes 0."""
        return self.delta_ci is not None and (self.delta_ci[0] > 0 or self.delta_ci[1] < 0)


@dataclass
class Comparison:
    candidates: list[str]
    metrics: list[str]
    cells: dict[str, dict[str, Cell | None]]  # metric -> candidate -> cell (None: not measured)
    higher_is_better: dict[str, bool]
    num_examples: dict[str, int]  # per metric
    empty_outputs: dict[str, int]  # per candidate
    bootstrap_samples: int
    confidence: float
    seed: int
    info: dict[str, str] = field(default_factory=dict)

    def value(self, candidate: str, metric: str) -> float:
        if candidate not in self.candidates:
            raise LlamaforgeError(
                f"unknown candidate '{candidate}'; candidates: {', '.join(self.candidates)}"
            )
        if metric not in self.cells:
            raise LlamaforgeError(f"unknown metric '{metric}'; metrics: {', '.join(self.metrics)}")
        cell = self.cells[metric][candidate]
        if cell is None:
            raise LlamaforgeError(f"candidate '{candidate}' has no '{metric}' score")
        return cell.value

    @property
    def baseline(self) -> str:
        """The first candidate: deltas are measured against it."""
        return self.candidates[0]

    def to_dict(self) -> dict[str, Any]:
        def cell(c: Cell | None):
            if c is None:
                return None
            return {
                "value": c.value,
                "ci": c.ci,
                "delta": c.delta,
                "delta_ci": c.delta_ci,
                "significant": c.significant if c.delta is not None else None,
            }

        return {
            "candidates": self.candidates,
            "baseline": self.baseline,
            "metrics": {m: {c: cell(self.cells[m][c]) for c in self.candidates} for m in self.metrics},
            "higher_is_better": self.higher_is_better,
            "num_examples": self.num_examples,
            "empty_outputs": self.empty_outputs,
            "bootstrap": {
                "samples": self.bootstrap_samples,
                "confidence": self.confidence,
                "seed": self.seed,
                "method": "paired percentile bootstrap over examples",
            },
            "info": self.info,
        }

    def to_json(self, rules: Sequence[RuleResult] = ()) -> str:
        data = self.to_dict()
        data["gate"] = [r.__dict__ for r in rules]
        return json.dumps(data, indent=2, ensure_ascii=False)

    def to_text(self, rules: Sequence[RuleResult] = ()) -> str:
        return _render_grid(self, rules, markdown=False)

    def to_markdown(self, rules: Sequence[RuleResult] = ()) -> str:
        return _render_grid(self, rules, markdown=True)

    def to_html(self, rules: Sequence[RuleResult] = (), title: str = "llamaforge eval") -> str:
        return _render_html(self, rules, title)


def _bootstrap_weights(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """(rows, n) counts: how often each example is drawn in each resample (n draws with replacement)."""
    idx = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def _bootstrap(
    present: dict[str, dict[str, MetricScores]], counts: dict[str, int], samples: int, seed: int
) -> dict[tuple[str, str], np.ndarray]:
    """(metric, candidate) -> the statistic on each resample. Resamples are seeded by (seed, n), so all
    metrics and candidates measured on the same n examples see the same resamples (paired); they are
    drawn in chunks to bound memory, each chunk applied to every metric before the next is drawn."""
    out: dict[tuple[str, str], list[np.ndarray]] = {}
    if samples <= 0:
        return {}
    for n in sorted(set(counts.values())):
        group = [metric for metric, size in counts.items() if size == n]
        if n == 0:
            continue
        # every (metric, candidate)'s summable columns side by side: one matrix product per chunk
        keys = [(metric, name) for metric in group for name in present[metric]]
        blocks = [summable(present[metric][name]) for metric, name in keys]
        edges = np.cumsum([0] + [b.shape[1] for b in blocks])
        columns = np.concatenate(blocks, axis=1)
        rng = np.random.default_rng([seed, n])
        chunk = max(1, _CHUNK_CELLS // n)
        for start in range(0, samples, chunk):
            rows = min(chunk, samples - start)
            sums = _bootstrap_weights(rng, rows, n) @ columns
            totals = np.full(rows, float(n))  # each resample draws n examples
            for (metric, name), lo, hi in zip(keys, edges[:-1], edges[1:], strict=True):
                out.setdefault((metric, name), []).append(
                    from_sums(present[metric][name], sums[:, lo:hi], totals)
                )
    return {key: np.concatenate(parts) for key, parts in out.items()}


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def compare(
    candidates: Mapping[str, EvalScores | Mapping[str, MetricScores]],
    *,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    metrics: Sequence[str] | None = None,
) -> Comparison:
    """One table for several candidates scored on the same examples (the first is the baseline of the deltas)."""
    if not candidates:
        raise LlamaforgeError("nothing to compare: no candidates")
    names = list(candidates)
    for name in names:
        if not NAME.match(name):
            raise LlamaforgeError(
                f"candidate name '{name}' must be letters, digits and _ (it is used in --fail-if rules)"
            )
    per_cand = {n: (c.metrics if isinstance(c, EvalScores) else dict(c)) for n, c in candidates.items()}
    prints = {
        n: c.references_sha256
        for n, c in candidates.items()
        if isinstance(c, EvalScores) and c.references_sha256
    }
    if len(set(prints.values())) > 1:
        raise LlamaforgeError(
            "candidates were scored on different examples (reference fingerprints differ: "
            + ", ".join(f"{n} {p[:8]}" for n, p in prints.items())
            + ")"
        )
    order = list(metrics) if metrics else list(dict.fromkeys(m for n in names for m in per_cand[n]))
    present: dict[str, dict[str, MetricScores]] = {}
    counts: dict[str, int] = {}
    for metric in order:
        present[metric] = {n: per_cand[n][metric] for n in names if metric in per_cand[n]}
        if not present[metric]:
            raise LlamaforgeError(f"no candidate has metric '{metric}'")
        sizes = {n: len(m) for n, m in present[metric].items()}
        if len(set(sizes.values())) > 1:
            raise LlamaforgeError(f"metric '{metric}' was measured on different numbers of examples: {sizes}")
        counts[metric] = next(iter(sizes.values()))
    boot = _bootstrap(present, counts, bootstrap_samples, seed)
    first = names[0]
    cells: dict[str, dict[str, Cell | None]] = {}
    for metric in order:
        row: dict[str, Cell | None] = {n: None for n in names}
        for n, m in present[metric].items():
            b = boot.get((metric, n))
            row[n] = cell = Cell(
                float(aggregate(m, None)[0]), _interval(b, confidence) if b is not None else None
            )
            if n != first and row[first] is not None:
                cell.delta = cell.value - row[first].value
                if b is not None:
                    cell.delta_ci = _interval(b - boot[(metric, first)], confidence)
        cells[metric] = row
    higher = {metric: next(iter(present[metric].values())).higher_is_better for metric in order}
    empty = {n: len(c.empty_outputs) for n, c in candidates.items() if isinstance(c, EvalScores)}
    info = {}
    for c in candidates.values():
        if isinstance(c, EvalScores):
            info.update(c.info)
    return Comparison(names, order, cells, higher, counts, empty, bootstrap_samples, confidence, seed, info)


# ---------------------------------------------------------------- rendering


def _fmt(metric: str, value: float, signed: bool = False) -> str:
    digits = 4 if metric == "loss" else 2
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _ci(metric: str, ci: tuple[float, float] | None, signed: bool = False) -> str:
    return f"[{_fmt(metric, ci[0], signed)}, {_fmt(metric, ci[1], signed)}]" if ci else ""


def _label(table: Comparison, metric: str) -> str:
    return metric if table.higher_is_better[metric] else f"{metric} (lower is better)"


def _cell_text(table: Comparison, metric: str, name: str) -> str:
    cell = table.cells[metric][name]
    if cell is None:
        return "-"
    if cell.delta is None:
        return f"{_fmt(metric, cell.value)} {_ci(metric, cell.ci)}".strip()
    mark = "*" if cell.significant else ""
    return f"{_fmt(metric, cell.value)}  {_fmt(metric, cell.delta, True)} {_ci(metric, cell.delta_ci, True)}{mark}".rstrip()


def _footer(table: Comparison, rules: Sequence[RuleResult]) -> list[str]:
    pct = round(table.confidence * 100)
    lines = [f"examples: {', '.join(sorted({str(v) for v in table.num_examples.values()}))}"]
    if table.empty_outputs:
        lines.append("empty outputs: " + ", ".join(f"{n} {k}" for n, k in table.empty_outputs.items()))
    if table.bootstrap_samples:
        lines.append(
            f"{table.baseline}: value [{pct}% CI]; others: value, delta vs {table.baseline} [{pct}% paired CI]; "
            f"* = interval excludes 0 ({table.bootstrap_samples} paired bootstrap resamples, seed {table.seed})"
        )
    for key, value in table.info.items():
        lines.append(f"{key}: {value}")
    lines += [r.describe() for r in rules]
    return lines


def _render_grid(table: Comparison, rules: Sequence[RuleResult], *, markdown: bool) -> str:
    pct = round(table.confidence * 100)
    head = ["metric", *table.candidates]
    sub = ["", f"value [{pct}% CI]" if table.bootstrap_samples else "value"]
    sub += [f"value  Δ vs {table.baseline}" + (f" [{pct}% CI]" if table.bootstrap_samples else "")] * (
        len(head) - 2
    )
    rows = [[_label(table, m), *(_cell_text(table, m, n) for n in table.candidates)] for m in table.metrics]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out + [""] + [f"- {line}" for line in _footer(table, rules)]) + "\n"
    grid = [head, sub, *rows]
    widths = [max(len(r[i]) for r in grid) for i in range(len(head))]

    def line(r):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()

    sep = "-" * max(len(line(r)) for r in grid)
    return "\n".join([line(head), line(sub), sep, *map(line, rows), sep, *_footer(table, rules)]) + "\n"


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#1d1d1f}
table{border-collapse:collapse}th,td{padding:.45rem .8rem;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}thead th{border-bottom:2px solid #444}
.v{font-weight:600}.ci{color:#666;font-size:12px;display:block}.d{display:block}
.better{color:#0a7d2c}.worse{color:#b3261e}.fail{color:#b3261e;font-weight:600}.ok{color:#0a7d2c}
footer{margin-top:1rem;color:#555;font-size:12px}
"""


def _render_html(table: Comparison, rules: Sequence[RuleResult], title: str) -> str:
    esc = html.escape
    pct = round(table.confidence * 100)
    head = "".join(f"<th>{esc(n)}</th>" for n in table.candidates)
    body = []
    for m in table.metrics:
        tds = []
        for n in table.candidates:
            c = table.cells[m][n]
            if c is None:
                tds.append("<td>-</td>")
                continue
            parts = [f'<span class="v">{_fmt(m, c.value)}</span>']
            if c.delta is not None:
                cls = ""
                if c.significant:
                    cls = "better" if (c.delta > 0) == table.higher_is_better[m] else "worse"
                parts.append(f'<span class="d {cls}">Δ {_fmt(m, c.delta, True)}</span>')
                if c.delta_ci:
                    parts.append(f'<span class="ci">{pct}% CI {_ci(m, c.delta_ci, True)}</span>')
            elif c.ci:
                parts.append(f'<span class="ci">{pct}% CI {_ci(m, c.ci)}</span>')
            tds.append(f"<td>{''.join(parts)}</td>")
        body.append(f"<tr><td>{esc(_label(table, m))}</td>{''.join(tds)}</tr>")
    gate = "".join(f'<li class="{"fail" if r.failed else "ok"}">{esc(r.describe())}</li>' for r in rules)
    notes = "".join(f"<li>{esc(line)}</li>" for line in _footer(table, ()))
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>"
        f"<table><thead><tr><th>metric</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        + (f"<h2>Gate</h2><ul>{gate}</ul>" if rules else "")
        + f"<footer><ul>{notes}</ul></footer></body></html>\n"
    )


# ---------------------------------------------------------------- per-example results


_KINDS = {"bleu": "bleu", "loss": "loss", "perplexity": "perplexity"}


def _jsonable(obj: Any) -> Any:
    """Prompts may be Message / Conversation dataclasses."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)


def write_examples_jsonl(
    path: str | Path,
    scores: EvalScores,
    outputs: Sequence[str],
    references: Sequence[str],
    prompts: Sequence[Any] | None = None,
) -> Path:
    """One line per example: index, prompt, reference, output, empty, scores (+ stats for corpus metrics)."""
    n = scores.num_examples
    if len(outputs) != n or len(references) != n or (prompts is not None and len(prompts) != n):
        raise LlamaforgeError(
            f"per-example results: {n} scored examples but {len(outputs)} outputs, "
            f"{len(references)} references, {len(prompts) if prompts is not None else '-'} prompts"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = set(scores.empty_outputs)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            record: dict[str, Any] = {
                "index": i,
                "prompt": prompts[i] if prompts is not None else None,
                "reference": references[i],
                "output": outputs[i],
                "empty": i in empty,
                "scores": scores.per_example(i),
            }
            stats = {
                k: m.stats[i].tolist()
                for k, m in scores.metrics.items()
                if m.stats is not None and len(m) == n
            }
            if stats:
                record["stats"] = stats
            f.write(json.dumps(record, ensure_ascii=False, default=_jsonable) + "\n")
    return path


def read_examples_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], EvalScores]:
    """The records and the EvalScores rebuilt from them (so a table can be recomputed from files)."""
    path = Path(path)
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise LlamaforgeError(f"{path}: cannot read per-example results: {exc}") from exc
    if not records:
        raise LlamaforgeError(f"{path}: no per-example results")
    names = list(records[0]["scores"])
    metrics = {}
    for name in names:
        values = [r["scores"][name] for r in records]
        kind = _KINDS.get(name, "mean")
        stats = [r["stats"][name] for r in records] if kind != "mean" else None
        metrics[name] = MetricScores(name, values, kind, stats)
    refs = [r["reference"] for r in records]
    empty = [r["index"] for r in records if r.get("empty")]
    return records, EvalScores(metrics, len(records), empty, references_fingerprint(refs))
