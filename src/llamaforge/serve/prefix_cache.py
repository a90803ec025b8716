"""Shared-prefix KV cache: prompts that start alike (a system prompt under the chat template's header)
pay for that prefix's prefill once.

The design is vLLM's automatic prefix caching, cut down to one process:

- A prompt is read in blocks of `block_size` tokens. Block i's key is a sha256 chain over the tenant,
  the adapter name and the tokens of blocks 0..i, so a key names the whole prefix up to the end of that
  block (no block matches out of context), and the same tokens under another adapter never match: a
  LoRA on the attention projections changes every layer's keys and values, so a prefix's KV belongs to
  one adapter. The tenant (the API key's name) is in the key too: `cached_tokens` in a response, and
  the time to first token, would otherwise tell one tenant which prompts another tenant sent.
- An entry holds one block's post-RoPE keys and values for all layers, `[layers, kv_heads, block,
  head_dim]`, copied out of a batch's cache after its prefill. Because the engine passes explicit
  position ids, a prompt's token i has position i wherever the prompt sits in a batch, so the stored KV
  is valid in any later batch (batch.py explains how a hit is laid out there).
- `lookup` walks a prompt's blocks to the first miss and never covers the last prompt token: at least
  one token is prefilled, whose logits choose the first output token.
- LRU, bounded in tokens (`serve.prefix_cache_tokens`, 0 turns it off). A lookup touches its blocks
  deepest first, so a prefix's first block is always more recent than its later ones and eviction
  takes chain tails first: no block outlives the blocks it extends.
- The engine calls `drop(adapter)` when an adapter is loaded or unloaded: a reloaded name may be new
  weights. The base's entries stay (unloading never merges anything into the base).

Why token blocks rather than the rendered system prompt: the engine sees token ids only, so this works
the same for chat and text completions, any template, and multi-turn histories that grow a shared
conversation; the system prompt and template header are reused up to their last whole block (fewer
than `block_size` tokens of it are recomputed).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class Hit:
    """What the cache knows about one prompt: `tokens` reusable tokens and their KV (layers first)."""

    tokens: int = 0
    keys: torch.Tensor | None = None  # [layers, kv_heads, tokens, head_dim]
    values: torch.Tensor | None = None
    chain: list[bytes] = field(default_factory=list)  # the keys of all the prompt's full blocks


@dataclass
class _Block:
    adapter: str | None
    keys: torch.Tensor  # [layers, kv_heads, block_size, head_dim]
    values: torch.Tensor


class PrefixCache:
    def __init__(self, max_tokens: int, block_size: int = 16):
        self.max_tokens, self.block_size = max_tokens, block_size
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()

    @property
    def tokens(self) -> int:
        """Tokens held (always a multiple of the block size, never above `max_tokens`)."""
        return len(self._blocks) * self.block_size

    def tokens_for(self, adapter: str | None) -> int:
        return sum(self.block_size for b in self._blocks.values() if b.adapter == adapter)

    def chain(self, adapter: str | None, ids: list[int], tenant: str = "") -> list[bytes]:
        """The key of each full block of `ids`: block i's key hashes the tenant, the adapter and all tokens
        up to it."""
        digest = hashlib.sha256(b"tenant:" + tenant.encode("utf-8", "replace")).digest()
        digest = hashlib.sha256(digest + b"adapter:" + (adapter or "\0base").encode()).digest()
        keys, size = [], self.block_size
        for start in range(0, len(ids) - size + 1, size):
            digest = hashlib.sha256(digest + array("q", ids[start : start + size]).tobytes()).digest()
            keys.append(digest)
        return keys

    def lookup(self, adapter: str | None, ids: list[int], tenant: str = "") -> Hit:
        chain = self.chain(adapter, ids, tenant)
        usable = (len(ids) - 1) // self.block_size  # the last prompt token is always prefilled
        found = []
        for key in chain[:usable]:
            block = self._blocks.get(key)
            if block is None:
                break
            found.append(block)
        self._touch(chain[: len(found)])
        if not found:
            return Hit(chain=chain)
        return Hit(
            tokens=len(found) * self.block_size,
            keys=torch.cat([b.keys for b in found], dim=2),
            values=torch.cat([b.values for b in found], dim=2),
            chain=chain,
        )

    def missing(self, hit: Hit) -> list[int]:
        """Indices of the prompt's full blocks worth storing after its prefill (not cached, within the bound)."""
        room = self.max_tokens // self.block_size  # a prompt longer than the cache keeps its first blocks
        first = hit.tokens // self.block_size
        return [i for i in range(first, min(len(hit.chain), room)) if hit.chain[i] not in self._blocks]

    def store(
        self, adapter: str | None, hit: Hit, blocks: dict[int, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Add a prompt's blocks (index -> keys, values), then evict the least recently used past the bound."""
        for i, (keys, values) in blocks.items():
            self._blocks[hit.chain[i]] = _Block(adapter, keys, values)
        self._touch(hit.chain[: self.max_tokens // self.block_size])
        while self.tokens > self.max_tokens:
            self._blocks.popitem(last=False)

    def drop(self, adapter: str | None) -> int:
        """Forget an adapter's blocks; returns how many tokens were dropped."""
        gone = [k for k, b in self._blocks.items() if b.adapter == adapter]
        for k in gone:
            del self._blocks[k]
        return len(gone) * self.block_size

    def clear(self) -> None:
        self._blocks.clear()

    def _touch(self, chain: list[bytes]) -> None:
        for key in reversed(chain):  # deepest first: the chain's root ends up the most recent
            if key in self._blocks:
                self._blocks.move_to_end(key)
