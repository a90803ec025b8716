"""One content hash and one split for every command that divides records.

`prepare` (data/curate) and `train` (train/data.py) hash a record the same way and put it in the
same split: a record `train` holds out with `data.val_size: v` is one `prepare` writes to val.jsonl
with `split.val: v, split.test: 0, split.seed: 0`. The hash covers the roles and texts only (not the
source file or line), so a repeated record never straddles splits and the split is stable when
the data grows: adding records never moves an existing one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import TypeVar

from llamaforge.data.types import Conversation

SPLITS = ("train", "val", "test")
T = TypeVar("T")


def _digest(conv: Conversation, salt: str, size: int) -> bytes:
    h = hashlib.blake2b(digest_size=size)
    h.update(salt.encode())
    for m in conv.messages:
        h.update(m.role.encode())
        h.update(b"\x00")
        h.update(m.content.encode("utf-8", "surrogatepass"))
        h.update(b"\x01")
    return h.digest()


def content_hash(conv: Conversation, salt: str = "") -> str:
    """A stable id of the content (roles and texts), independent of source and line."""
    return _digest(conv, salt, 12).hex()


def content_unit(conv: Conversation, seed: int = 0) -> float:
    """A number in [0, 1) from the content and the seed: the record's place in every split."""
    return int.from_bytes(_digest(conv, str(seed), 8), "big") / 2**64


def split_of(unit: float, val: float, test: float = 0.0) -> str:
    """The split of a record whose `content_unit` is `unit`, for these shares (test first, then val)."""
    if unit < test:
        return "test"
    if unit < test + val:
        return "val"
    return "train"


def split_records(
    items: Iterable[T], val_size: float, conv_of: Callable[[T], Conversation] = lambda x: x, seed: int = 0
) -> tuple[list[T], list[T]]:
    """(train, val) of in-memory records by their content (`conv_of(item)` gives the conversation).

    `val_size` < 1: the share of `split_of` (as `prepare` splits); a repeated record stays out of
    training and counts once in validation. `val_size` >= 1: that many distinct records, the ones
    with the smallest units (the same records whatever order they came in).
    """
    items = list(items)
    if val_size <= 0:
        return items, []
    units = [content_unit(conv_of(item), seed) for item in items]
    if val_size >= 1:
        distinct = sorted(set(units))[: int(val_size)]
        chosen = set(distinct)
        first = {}
        for unit, item in zip(units, items):
            first.setdefault(unit, item)
        return [it for u, it in zip(units, items) if u not in chosen], [first[u] for u in distinct]
    train, val, seen = [], [], set()
    for unit, item in zip(units, items):
        if split_of(unit, val_size) == "val":
            if unit not in seen:  # repeats stay out of training and count once in validation
                seen.add(unit)
                val.append(item)
        else:
            train.append(item)
    return train, val
