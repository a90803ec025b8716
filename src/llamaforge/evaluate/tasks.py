"""The eval set: examples with a prompt (chat messages) and one reference answer each.

A task file is alpaca-style (instruction/input/output: output = reference), chat messages (the last
assistant turn is the reference, the turns before it the prompt), or any table read through a
column mapping (`columns: {prompt_template: "Summarize in one sentence:\\n{document}", reference: summary}`).
A BIG-bench task.json (`{"examples": [{"input", "target"}]}`) reads through a column mapping too.
A task may hold out part of a file (`holdout: 250`) so that the rest can be written out for training
(`llamaforge eval job.yaml --write-train train.jsonl`): the two parts never overlap.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaforge.data.types import Conversation, Message, Rejected
from llamaforge.errors import ConfigError, DataError
from llamaforge.evaluate.config import PLACEHOLDER, ColumnMapping, TaskConfig  # noqa: F401 - ColumnMapping re-exported


@dataclass
class TaskExample:
    prompt: list[Message]  # ends with the user turn the model answers
    reference: str
    source: str = ""
    line: int | None = None

    def conversation(self) -> Conversation:
        """Prompt + reference as the assistant turn: what loss/perplexity are measured on."""
        return Conversation([*self.prompt, Message("assistant", self.reference)], self.source, self.line)

    def prompt_record(self) -> str | list[dict[str, str]]:
        """The prompt as saved per example: its text, or all turns when there is more than one."""
        if len(self.prompt) == 1:
            return self.prompt[0].content
        return [{"role": m.role, "content": m.content} for m in self.prompt]


@dataclass
class Task:
    examples: list[TaskExample]
    path: str
    skipped_long: int = 0
    total_records: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def references(self) -> list[str]:
        return [e.reference for e in self.examples]


# ---------------------------------------------------------------- reading


def task_path(cfg: TaskConfig) -> Path:
    if not cfg.path:
        raise ConfigError("no eval task: set evaluation.task.path or pass --task FILE")
    from llamaforge import catalog

    entry = catalog.CATALOG.get(cfg.path)
    if entry is not None and entry.kind == "dataset":
        return catalog.resolve(cfg.path)
    return Path(cfg.path).expanduser()


def _missing_references(path: Path, rejected: list[tuple[int | None, str | None, str]]) -> DataError:
    line, fld, reason = rejected[0]
    more = f" (and {len(rejected) - 1} more)" if len(rejected) > 1 else ""
    return DataError(
        f"{len(rejected)} task record(s) have no usable prompt or reference{more}; every example needs a "
        f"non-empty reference. First: {reason}",
        path=str(path),
        line=line,
        field=fld,
    )


def _from_conversation(conv: Conversation, path: Path) -> TaskExample:
    messages = conv.messages
    if conv.raw_text or len(messages) < 2 or messages[-1].role != "assistant":
        raise DataError(
            "a task record needs a prompt and a final assistant turn (the reference)",
            path=str(path),
            line=conv.line,
            field="messages",
        )
    return TaskExample(list(messages[:-1]), messages[-1].content, str(path), conv.line)


def _read_records(path: Path, cfg: TaskConfig) -> list[TaskExample]:
    from llamaforge.data.formats import read_source

    examples, rejected = [], []
    for item in read_source(path, cfg.format):
        if isinstance(item, Rejected):
            rejected.append((item.line, item.field, item.reason))
            continue
        examples.append(_from_conversation(item, path))
    if rejected:
        raise _missing_references(path, rejected)
    return examples


def _raw_rows(path: Path) -> list[tuple[int | None, Any]]:
    """Rows of a table; a BIG-bench task.json (an object with an 'examples' list) gives its examples."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read JSON: {exc}", path=str(path)) from exc
        if isinstance(data, dict) and isinstance(data.get("examples"), list):
            return [(None, row) for row in data["examples"]]
    from llamaforge.data.readers import read_items

    rows = []
    for item in read_items(path):
        if item.reason:
            raise DataError(item.reason, path=str(path), line=item.line, field=item.field)
        rows.append((item.line, item.record))
    return rows


def _cell(row: dict, column: str, path: Path, line: int | None) -> str:
    if column not in row:
        raise DataError(
            f"column '{column}' is missing (columns here: {', '.join(map(str, row))})",
            path=str(path),
            line=line,
            field=column,
        )
    value = row[column]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]  # BIG-bench targets may be a list of acceptable answers: the first is the reference
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return value if isinstance(value, str) else str(value)


def _read_columns(path: Path, cfg: TaskConfig) -> list[TaskExample]:
    cols = cfg.columns
    assert cols is not None
    examples, rejected = [], []
    for line, row in _raw_rows(path):
        if not isinstance(row, dict):
            raise DataError(
                f"a record must be an object with columns, got {type(row).__name__}",
                path=str(path),
                line=line,
            )
        if cols.prompt_template is not None:
            prompt = PLACEHOLDER.sub(
                lambda m, r=row, n=line: _cell(r, m.group(1), path, n), cols.prompt_template
            )
        else:
            prompt = _cell(row, cols.prompt, path, line)
        reference = _cell(row, cols.reference, path, line)
        if not reference.strip():
            rejected.append(
                (line, cols.reference, f"reference column '{cols.reference}' is empty or missing")
            )
            continue
        if not prompt.strip():
            rejected.append((line, cols.prompt or "prompt_template", "the prompt is empty"))
            continue
        system = _cell(row, cols.system, path, line) if cols.system else ""
        messages = ([Message("system", system)] if system.strip() else []) + [Message("user", prompt)]
        examples.append(TaskExample(messages, reference, str(path), line))
    if rejected:
        raise _missing_references(path, rejected)
    return examples


def read_task_records(cfg: TaskConfig) -> list[TaskExample]:
    """Every record of the task file as an example (no split, no limit). DataError on bad records."""
    path = task_path(cfg)
    examples = _read_columns(path, cfg) if cfg.columns else _read_records(path, cfg)
    if not examples:
        raise DataError("the task file has no records", path=str(path))
    if cfg.system_prompt:
        for ex in examples:
            if ex.prompt[0].role != "system":
                ex.prompt.insert(0, Message("system", cfg.system_prompt))
    return examples


def split_indices(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(held-out, rest) record indices, both in file order; a seeded shuffle picks the held-out ones."""
    if not holdout:
        return list(range(n)), []
    count = int(holdout) if holdout >= 1 else round(n * holdout)
    if not 0 < count < n:
        raise ConfigError(f"holdout={holdout} leaves {count} of {n} records for evaluation: nothing to split")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:count]), sorted(order[count:])


def load_task(cfg: TaskConfig) -> Task:
    """The examples to evaluate: the held-out part (or all), long prompts skipped, then the limit."""
    records = read_task_records(cfg)
    held, _ = split_indices(len(records), cfg.holdout, cfg.split_seed)
    examples = [records[i] for i in held]
    skipped = 0
    if cfg.max_prompt_chars:
        kept = [e for e in examples if sum(len(m.content) for m in e.prompt) <= cfg.max_prompt_chars]
        skipped = len(examples) - len(kept)
        examples = kept
    if cfg.limit:
        examples = examples[: cfg.limit]
    if not examples:
        raise DataError(
            "no examples left to evaluate (check holdout, max_prompt_chars and limit)",
            path=str(task_path(cfg)),
        )
    notes = (
        [f"{skipped} held-out example(s) skipped: prompt over {cfg.max_prompt_chars} characters"]
        if skipped
        else []
    )
    return Task(examples, str(task_path(cfg)), skipped, len(records), notes)


def write_train_split(cfg: TaskConfig, out: str | Path) -> tuple[Path, int]:
    """Write the records NOT held out as alpaca jsonl (prompt -> instruction, reference -> output), for
    `llamaforge train`: training then sees exactly the prompts evaluation uses, and no held-out record."""
    if not cfg.holdout:
        raise ConfigError(
            "--write-train needs evaluation.task.holdout > 0: otherwise every record is an eval record"
        )
    records = read_task_records(cfg)
    _, rest = split_indices(len(records), cfg.holdout, cfg.split_seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for i in rest:
            ex = records[i]
            if len(ex.prompt) > 2 or ex.prompt[-1].role != "user":
                raise DataError("--write-train writes single-turn records only", path=ex.source, line=ex.line)
            row = {"instruction": ex.prompt[-1].content, "input": "", "output": ex.reference}
            if ex.prompt[0].role == "system":
                row["system"] = ex.prompt[0].content
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out, len(rest)
