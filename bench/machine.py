"""What a benchmark ran on, in one line above its table and one record in its JSON.

A number without its machine is not a result: bf16 is ~2x fp32 on an AVX512-BF16 CPU and ~100x slower
on an AVX2 one, so every bench states the CPU (or GPU), its ISA level, whether it has bf16 instructions,
the cores it used, torch's version, the precision chosen with its reason (llamaforge.device, the same
resolution every command uses) and the matmul peak of *that* precision, best of short bursts
(llamaforge.hardware.peak_flops), which MFU is measured against.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Machine:
    device: str  # "cpu" or "cuda"
    processor: str  # CPU model, or the GPU's name
    isa: str  # torch's CPU ISA level (+AVX512-BF16/AMX), or the GPU's compute capability
    bf16_instructions: bool
    cores: int  # torch threads this process uses
    usable_cores: int
    torch: str
    precision: str | None
    precision_reason: str | None
    precision_warning: str | None
    peak_gflops: float | None  # matmul peak of `precision`, best of short bursts
    load_avg_1m: float | None
    when: str

    def line(self) -> str:
        parts = [
            f"{self.processor} ({self.isa}",
            f"bf16 instructions {'yes' if self.bf16_instructions else 'no'}",
        ]
        if self.device == "cpu":
            parts.append(f"{self.cores} of {self.usable_cores} usable cores")
        head = ", ".join(parts) + f"), torch {self.torch}"
        if self.precision:
            head += f"; precision {self.precision} ({self.precision_reason})"
        if self.peak_gflops:
            head += f"; {self.precision} matmul peak {self.peak_gflops:,.0f} GFLOP/s (best of short bursts)"
        if (
            self.load_avg_1m is not None
            and self.device == "cpu"
            and self.load_avg_1m >= self.usable_cores + 0.5
        ):
            head += f"; LOAD {self.load_avg_1m:.1f}: cores shared, timings not representative"
        return "machine: " + head

    def record(self) -> dict:
        return {**asdict(self), "line": self.line()}


def cuda_peak_flops(dtype_name: str, seconds: float = 1.0, n: int = 8192) -> float:
    """Best-of-bursts rate of an n^3 product on the current GPU (each burst timed with CUDA events)."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best, deadline = 0.0, time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < deadline:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = max(best, 2.0 * n**3 / max(start.elapsed_time(end) / 1e3, 1e-9))
    return best


def describe(
    precision: str | None = "auto",
    *,
    device: str | None = None,
    peak: bool = True,
    peak_seconds: float = 1.0,
    asked_by: str = "asked for on the command line",
) -> Machine:
    """The machine as this process sees it. `precision`: auto/bf16/fp32/fp16 is resolved as training
    would resolve it (and its peak measured when `peak`); None for benches that do no tensor math.
    An explicit precision that is also what `auto` picks is described with auto's reason."""
    import torch

    from llamaforge.device import choose_precision
    from llamaforge.hardware import configure_threads, cpu_info, peak_flops, usable_cores

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":
        configure_threads()  # as every command does: the usable cores, or OMP_NUM_THREADS
    choice = choose_precision(precision, dev) if precision else None
    if choice and precision != "auto":
        auto = choose_precision("auto", dev)
        choice = (
            auto
            if auto.precision == choice.precision
            else replace(choice, reason=choice.reason.replace("set in the config", asked_by))
        )
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        processor, isa, bf16 = (
            torch.cuda.get_device_name(index),
            f"compute capability {major}.{minor}",
            major >= 8,
        )
    else:
        info = cpu_info()
        processor, isa, bf16 = info.model, info.isa, info.bf16_instructions
    rate = None
    if choice and peak:
        flops = (
            cuda_peak_flops(choice.precision, peak_seconds)
            if dev.type == "cuda"
            else peak_flops(choice.precision, peak_seconds)
        )
        rate = round(flops / 1e9, 1)
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return Machine(
        device=dev.type,
        processor=processor,
        isa=isa,
        bf16_instructions=bf16,
        cores=torch.get_num_threads(),
        usable_cores=usable_cores(),
        torch=torch.__version__,
        precision=choice.precision if choice else None,
        precision_reason=choice.reason if choice else None,
        precision_warning=choice.warning if choice else None,
        peak_gflops=rate,
        load_avg_1m=load,
        when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def slow_precision_reason(precision: str, device: str = "cpu") -> str | None:
    """Why `precision` would be pathologically slow here (the warning an explicit choice gets), or None."""
    import torch

    from llamaforge.device import choose_precision

    return choose_precision(precision, torch.device(device)).warning


def plan_precisions(requested: str, allow_slow: bool) -> tuple[list[str], dict[str, str]]:
    """The precisions to run and those skipped with the reason. auto = what this machine resolves, then the
    other of bf16/fp32 (an fp32 table beside a bf16 one; bf16 beside fp32 only where it is not slow)."""
    import torch

    from llamaforge.device import choose_precision

    if requested == "auto":
        resolved = choose_precision("auto", torch.device("cpu")).precision
        wanted = [resolved, "fp32" if resolved == "bf16" else "bf16"]
    else:
        wanted = [p.strip() for p in requested.split(",") if p.strip()]
    run, skipped = [], {}
    for p in dict.fromkeys(wanted):
        if p not in ("bf16", "fp32"):
            raise SystemExit(f"--precision: {p!r} is not one of auto, bf16, fp32 (CPU benches)")
        reason = slow_precision_reason(p) if p == "bf16" else None
        if reason and not allow_slow:
            skipped[p] = reason
        else:
            run.append(p)
    return run, skipped
