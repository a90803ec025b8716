"""From the job's data sources to tokenized train/validation sets (Arrow, memory-mapped), the rejects
and a dataset card whose sha256 ties every run to its exact data."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llamaforge import catalog
from llamaforge.config import DataConfig, DataSource
from llamaforge.data.split import content_hash, split_records
from llamaforge.data.types import Conversation, Rejected, with_system_prompt
from llamaforge.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: object  # datasets.Dataset with input_ids, labels, length, num_targets
    val: object | None
    card: dict
    rejects: list[Rejected] = field(default_factory=list)
    val_conversations: list[Conversation] = field(default_factory=list)  # as measured: system prompt applied


def source_path(src: DataSource) -> Path:
    entry = catalog.CATALOG.get(src.path)
    if entry is not None and entry.kind == "dataset":
        return catalog.resolve(src.path)
    return Path(src.path).expanduser()


def iter_source(src: DataSource, *, strict: bool, rejects: list[Rejected]) -> Iterator[Conversation]:
    from llamaforge.data.formats import read_source

    path = source_path(src)
    for rep in range(src.repeat):
        taken = 0
        for item in read_source(path, src.format, strict=strict, variables=src.variables or None):
            if isinstance(item, Rejected):
                if rep == 0:  # a repeated source rejects the same records again: keep each once
                    rejects.append(item)
                continue
            yield item
            taken += 1
            if src.max_samples is not None and taken >= src.max_samples:
                break


def data_sources(cfg: DataConfig) -> tuple[list[DataSource], list[DataSource]]:
    """(training sources, validation sources): a prepare output's splits (`data.prepared`, checked),
    or the job's own."""
    if cfg.prepared:
        from llamaforge.data.curate.prepared import open_prepared

        prepared = open_prepared(cfg.prepared)
        return [DataSource(path=str(prepared.train))], [DataSource(path=str(prepared.val))]
    return list(cfg.sources), list(cfg.val_sources)


def split_conversations(
    cfg: DataConfig, rejects: list[Rejected]
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val) conversations: the val sources when there are (prepare's val split with
    `data.prepared`), otherwise a split of the sources by content (data/split.py, as prepare splits)."""
    sources, val_sources = data_sources(cfg)
    train = [c for src in sources for c in iter_source(src, strict=cfg.strict, rejects=rejects)]
    if val_sources or cfg.prepared:
        return train, [c for src in val_sources for c in iter_source(src, strict=cfg.strict, rejects=rejects)]
    return split_records(train, cfg.val_size)


def tokenize_conversations(
    convs: list[Conversation],
    template,
    cfg: DataConfig,
    rejects: list[Rejected],
    kept: list[Conversation] | None = None,
) -> list[dict]:
    """Token rows of the conversations the template can encode; `kept` collects those conversations."""
    rows = []
    for conv in convs:
        conv = with_system_prompt(conv, cfg.system_prompt)
        try:
            enc = template.encode(conv, max_length=cfg.max_length, train_on_prompt=cfg.train_on_prompt)
        except DataError as exc:
            if cfg.strict:
                raise
            rejects.append(Rejected(conv.source, conv.line, exc.field, exc.reason, conv.to_dict()))
            continue
        rows.append(
            {
                "input_ids": enc.input_ids,
                "labels": enc.labels,
                "length": len(enc.input_ids),
                "num_targets": enc.num_targets,
            }
        )
        if kept is not None:
            kept.append(conv)
    return rows


def _to_dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_dict(
        {k: [r[k] for r in rows] for k in ("input_ids", "labels", "length", "num_targets")}
    )


def prepare_data(cfg: DataConfig, template) -> PreparedData:
    rejects: list[Rejected] = []
    train_convs, val_convs = split_conversations(cfg, rejects)
    if not train_convs:
        raise DataError("no usable training records in data.sources (see rejects.jsonl for why)")
    train_rows = tokenize_conversations(train_convs, template, cfg, rejects)
    val_kept: list[Conversation] = []
    val_rows = tokenize_conversations(val_convs, template, cfg, rejects, val_kept)
    if not train_rows:
        raise DataError("every training record was rejected after tokenization (see rejects.jsonl)")
    digest = hashlib.sha256()
    for split, convs in (("train", train_convs), ("val", val_convs)):
        for conv in convs:
            digest.update(f"{split}\t{content_hash(conv)}\n".encode())
    sources, val_sources = data_sources(cfg)
    card = {
        "sha256": digest.hexdigest(),
        "sources": [source_card(s) for s in sources],
        "val_sources": [source_card(s) for s in val_sources],
        "template": template.name,
        "train_records": len(train_rows),
        "val_records": len(val_rows),
        "rejected": len(rejects),
        "train_tokens": sum(r["length"] for r in train_rows),
        "train_target_tokens": sum(r["num_targets"] for r in train_rows),
        "val_target_tokens": sum(r["num_targets"] for r in val_rows),
        "max_length": max(r["length"] for r in train_rows),
    }
    return PreparedData(
        _to_dataset(train_rows), _to_dataset(val_rows) if val_rows else None, card, rejects, val_kept
    )


def source_card(src: DataSource) -> dict:
    path = source_path(src)
    card = {
        "path": src.path,
        "file": str(path),
        "sha256": catalog.sha256_file(path) if path.is_file() else None,
        "format": src.format,
        "max_samples": src.max_samples,
        "repeat": src.repeat,
    }
    prepared = path.parent / "card.json"  # a split written by `llamaforge prepare`: trace back to its data
    if prepared.is_file():
        with contextlib.suppress(ValueError, KeyError):
            card["prepared_dataset_sha256"] = json.loads(prepared.read_text())["dataset_sha256"]
    return card


def write_rejects(path: Path, rejects: list[Rejected]) -> None:
    from llamaforge.data.jsonsafe import json_line

    with open(path, "w", encoding="utf-8") as fh:
        for r in rejects:
            fh.write(json_line(r.to_dict()))  # a reject may hold what JSON cannot: made writable


def write_run_data(run_dir: Path, data) -> str:
    """The run's data files (rejects.jsonl, val.jsonl that eval re-reads, data_card.json) from a
    `PreparedData` or a preference objective's data; returns the line that describes the data."""
    from llamaforge.runs import write_val_conversations

    write_rejects(run_dir / "rejects.jsonl", data.rejects)
    write_val_conversations(run_dir, data.val_conversations)
    (run_dir / "data_card.json").write_text(json.dumps(data.card, indent=2))
    c = data.card
    return (
        f"data: {c['train_records']} train / {c['val_records']} val records, "
        f"{c['rejected']} rejected, {c['train_target_tokens']} target tokens"
    )
