"""Roughly how many tokens a job trains on, without a tokenizer: characters / 4 (+ template tokens).

English prose runs at ~4 characters per token with the Llama 3 and SmolLM2 tokenizers; chat
templates add ~10 tokens per record. `llamaforge plan --tokens N` overrides the estimate.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from llamaforge import catalog
from llamaforge.schema import DataSource

CHARS_PER_TOKEN = 4.0
TEMPLATE_TOKENS = 10


def _strings(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_strings(v) for v in value.values())
    if isinstance(value, list):
        return sum(_strings(v) for v in value)
    return 0


def _records(path: Path) -> list[int]:
    """Characters per record of a .json / .jsonl / .csv / .txt file."""
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix == ".json":
        data = json.loads(text)
        data = data if isinstance(data, list) else [data]
        return [_strings(r) for r in data]
    if suffix == ".jsonl":
        return [_strings(json.loads(line)) for line in text.splitlines() if line.strip()]
    if suffix == ".csv":
        return [_strings(row) for row in csv.DictReader(text.splitlines())]
    return [len(p) for p in text.split("\n\n") if p.strip()]


def _local_file(source: str) -> Path | None:
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if source in catalog.CATALOG and catalog.CATALOG[source].kind == "dataset":
        cached = catalog.entry_dir(source) / Path(catalog.CATALOG[source].member).name
        return cached if cached.is_file() else None  # never download from `plan`
    return None


def job_tokens(config) -> tuple[float | None, str]:
    """(train tokens per epoch, how they were counted), or (None, why not)."""
    total_records, total_tokens = 0, 0.0
    sources, prepared = config.data.sources, config.data.prepared
    if prepared:  # a prepare output: its train split, as train reads it
        sources = [DataSource(path=str(Path(prepared).expanduser() / "train.jsonl"))]
    for source in sources:
        path = _local_file(source.path)
        if path is None:
            return None, f"data source '{source.path}' is not on disk (prepare it, or pass --tokens)"
        try:
            chars = _records(path)
        except (OSError, ValueError) as exc:
            return None, f"could not read {path}: {exc}"
        if source.max_samples:
            chars = chars[: source.max_samples]
        total_records += len(chars) * source.repeat
        total_tokens += (sum(chars) / CHARS_PER_TOKEN + TEMPLATE_TOKENS * len(chars)) * source.repeat
    val = config.data.val_size
    if not config.data.val_sources and not prepared and val:
        kept = (1 - val) if val < 1 else max(0.0, 1 - val / max(total_records, 1))
        total_tokens *= kept
    return total_tokens, f"~{total_records} records, estimated at {CHARS_PER_TOKEN:g} characters per token"
