"""A `llamaforge prepare` output as `train` reads it (`data.prepared: DIR`): its train and val splits
and its card, checked before anything is read.

`train` then uses prepare's split as it is (no second split), and its data card names the prepared
dataset's sha256, so a run traces back to the exact prepared data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llamaforge.data.curate.report import CARD, sha256_file
from llamaforge.errors import ConfigError

WHAT = "data.prepared"


@dataclass
class PreparedDir:
    path: Path
    train: Path  # train.jsonl
    val: Path  # val.jsonl (may be empty: prepare ran with split.val 0)
    card: dict  # card.json

    @property
    def dataset_sha256(self) -> str:
        return self.card["dataset_sha256"]


def open_prepared(path: str | Path) -> PreparedDir:
    """The prepare output at `path`; an error naming the folder and what is missing or changed when it is
    not one (a split edited after prepare no longer matches the sha256 its card.json records)."""
    folder = Path(path).expanduser()
    hint = "point it at the --out folder of `llamaforge prepare`"
    if not folder.is_dir():
        raise ConfigError(f"{WHAT}: {folder} is not a folder ({hint})")
    card_path = folder / CARD
    if not card_path.is_file():
        raise ConfigError(f"{WHAT}: {folder} is not a prepare output: {card_path} is missing ({hint})")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        files, digest = card["files"], card["dataset_sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{WHAT}: {card_path} is not a prepare card ({exc.__class__.__name__}: {exc})"
        ) from None
    if not isinstance(files, dict) or not isinstance(digest, str):
        raise ConfigError(f"{WHAT}: {card_path} is not a prepare card (files / dataset_sha256 malformed)")
    for name in ("train.jsonl", "val.jsonl"):
        split = folder / name
        if not split.is_file():
            raise ConfigError(f"{WHAT}: {folder} is not a complete prepare output: {split} is missing")
        recorded = files.get(name)
        if recorded is None:
            raise ConfigError(f"{WHAT}: {card_path} does not list {name}: run prepare again")
        if sha256_file(split) != recorded:
            raise ConfigError(
                f"{WHAT}: {split} changed after prepare wrote {card_path} (its sha256 no longer matches): "
                "run prepare again, or train on the file through data.sources"
            )
    return PreparedDir(folder, folder / "train.jsonl", folder / "val.jsonl", card)
