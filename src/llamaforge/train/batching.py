"""Length-grouped batches, padded to the longest in the batch (never to a fixed max length), and the
collation of one micro-batch, padded (losses.collate) or packed (packing.py)."""

from __future__ import annotations

import random

import torch

from llamaforge.losses import collate
from llamaforge.train.packing import collate_packed


def length_grouped_batches(
    lengths: list[int], batch_size: int, *, seed: int, epoch: int, mega: int = 32
) -> list[list[int]]:
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


def collate_micro(
    dataset, idx: list, pad_id: int, *, flatten: bool = False
) -> tuple[dict[str, torch.Tensor], int]:
    """A micro-batch and its real (non-pad) token count. `idx` holds example indices (padded rows, one
    example each) or bins of them (packed rows); `flatten` packs into one row (flash_attention_2)."""
    if idx and isinstance(idx[0], list):
        rows = [[dataset[i] for i in b] for b in idx]
        return collate_packed(rows, pad_id, flatten=flatten), sum(
            len(r["input_ids"]) for row in rows for r in row
        )
    batch = collate([dataset[i] for i in idx], pad_id)
    return batch, int(batch["attention_mask"].sum())
