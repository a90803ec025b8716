"""The running batch: the rows decoding together and their KV cache, with rows joining between decode
steps (continuous batching) and leaving when they finish.

Each row's tokens are right-aligned in the cache's columns and the attention mask says which columns
are real for which row; position ids count a row's real tokens only (prompt token i sits at position
i), so where a row's tokens sit in the batch never changes its result beyond float rounding. Three
operations keep that layout:

- `prefill(rows)`: each row's reusable prefix (a `prefix_cache.Hit`) goes into the past cache,
  right-aligned in C columns (C: the longest hit among these rows); the rest of its prompt is
  right-aligned in the S input columns. A row reads [pad | cached prefix | pad | rest]: the masked
  holes cost nothing in attention, only the rests are computed (S instead of the full prompt length:
  the saving), and the rests' new full blocks go back into the prefix cache. Rows with no hit have C
  masked columns in front.
- `Batch.merge(new)`: freshly prefilled rows join; the narrower cache is left-padded with masked zero
  columns and both are concatenated on the batch axis.
- `Batch.keep(rows)`: finished rows leave, and the leading columns no remaining row needs are cut, so
  the width stays the longest live row's length however long the batch keeps running.

Sliding-window attention would count masked columns as tokens: the engine turns the prefix cache off
for such models (and left padding has the same limit there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from llamaforge.serve.prefix_cache import Hit, PrefixCache
from llamaforge.serve.protocol import GREEDY_BELOW

Forward = Callable[..., object]  # forward(rows, **model inputs) -> the model's output (adapters set per row)


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _cache(pairs) -> object:
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(pairs))


class Batch:
    def __init__(self, rows: list, cache=None, mask=None, next_pos=None, tokens: list[int] | None = None):
        self.rows, self.cache = rows, cache
        self.mask = mask  # [rows, columns]: 1 where the column holds one of the row's tokens
        self.next_pos = next_pos  # [rows, 1]: position of the token each row feeds next
        self.tokens = tokens or []  # the token each row feeds next

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, index: list[int], tokens: list[int]) -> None:
        """Keep these rows (in this order), which feed `tokens` next."""
        self.tokens = tokens
        if len(index) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in index]
        if not index:
            self.cache = self.mask = self.next_pos = None
            return
        select = torch.tensor(index, device=self.mask.device)
        self.cache.batch_select_indices(select)
        self.mask, self.next_pos = self.mask[select], self.next_pos[select]
        first = int(self.mask.any(0).int().argmax())  # the first column a remaining row still uses
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]

    def merge(self, other: Batch) -> Batch:
        if not other.rows:
            return self
        if not self.rows:
            return other
        width = max(self.mask.shape[1], other.mask.shape[1])
        pairs = (
            (
                torch.cat([_left_pad(a.keys, width, 2), _left_pad(b.keys, width, 2)]),
                torch.cat([_left_pad(a.values, width, 2), _left_pad(b.values, width, 2)]),
            )
            for a, b in zip(self.cache.layers, other.cache.layers, strict=True)
        )
        return Batch(
            self.rows + other.rows,
            _cache(pairs),
            torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)]),
            torch.cat([self.next_pos, other.next_pos]),
            self.tokens + other.tokens,
        )

    def decode(self, forward: Forward) -> torch.Tensor:
        """One step for every row: feed `tokens`, return the next-token logits [rows, vocab] (float, CPU)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        out = forward(
            self.rows,
            input_ids=torch.tensor(self.tokens, device=self.mask.device).unsqueeze(1),
            attention_mask=self.mask,
            position_ids=self.next_pos,
            past_key_values=self.cache,
        )
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1, :].float().cpu()


def prefill(
    rows: Sequence,
    forward: Forward,
    pad_id: int,
    device: torch.device,
    prefix_cache: PrefixCache | None = None,
    *,
    resume: bool = False,
) -> tuple[Batch, torch.Tensor, list[Hit]]:
    """Prefill new rows (reusing cached prefixes): their batch, last-token logits and prefix hits.
    With `resume`, each row's prompt and the tokens it generated so far (rebuilding a row's cache alone)."""
    if resume:
        prefix_cache = None
    seqs = [r.prompt_ids + r.token_ids if resume else r.prompt_ids for r in rows]
    if any(not s for s in seqs):
        raise ValueError("an empty prompt cannot be prefilled")
    hits = [prefix_cache.lookup(r.adapter, r.prompt_ids, r.tenant) if prefix_cache else Hit() for r in rows]
    rests = [s[h.tokens :] for s, h in zip(seqs, hits)]
    n, cached, new = len(rows), max(h.tokens for h in hits), max(len(x) for x in rests)
    ids = torch.full((n, new), pad_id, dtype=torch.long)
    mask = torch.zeros((n, cached + new), dtype=torch.long)
    for i, (hit, rest) in enumerate(zip(hits, rests)):
        ids[i, new - len(rest) :] = torch.tensor(rest)
        mask[i, cached - hit.tokens : cached] = 1
        mask[i, cached + new - len(rest) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    past = _cache(())
    if cached:
        ref = next(h for h in hits if h.tokens)
        layers, heads, _, dim = ref.keys.shape
        keys = ref.keys.new_zeros((layers, n, heads, cached, dim), device=device)
        values = torch.zeros_like(keys)
        for i, hit in enumerate(hits):
            if hit.tokens:
                keys[:, i, :, cached - hit.tokens :] = hit.keys
                values[:, i, :, cached - hit.tokens :] = hit.values
        past = _cache(zip(keys, values))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, cached:]
    out = forward(
        rows,
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=past,
        logits_to_keep=1,
    )
    if prefix_cache is not None:
        _store(prefix_cache, rows, hits, past, cached + new)
    batch = Batch(list(rows), past, mask, positions[:, -1:] + 1)
    return batch, out.logits[:, -1, :].float().cpu(), hits


def choose_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Greedy at temperatures under GREEDY_BELOW (dividing by ~0 overflows), else sampling from the
    top-p nucleus with the request's own generator."""
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cut = sorted_p.cumsum(0) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def _store(prefix_cache: PrefixCache, rows: Sequence, hits: list[Hit], past, width: int) -> None:
    """Copy each row's new full prompt blocks out of the batch cache (prompt token t is in column
    width - len(prompt) + t for every t past the row's hit)."""
    size = prefix_cache.block_size
    for i, (row, hit) in enumerate(zip(rows, hits)):
        wanted = prefix_cache.missing(hit)
        if not wanted:
            continue
        offset = width - len(row.prompt_ids)
        blocks = {}
        for b in wanted:
            lo, hi = offset + b * size, offset + (b + 1) * size
            blocks[b] = (
                torch.stack([layer.keys[i, :, lo:hi] for layer in past.layers]),
                torch.stack([layer.values[i, :, lo:hi] for layer in past.layers]),
            )
        prefix_cache.store(row.adapter, hit, blocks)
