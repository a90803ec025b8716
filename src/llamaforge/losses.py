"""Summed token cross-entropy, computed in chunks over target positions only, and the held-out loss
that training, `llamaforge eval` and the quantized export all measure with it.

Prompt and pad positions need no logits, and a 128K vocabulary would make full-sequence float32
logits huge (Llama 3 item 10): we run the decoder, keep the hidden states of target positions, and
project them through lm_head a chunk at a time under activation checkpointing, so at most one
chunk of logits is alive in forward or backward. For Llama's plain lm_head the chunks go through
`LinearCrossEntropy` instead, which computes each chunk's gradient in forward (below): no logits are
kept or recomputed for backward at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llamaforge.templates import IGNORE_INDEX


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


def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    return decoder, base.get_output_embeddings()


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


# ---------------------------------------------------------------- fused linear cross-entropy
# Cross-entropy through the LM head without the [tokens, vocab] logits, and without recomputing them.
#
# Each chunk of target positions is projected through the head, its loss summed and its gradient
# (softmax minus one-hot) pushed back through the head at once, inside the forward; only the gradients
# for the hidden states (tokens x hidden) and, when it trains, the head's weight are kept for backward.
# This is the "fused linear cross-entropy" of Liger Kernel and cut-cross-entropy, which are Triton/CUDA
# only and so do not run on CPU; here it is plain torch. Against the checkpointed chunks it saves the
# head's recomputation in backward and the chunk's saved log-softmax and its gradient: one chunk of
# fp32 logits is the whole transient.
class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` (no bias) against `targets`, in chunks of `chunk` rows."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, compute_dtype):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(compute_dtype)
            y = targets[start : start + chunk]
            logits = (h @ w.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if not (want_h or want_w):
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # in place: the chunk's logits become its gradient
            probs[torch.arange(len(y), device=y.device), y] -= 1.0
            grad = probs.to(compute_dtype)
            del logits, probs
            if want_h:
                grad_h[start : start + chunk] = (grad @ w).to(hidden.dtype)
            if want_w:
                grad_w += (grad.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_output.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_output).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def fusable(head: torch.nn.Module) -> bool:
    """A plain bias-free Linear (Llama's lm_head): adapters or modules_to_save wrappers take the
    checkpointed path, whose autograd sees through them."""
    return type(head) is torch.nn.Linear and head.bias is None


def linear_cross_entropy_sum(
    head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Summed cross-entropy of the head's logits for `hidden` [n, h] against `targets` [n]. The matmuls
    run in autocast's dtype when autocast is on (as the head's own forward would), the softmax in fp32."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        return LinearCrossEntropy.apply(hidden, head.weight, targets, chunk, dtype)


def decoder_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states of the decoder, for padded (attention_mask) or packed (position_ids) batches.

    `use_cache=False` is load-bearing for packing: with a cache, transformers skips the detection of
    packed sequences in position_ids and examples silently attend to each other (see packing.py).
    """
    decoder = _decoder_and_head(model)[0]
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    return decoder(input_ids=batch["input_ids"], use_cache=False, **kwargs).last_hidden_state


def without_redundant_mask(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding mask of a right-padded batch: under causal attention a real token never sees the
    pads after it, and pad positions carry no labels, so the mask changes nothing the loss reads. Without
    it sdpa runs its causal kernel without a mask (~5% of a LoRA step on CPU, measured)."""
    mask = batch.get("attention_mask")
    if mask is None or "position_ids" in batch or mask.shape[1] < 2:
        return batch
    right_padded = bool(mask[:, 0].all()) and bool((mask[:, :-1] >= mask[:, 1:]).all())
    return {k: v for k, v in batch.items() if k != "attention_mask"} if right_padded else batch


def token_loss_sum(
    model, batch: dict[str, torch.Tensor], chunk_size: int = 1024, *, fused: bool = True
) -> torch.Tensor:
    """Sum (not mean) of the cross-entropy over every target token of the batch.

    The caller divides by the target-token count of the whole optimizer step (all micro-batches,
    all processes): the mean of per-batch means weights short examples wrongly (Llama 3 item 7).
    """
    labels = batch["labels"]
    if getattr(model, "peft_type", None) is not None and str(model.peft_type).endswith("PREFIX_TUNING"):
        return full_logits_loss_sum(model, batch)
    hidden = decoder_hidden(model, without_redundant_mask(batch))
    head = _decoder_and_head(model)[1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = hidden[:, :-1][mask]
    wanted = targets[mask]
    if fused and fusable(head):
        return linear_cross_entropy_sum(head, picked, wanted, chunk_size)
    total = hidden.new_zeros((), dtype=torch.float32)
    several = picked.shape[0] > chunk_size  # one chunk: nothing to save by recomputing it in backward
    for start in range(0, picked.shape[0], chunk_size):
        h, y = picked[start : start + chunk_size], wanted[start : start + chunk_size]
        if several and torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, y)
    return total


def full_logits_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reference path (and the one prefix tuning needs, whose prompts enter through the cache)."""
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits
    if logits.shape[1] != batch["labels"].shape[1]:  # virtual tokens prepended by prefix methods
        logits = logits[:, -batch["labels"].shape[1] :]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


# ---------------------------------------------------------------- held-out loss


@dataclass
class HeldOutLoss:
    """Summed NLL and target-token count per batch (per example when batches hold one)."""

    nll: list[float] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.targets)

    @property
    def loss(self) -> float:
        """Token-weighted: summed NLL over every target token, not a mean of per-batch means."""
        return sum(self.nll) / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50))


@torch.no_grad()
def held_out_loss(
    model,
    rows: Sequence[dict],
    pad_id: int,
    *,
    batch_size: int = 1,
    chunk_size: int = 1024,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    progress=None,
) -> HeldOutLoss:
    """The loss of `rows` (input_ids + labels, masked as in training) without gradients.

    `batch_size` 1 keeps the rows' order and gives per-example sums (for a bootstrap); larger batches
    take rows in length order so little is padded. `progress` is a tqdm-like bar updated per row.
    The caller sets eval mode: training switches back to train mode itself."""
    device = next(model.parameters()).device
    order = (
        range(len(rows))
        if batch_size == 1
        else sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    )
    order = list(order)
    result = HeldOutLoss()
    for start in range(0, len(order), batch_size):
        chosen = [rows[i] for i in order[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(chosen, pad_id).items()}
        with autocast():
            result.nll.append(float(token_loss_sum(model, batch, chunk_size)))
        result.targets.append(num_targets(batch))
        if progress is not None:
            progress.update(len(chosen))
    return result
