"""Length-grouped batches, padded to the longest in the batch (never to a fixed max length), and the
collation of one micro-batch, padded or packed (packing.py)."""

from __future__ import annotations

import random

import torch

from llamaforge.templates import IGNORE_INDEX
from llamaforge.train.packing import collate_packed


def length_grouped_batches(lengths: list[int], batch_size: int, *, seed: int, epoch: int,
                           mega: int = 32) -> list[list[int]]:
    """Shuffle, sort within mega-batches by length, then shuffle the batches.

    Deterministic in (seed, epoch), so a resumed run replays the same order and can skip ahead.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    span = batch_size * mega
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda i: lengths[i], reverse=True)
        batches.extend(group[k : k + batch_size] for k in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        attention[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def num_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are predicted: labels shifted by one, so the first position never counts."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def collate_micro(dataset, idx: list, pad_id: int, *, flatten: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """A micro-batch and its real (non-pad) token count. `idx` holds example indices (padded rows, one
    example each) or bins of them (packed rows); `flatten` packs into one row (flash_attention_2)."""
    if idx and isinstance(idx[0], list):
        rows = [[dataset[i] for i in b] for b in idx]
        return collate_packed(rows, pad_id, flatten=flatten), sum(len(r["input_ids"]) for row in rows for r in row)
    batch = collate([dataset[i] for i in idx], pad_id)
    return batch, int(batch["attention_mask"].sum())
