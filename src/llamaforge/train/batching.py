"""The batches of a run: the micro-batch size (given, or `auto`: the planner's), each epoch's
micro-batches (length-grouped and padded to the longest in the batch, never to a fixed max length,
or packed), and the collation of one micro-batch, padded (losses.collate) or packed (packing.py)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from llamaforge.config import JobConfig
from llamaforge.errors import ConfigError
from llamaforge.losses import collate
from llamaforge.train.packing import collate_packed, packed_batches

log = logging.getLogger(__name__)


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


def split_by_tokens(idx: list[int], lengths, max_tokens: int | None) -> list[list[int]]:
    """A padded micro-batch as parts of at most `max_tokens` padded tokens (rows x longest row), longest
    rows first; a row longer than the cap is a part of its own. The parts train in the same optimizer
    step, whose loss is normalised over all of them (train/step.py), so the gradient is unchanged; only
    the activations alive at once shrink. Deterministic in its inputs: a resumed run splits alike. A
    packed micro-batch (bins of indices) is left whole: its rows are already sized by pack_length."""
    if max_tokens is None or len(idx) < 2 or isinstance(idx[0], list):
        return [idx]
    if len(idx) * max(lengths[i] for i in idx) <= max_tokens:
        return [idx]
    parts: list[list[int]] = []
    for i in sorted(idx, key=lambda i: lengths[i], reverse=True):
        part = parts[-1] if parts else None
        if part is not None and (len(part) + 1) * lengths[part[0]] <= max_tokens:
            part.append(i)  # rows come longest first: the part's first row is its longest
        else:
            parts.append([i])
    return parts


def resolve_micro_tokens(cfg: JobConfig, device_type: str, *, sharded: bool) -> int | None:
    """`train.micro_batch_tokens` as this run applies it (planning/autobatch.py), written back into
    `cfg.train` so the run's config.yaml says it; a number set where no split applies is refused loudly
    by a warning and dropped."""
    from llamaforge.planning.autobatch import micro_tokens_for, split_applies

    t = cfg.train
    if t.micro_batch_tokens not in ("auto", None) and not split_applies(cfg, sharded=sharded):
        log.warning(
            "train.micro_batch_tokens=%s is ignored: it splits padded rows of the token loss, without "
            "packing, preference objectives, FSDP or DeepSpeed",
            t.micro_batch_tokens,
        )
    t.micro_batch_tokens = micro_tokens_for(cfg, device_type, sharded=sharded)
    return t.micro_batch_tokens


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


def pack_capacity(cfg: JobConfig) -> int | None:
    """Tokens a packed row holds (None: padded rows)."""
    if not cfg.train.packing:
        return None
    if cfg.method.name == "prefix":
        raise ConfigError(
            "train.packing does not work with method prefix: its virtual tokens come through "
            "the cache, which turns off the per-example attention of packed rows"
        )
    return cfg.train.pack_length or cfg.data.max_length


class EpochBatches:
    """The run's micro-batches of each epoch, deterministic in (seed, epoch) so a resumed run replays them.

    Padded: lists of example indices (length-grouped). Packed (`pack_capacity` tokens a row): lists
    of bins of example indices.
    """

    def __init__(self, lengths, batch_size: int, *, seed: int, pack_capacity: int | None = None):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.pack_capacity = pack_capacity

    def __call__(self, epoch: int) -> list[list]:
        if self.pack_capacity is None:
            return length_grouped_batches(self.lengths, self.batch_size, seed=self.seed, epoch=epoch)
        return packed_batches(self.lengths, self.batch_size, self.pack_capacity, seed=self.seed, epoch=epoch)

    def packing_line(self) -> str:
        micro, capacity = self(0), self.pack_capacity
        rows = sum(len(m) for m in micro)
        return (
            f"packing: {len(self.lengths)} examples into {rows} rows of <= {capacity} tokens "
            f"({sum(self.lengths) / (rows * capacity):.0%} full), {len(micro)} micro-batches an epoch"
        )


def derive_grad_accum(t, world: int) -> None:
    """A fixed micro-batch with `effective_batch_size` set: accumulation makes up the effective batch
    (a job saying 8 examples a step, run with `train.batch_size=2`, accumulates 4), rather than the
    effective batch silently becoming batch_size x grad_accum."""
    if t.effective_batch_size is None:
        return
    per_step = t.batch_size * world
    if t.effective_batch_size % per_step:
        raise ConfigError(
            f"train.effective_batch_size={t.effective_batch_size} is not a multiple of train.batch_size="
            f"{t.batch_size} x {world} process(es)"
        )
    accum = t.effective_batch_size // per_step
    if "grad_accum" in t.model_fields_set and t.grad_accum != accum:
        raise ConfigError(
            f"train.grad_accum={t.grad_accum} disagrees with train.effective_batch_size="
            f"{t.effective_batch_size} (= train.batch_size {t.batch_size} x {accum} x {world} process(es)): "
            "set one of them"
        )
    t.grad_accum = accum


def resolve_auto_batch(
    cfg: JobConfig,
    model,
    device,
    precision: str,
    lengths,
    *,
    world: int,
    saved: Path | None,
    say,
    micro_tokens: int | None = None,
) -> dict | None:
    """`batch_size: auto` / `gradient_checkpointing: auto`: the planner's choice for this data on this
    machine (planning/autobatch.py), written into `cfg.train`. `saved`: the config.yaml of the run a
    resume continues, whose resolved choice is replayed. Returns the choice's facts for summary.json
    (None when the batch size was given). `micro_tokens`: the run's split cap (resolve_micro_tokens),
    which the planner counts in the peak."""
    t = cfg.train
    if saved is not None and saved.is_file() and "auto" in (t.batch_size, t.gradient_checkpointing):
        from llamaforge.config import load_config

        before = load_config(str(saved)).train
        t.batch_size, t.grad_accum = before.batch_size, before.grad_accum
        t.gradient_checkpointing = before.gradient_checkpointing
    if t.batch_size != "auto":
        if t.gradient_checkpointing == "auto":
            t.gradient_checkpointing = False
        derive_grad_accum(t, world)
        return None
    from llamaforge.planning.autobatch import choose_batch
    from llamaforge.planning.dry_run import batch_planning_inputs

    effective = t.target_effective_batch()
    if effective % world:
        raise ConfigError(f"train.effective_batch_size={effective} does not split over {world} processes")
    arch, setup, budget, resident, mean_tokens = batch_planning_inputs(cfg, model, device, precision, lengths)
    choice = choose_batch(
        arch,
        setup,
        per_device_batch=effective // world,
        budget_bytes=budget,
        mean_tokens=mean_tokens,
        already_resident=resident,
        checkpointing=None if t.gradient_checkpointing == "auto" else t.gradient_checkpointing,
        micro_tokens=micro_tokens,
    )
    t.batch_size, t.grad_accum = choice.micro_batch, choice.grad_accum
    t.gradient_checkpointing = choice.checkpointing
    t.effective_batch_size = effective
    say(choice.line())
    if not choice.fits:
        log.warning("batch: %s", choice.reason)
    return {
        "micro_batch": choice.micro_batch,
        "grad_accum": choice.grad_accum,
        "gradient_checkpointing": choice.checkpointing,
        "micro_batch_tokens": choice.micro_tokens,
        "planned_peak_gib": round(choice.peak_bytes / 2**30, 2),
        "budget_gib": round(choice.budget_bytes / 2**30, 2),
        "reason": choice.reason,
    }
