"""Step 9, split: deterministic train / validation / test by a hash of the content.

Unstratified, a record's split depends only on its own content and the seed (data/split.py, the
same hash and split `train` uses): adding records never moves an existing one (stable when the
data grows). Stratified by a field, each stratum is split in the exact ratios by ranking its
records' hashes: per-stratum shares are exact, and a record can move only if it sits at a quota
boundary of a stratum that grew.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from llamaforge.data.curate.config import SplitConfig
from llamaforge.data.types import Conversation


def stratum_of(conv: Conversation, field: str | None) -> str:
    if not field:
        return ""
    if field == "source":
        return str(conv.meta.get("source_name") or conv.source)
    value: Any = conv.meta.get(field)
    return "" if value is None else str(value)


def stratified_assignment(entries: list[tuple[int, str, float]], cfg: SplitConfig) -> dict[int, str]:
    """entries: (idx, stratum, unit hash) -> idx: split, exact shares within each stratum."""
    by_stratum: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for idx, stratum, u in entries:
        by_stratum[stratum].append((u, idx))
    out: dict[int, str] = {}
    for members in by_stratum.values():
        members.sort()
        n = len(members)
        n_test = math.floor(n * cfg.test + 0.5)
        n_val = math.floor(n * cfg.val + 0.5)
        if n - n_test - n_val < 1:  # never take a small stratum's only training record
            n_val = max(0, n - n_test - 1)
        for rank, (_, idx) in enumerate(members):
            out[idx] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out
