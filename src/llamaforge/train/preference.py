"""Preference objectives (DPO, KTO, ORPO) as pure functions on per-sequence log-probs, the chunked
per-sequence log-prob gathering they need, and the reference model without a second copy.

The losses follow TRL's formulas exactly (tests/test_preference.py checks each against TRL to 1e-5,
gradients included), so a user moving from TRL gets the same numbers. The log-probs are gathered like
the SFT loss in losses.py: only assistant positions are projected through lm_head, a chunk at a time
under activation checkpointing, so a 128K vocabulary never materialises full-sequence logits.

The reference is the base model with the adapter disabled (peft's `disable_adapter()`), or log-probs
computed once before training (`precompute_reference`), which also serves full fine-tuning: there the
weights change, and keeping a frozen copy would double the memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llamaforge.errors import ConfigError
from llamaforge.losses import _decoder_and_head, collate, decoder_hidden, without_redundant_mask
from llamaforge.templates import IGNORE_INDEX

OBJECTIVES: tuple[str, ...] = ("sft", "dpo", "kto", "orpo")


# ------------------------------------------------------------------------------ per-sequence log-probs


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    return -F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none"
    )


def _is_prefix_tuning(model) -> bool:
    return getattr(model, "peft_type", None) is not None and str(model.peft_type).endswith("PREFIX_TUNING")


def sequence_logps(
    model, batch: dict[str, torch.Tensor], *, average: bool = False, chunk_size: int = 1024
) -> torch.Tensor:
    """Per-sequence sum (or mean, `average=True`) of log p(target) over the labelled tokens; shape (batch,).

    Labels are shifted by one as in causal LM training, and -100 positions (prompt, pads) are skipped.
    DPO and KTO use the sum; ORPO the mean (as TRL does)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows = mask.nonzero()[:, 0]
    wanted = targets[mask]
    if _is_prefix_tuning(model):  # its prompt enters through the cache: the full-logits path
        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        logits = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits[:, -labels.shape[1] :]
        per_token = _chunk_logps(torch.nn.Identity(), logits[:, :-1][mask], wanted)
    else:
        hidden = decoder_hidden(model, without_redundant_mask(batch))
        head = _decoder_and_head(model)[1]
        picked = hidden[:, :-1][mask]
        several = picked.shape[0] > chunk_size
        parts = []
        for start in range(0, picked.shape[0], chunk_size):
            h, y = picked[start : start + chunk_size], wanted[start : start + chunk_size]
            if several and torch.is_grad_enabled():
                parts.append(checkpoint(_chunk_logps, head, h, y, use_reentrant=False))
            else:
                parts.append(_chunk_logps(head, h, y))
        per_token = (
            torch.cat(parts)
            if parts
            else picked.new_zeros(0, dtype=torch.promote_types(picked.dtype, torch.float32))
        )
    totals = per_token.new_zeros(labels.shape[0]).index_add(0, rows, per_token)
    if not average:
        return totals
    return totals / mask.sum(dim=1).clamp(min=1)


# ------------------------------------------------------------------------------ losses


@dataclass
class PreferenceLoss:
    """The scalar to backpropagate and the per-example implicit rewards (detached) for the metrics."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """DPO with the sigmoid loss on summed log-probs (TRL DPOTrainer, loss_type="sigmoid", reverse KL)."""
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return PreferenceLoss(loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def kto_kl(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: the batch KL estimate from mismatched (prompt, completion) pairs, detached
    and clamped at 0 (TRL KTOTrainer; one process: no gather)."""
    return (policy_kl - ref_kl).mean().detach().clamp(min=0)


def kto_loss(
    policy: torch.Tensor,
    ref: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLoss:
    """KTO (Ethayarajh et al. 2024, eq. 7) on summed log-probs; `labels` is True for a desirable completion.

    The loss is the mean over the batch of the weighted desirable and undesirable terms, as in TRL."""
    good = labels.to(torch.bool)
    chosen_logratios = (policy - ref)[good]
    rejected_logratios = (policy - ref)[~good]
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses))
    return PreferenceLoss(
        losses.nanmean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 to avoid cancellation."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_mean: torch.Tensor,
    policy_rejected_mean: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """ORPO (Hong et al. 2024): the chosen NLL minus beta * log sigmoid(log odds ratio), on *mean*
    per-token log-probs; no reference model. Rewards are beta * mean log-probs, as TRL logs them."""
    chosen, rejected = policy_chosen_mean.float(), policy_rejected_mean.float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    loss = chosen_nll - (beta * F.logsigmoid(log_odds)).mean()
    return PreferenceLoss(loss, beta * chosen.detach(), beta * rejected.detach())


def preference_metrics(result: PreferenceLoss) -> dict[str, float]:
    """The reward columns of metrics.jsonl (TRL's names). Accuracy and margin need paired rewards, which
    KTO does not have: there the margin is the difference of the means and accuracy is left out."""
    chosen, rejected = result.chosen_rewards, result.rejected_rewards
    out: dict[str, float] = {}
    if chosen.numel():
        out["rewards/chosen"] = float(chosen.mean())
    if rejected.numel():
        out["rewards/rejected"] = float(rejected.mean())
    if chosen.shape == rejected.shape and chosen.numel():
        out["rewards/accuracies"] = float((chosen > rejected).float().mean())
        out["rewards/margins"] = float((chosen - rejected).mean())
    elif chosen.numel() and rejected.numel():
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


# ------------------------------------------------------------------------------ the reference model


@contextmanager
def reference_model(model) -> Iterator[None]:
    """The base model in place of the policy, without a second copy: the adapter disabled, no gradients,
    eval mode (dropout would make the reference noisy). A model without an adapter has no base to go
    back to once training has changed it, so it needs `precompute_reference`."""
    if not hasattr(model, "disable_adapter"):
        raise ConfigError(
            "a reference model without an adapter needs its log-probs computed before training: "
            "set method.precompute_reference: true (full fine-tuning changes the base weights)"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            yield
    finally:
        model.train(was_training)


@torch.no_grad()
def reference_logps(
    model, batch: dict[str, torch.Tensor], *, average: bool = False, chunk_size: int = 1024
) -> torch.Tensor:
    """Per-sequence log-probs of the reference (the base with the adapter disabled)."""
    with reference_model(model):
        return sequence_logps(model, batch, average=average, chunk_size=chunk_size)


@torch.no_grad()
def precompute_reference(
    model, rows: Sequence[dict], pad_id: int, *, batch_size: int = 4, chunk_size: int = 1024
) -> torch.Tensor:
    """Reference summed log-probs of every row (input_ids + labels), once, before training; shape (len(rows),).

    Called before the first step, so a model without an adapter is still the base; a peft model runs
    with its adapter disabled (a resumed or initialised-nonzero adapter is not the base)."""
    device = next(model.parameters()).device
    out = torch.empty(len(rows), dtype=torch.promote_types(next(model.parameters()).dtype, torch.float32))
    context = reference_model(model) if hasattr(model, "disable_adapter") else _eval_no_grad(model)
    with context:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(list(chunk), pad_id).items()}
            out[start : start + len(chunk)] = sequence_logps(model, batch, chunk_size=chunk_size).cpu()
    return out


@contextmanager
def _eval_no_grad(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------ batches


def pair_batch(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of the chosen rows followed by the rejected rows (one forward for both, as TRL
    does); split the (2B,) log-probs with `.chunk(2)`."""
    chosen = [{"input_ids": r["chosen_input_ids"], "labels": r["chosen_labels"]} for r in rows]
    rejected = [{"input_ids": r["rejected_input_ids"], "labels": r["rejected_labels"]} for r in rows]
    return collate(chosen + rejected, pad_id)


def _rows(rows: Sequence[dict], prefix: str) -> list[dict]:
    return [{"input_ids": r[f"{prefix}input_ids"], "labels": r[f"{prefix}labels"]} for r in rows]


def _reference(model, rows, keys, batch, chunk_size):
    """Precomputed reference log-probs when the rows carry them, else the adapter-disabled forward."""
    if all(k in rows[0] for k in keys):
        dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
        return torch.tensor([r[k] for k in keys for r in rows], device=batch["input_ids"].device, dtype=dtype)
    return reference_logps(model, batch, chunk_size=chunk_size)


def objective_loss(
    model,
    rows: Sequence[dict],
    objective: str,
    pad_id: int,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    chunk_size: int = 1024,
) -> PreferenceLoss:
    """The loss of one micro-batch of prepared rows (preference_data) under `objective` (dpo, kto, orpo).

    Rows carrying `ref_*` columns (from `attach_reference`) use them; otherwise the reference is the
    adapter-disabled forward on this batch."""
    device = next(model.parameters()).device
    if objective in ("dpo", "orpo"):
        batch = {k: v.to(device) for k, v in pair_batch(rows, pad_id).items()}
        if objective == "dpo":
            ref_c, ref_r = _reference(model, rows, ("ref_chosen", "ref_rejected"), batch, chunk_size).chunk(2)
            policy_c, policy_r = sequence_logps(model, batch, chunk_size=chunk_size).chunk(2)
            return dpo_loss(policy_c, policy_r, ref_c, ref_r, beta)
        sums = sequence_logps(model, batch, chunk_size=chunk_size)
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
        n = len(rows)
        nll = -sums[:n].sum() / counts[:n].sum()  # the SFT loss on the chosen answers (token mean)
        means = sums / counts.clamp(min=1)
        return orpo_loss(means[:n], means[n:], nll, beta)
    if objective == "kto":
        batch = {k: v.to(device) for k, v in collate(_rows(rows, ""), pad_id).items()}
        kl_batch = {k: v.to(device) for k, v in collate(_rows(rows, "kl_"), pad_id).items()}
        ref = _reference(model, rows, ("ref",), batch, chunk_size)
        ref_kl = _reference(model, rows, ("ref_kl",), kl_batch, chunk_size)
        with torch.no_grad():
            kl = kto_kl(sequence_logps(model, kl_batch, chunk_size=chunk_size), ref_kl)
        labels = torch.tensor([bool(r["label"]) for r in rows], device=device)
        policy = sequence_logps(model, batch, chunk_size=chunk_size)
        return kto_loss(policy, ref, labels, kl, beta, desirable_weight, undesirable_weight)
    raise ConfigError(
        f"unknown preference objective {objective!r}; expected one of {', '.join(OBJECTIVES[1:])}"
    )


def attach_reference(
    model, rows: list[dict], objective: str, pad_id: int, *, batch_size: int = 4, chunk_size: int = 1024
) -> None:
    """`precompute_reference`: the reference log-probs of every row, once, before training, stored in
    the rows (ref_chosen/ref_rejected for DPO, ref/ref_kl for KTO). ORPO has no reference."""
    columns = {
        "dpo": (("chosen_", "ref_chosen"), ("rejected_", "ref_rejected")),
        "kto": (("", "ref"), ("kl_", "ref_kl")),
    }.get(objective, ())
    for prefix, key in columns:
        values = precompute_reference(
            model, _rows(rows, prefix), pad_id, batch_size=batch_size, chunk_size=chunk_size
        )
        for row, value in zip(rows, values.tolist()):
            row[key] = value
