"""`train.batch_size: auto` and `train.gradient_checkpointing: auto`: the validated planner picks the
micro-batch (and checkpointing) that fits a memory budget at the best throughput; gradient
accumulation then makes up the effective batch the job asked for.

Throughput per device kind:
- CUDA: the largest micro-batch that fits (GPU kernels are inefficient on small batches).
- CPU: the smallest micro-batch whose rows carry `CPU_MIN_TOKENS` tokens on average. A CPU matmul is
  about as fast on 64 rows as on 2048 (fp32 at the default model's 576x1536 projections, measured on
  an AMD EPYC AVX2), so larger micro-batches buy almost nothing but memory: the per-micro-batch Python
  and dispatch overhead is what a too-small micro-batch costs.
Gradient checkpointing (~30% more compute) is only turned on when no micro-batch fits without it.

Micro-batch tokens: a length-grouped micro-batch of the longest examples holds several times the tokens
of a typical one, and its activations set the run's peak (the quickstart's RSS: ~1.5 GiB on most steps,
3.9 GiB on the two steps that drew its longest records). On CPU, where tokens past `CPU_MIN_TOKENS` buy
no speed, such a micro-batch is split into smaller ones of at most `CPU_MAX_TOKENS` padded tokens
within the same optimizer step (the same gradient: the loss is normalised over the whole step).
"""

from __future__ import annotations

from dataclasses import dataclass

from llamaforge.planning.arch import Arch
from llamaforge.planning.memory import GiB, Setup, estimate

CPU_MIN_TOKENS = 256
CPU_MAX_TOKENS = 2 * CPU_MIN_TOKENS


def split_applies(cfg, *, sharded: bool = False) -> bool:
    """Only padded rows of the plain token loss are split: a packed row is already its own budget, a
    preference pair's chosen and rejected answers must share a micro-batch, and FSDP and DeepSpeed need
    every process to run as many micro-batches a step as the others."""
    return not (cfg.train.packing or cfg.method.objective != "sft" or sharded)


def micro_tokens_for(cfg, device_type: str, *, sharded: bool = False) -> int | None:
    """`train.micro_batch_tokens` for this job here. auto: a cap on CPU; none on GPUs, whose kernels want
    the largest micro-batch that fits (the planner sizes it from the longest rows already)."""
    setting = cfg.train.micro_batch_tokens
    if not split_applies(cfg, sharded=sharded):
        return None
    if setting == "auto":
        return CPU_MAX_TOKENS if device_type == "cpu" else None
    return setting


def capped_peak(arch: Arch, setup: Setup, micro_tokens: int | None) -> float:
    """The step peak of `setup.batch` rows of up to `setup.seq` tokens when micro-batches past
    `micro_tokens` padded tokens are split: the worst part is either as many longest rows as the cap
    holds (at least one) or every row at the length the cap allows them."""
    if micro_tokens is None or setup.batch * setup.seq <= micro_tokens:
        return estimate(arch, setup).peak
    long_rows = min(setup.batch, max(1, micro_tokens // setup.seq))
    short_seq = max(1, min(setup.seq, micro_tokens // setup.batch))
    return max(
        estimate(arch, setup.with_(batch=long_rows)).peak,
        estimate(arch, setup.with_(seq=short_seq)).peak,
    )


@dataclass(frozen=True)
class BatchChoice:
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    peak_bytes: float  # the planner's step peak (tensors) at this choice
    budget_bytes: float
    fits: bool
    reason: str
    micro_tokens: int | None = None

    def line(self) -> str:
        split = f", split past {self.micro_tokens} tokens" if self.micro_tokens else ""
        return (
            f"batch: micro-batch {self.micro_batch}{split} x {self.grad_accum} accumulation = "
            f"{self.micro_batch * self.grad_accum} per step and device, gradient checkpointing "
            f"{'on' if self.checkpointing else 'off'} ({self.reason})"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_batch(
    arch: Arch,
    setup: Setup,
    *,
    per_device_batch: int,
    budget_bytes: float,
    mean_tokens: float,
    checkpointing: bool | None = None,
    already_resident: float = 0.0,
    micro_tokens: int | None = None,
) -> BatchChoice:
    """Micro-batch among the divisors of `per_device_batch` (so the effective batch stays exact).

    `setup.seq` is the longest row the data holds (the memory worst case); `mean_tokens` the average
    row, which sets how much work a micro-batch carries. `already_resident` is memory this process
    holds beyond the planner's tensors (interpreter, libraries, the loaded weights counted once).
    `checkpointing` None = auto. `micro_tokens`: the cap past which a micro-batch is split (above).
    """
    options = [False, True] if checkpointing is None else [checkpointing]
    candidates = divisors(per_device_batch)
    budget = budget_bytes - already_resident
    for ckpt in options:
        peaks = {
            b: capped_peak(arch, setup.with_(batch=b, checkpointing=ckpt), micro_tokens) for b in candidates
        }
        fitting = [b for b in candidates if peaks[b] <= budget]
        if not fitting:
            continue
        if setup.device == "cpu":
            enough = [b for b in fitting if b * mean_tokens >= CPU_MIN_TOKENS]
            micro = enough[0] if enough else fitting[-1]
            why = (
                f"CPU: smallest micro-batch with >= {CPU_MIN_TOKENS} tokens on average"
                if enough
                else "CPU: the largest that fits"
            )
        else:
            micro = fitting[-1]
            why = "the largest that fits"
        if ckpt and checkpointing is None:
            why += "; checkpointing needed to fit"
        return BatchChoice(
            micro,
            per_device_batch // micro,
            ckpt,
            peaks[micro],
            budget_bytes,
            True,
            f"{why}; planned peak {_gib(peaks[micro] + already_resident)} of a {_gib(budget_bytes)} budget",
            micro_tokens,
        )
    ckpt = options[-1]
    peak = capped_peak(arch, setup.with_(batch=1, checkpointing=ckpt), micro_tokens)
    return BatchChoice(
        1,
        per_device_batch,
        ckpt,
        peak,
        budget_bytes,
        False,
        f"nothing fits the {_gib(budget_bytes)} budget (micro-batch 1 plans "
        f"{_gib(peak + already_resident)}): expect to run out of memory; try method.name=qlora, "
        "a shorter data.max_length or a larger train.memory_fraction",
        micro_tokens,
    )


def _gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB"
