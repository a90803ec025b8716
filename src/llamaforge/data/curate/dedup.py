"""Step 5, deduplication: exact (after normalisation, case and spacing folded) and near-duplicate
(MinHash LSH, Jaccard of word shingles) on the prompt, the answer or both.

Which record of a cluster is kept: `keep: first` keeps the first in input order (streaming);
`keep: longest` keeps the one with the longest answer (ties: the first), by retracting an
earlier kept record when a longer duplicate arrives. Every dropped record names the kept one.
"""

from __future__ import annotations

import re
from collections import defaultdict

import xxhash

from llamaforge.data.curate.config import DedupConfig
from llamaforge.data.curate.minhash import LSHIndex, MinHasher
from llamaforge.data.curate.records import Item

STEP = "dedup"
_FOLD = re.compile(r"\s+")
MAX_CLUSTER_EXAMPLES = 5


def exact_key(text: str) -> int:
    return xxhash.xxh3_64_intdigest(_FOLD.sub(" ", text.lower()).strip().encode("utf-8", "surrogatepass"))


class Dedup:
    def __init__(self, cfg: DedupConfig, retract):
        """retract(idx, step, reason): take back a record that was already let through."""
        self.cfg = cfg
        self._retract = retract
        self._exact: dict[int, int] = {}  # key -> kept idx
        self._hasher = MinHasher(cfg.num_perm, cfg.shingle_size, scheme=cfg.minhash) if cfg.near else None
        self._lsh = LSHIndex(cfg.threshold, cfg.num_perm) if cfg.near else None
        self._alias: dict[int, int] = {}  # retracted kept idx -> the idx that replaced it
        self._length: dict[int, int] = {}  # kept idx -> answer length (keep=longest only)
        self.clusters: dict[int, list[int]] = defaultdict(list)  # kept idx -> dropped idx
        self.exact_dropped = 0
        self.near_dropped = 0

    def _resolve(self, idx: int) -> int:
        while idx in self._alias:
            idx = self._alias[idx]
        return idx

    def _duplicate(self, item: Item, kept: int, how: str) -> None:
        """`item` duplicates the kept record `kept`: drop one of them according to `keep`."""
        kept = self._resolve(kept)
        longest = self.cfg.keep == "longest"
        if longest and len(item.answer) > self._length.get(kept, 0):
            # the newcomer wins: take the kept one back and let the newcomer stand in for it
            self._retract(kept, STEP, f"{how} of #{item.idx} (a longer answer, kept instead)")
            self._alias[kept] = item.idx
            self._length[item.idx] = len(item.answer)
            members = self.clusters.pop(kept, [])
            self.clusters[item.idx] = [*members, kept]
            item.conv.meta["duplicates"] = len(self.clusters[item.idx])
            return
        item.rejected(STEP, f"{how} of #{kept} (kept: the {'longest' if longest else 'first'})")
        self.clusters[kept].append(item.idx)

    def __call__(self, items: list[Item]) -> None:
        cfg = self.cfg
        live = [it for it in items if it.reject is None]
        if not live:
            return
        texts = [it.text(cfg.compare) for it in live]
        if cfg.exact:
            for it, text in zip(live, texts, strict=False):
                key = exact_key(text)
                kept = self._exact.get(key)
                if kept is None:
                    self._exact[key] = it.idx
                    it.cache["exact_key"] = key
                    self._kept(it)
                else:
                    self._duplicate(it, kept, "exact duplicate")
                    self.exact_dropped += 1
                    if it.reject is None:
                        self._exact[key] = it.idx
        if self._lsh is None:
            return
        survivors = [(it, t) for it, t in zip(live, texts, strict=False) if it.reject is None]
        if not survivors:
            return
        sigs = self._hasher.signatures_batch([t for _, t in survivors])
        keys = self._lsh.band_keys(sigs)
        for row, (it, _) in enumerate(survivors):
            sig, k = sigs[row], keys[row]
            match = self._lsh.best_match(sig, k)
            if match is None:
                self._lsh.insert(it.idx, sig, k)
                self._kept(it)
                continue
            other, sim = match
            if self._resolve(other) == it.idx:  # `it` already replaced `other` (a longer exact duplicate)
                self._lsh.insert(it.idx, sig, k)
                self._lsh.remove_sig(other)
                continue
            self._duplicate(it, other, f"near duplicate (Jaccard~{sim:.2f})")
            self.near_dropped += 1
            if it.reject is None:
                self._lsh.insert(it.idx, sig, k)
                self._lsh.remove_sig(other)

    def _kept(self, item: Item) -> None:
        """`item` is kept for now: with keep=longest its length is what a later duplicate is measured
        against, from this moment on (a duplicate later in the same batch included)."""
        if self.cfg.keep == "longest":
            self._length.setdefault(item.idx, len(item.answer))

    def summary(self) -> dict:
        sizes = sorted(((len(v) + 1, k) for k, v in self.clusters.items()), reverse=True)
        return {
            "compare": self.cfg.compare,
            "keep": self.cfg.keep,
            "threshold": self.cfg.threshold,
            "exact_dropped": self.exact_dropped,
            "near_dropped": self.near_dropped,
            "clusters": len(self.clusters),
            "largest_clusters": [
                {"kept": k, "size": n, "dropped": self.clusters[k][:MAX_CLUSTER_EXAMPLES]}
                for n, k in sizes[:20]
            ],
        }
