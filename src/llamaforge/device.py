"""Device and precision, one resolution for every command (train, eval, generate, chat, serve, sweep,
plan, benchmarks): CUDA when present, else CPU; the precision is what the hardware does *fast*
(measured, see hardware.py), never what merely runs, and it is printed once with its reason."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from llamaforge.errors import ConfigError

# bf16 must beat fp32 by this factor in the probe to be chosen: autocast adds casts around each matmul.
BF16_MIN_SPEEDUP = 1.15


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # bf16 | fp16 | fp32
    reason: str
    warning: str | None = None  # set when an explicit choice is slow on this hardware

    def line(self) -> str:
        return f"precision: {self.precision} ({self.reason})"


def _cpu_choice(requested: str) -> PrecisionChoice:
    from llamaforge.hardware import cpu_info, probe_cpu_precision

    info = cpu_info()
    probe = probe_cpu_precision(info)
    rates = f"bf16 {probe.bf16_gflops:g} vs fp32 {probe.fp32_gflops:g} GFLOP/s"
    fast = info.bf16_instructions and probe.bf16_gflops >= BF16_MIN_SPEEDUP * probe.fp32_gflops
    if requested == "fp32":
        return PrecisionChoice("fp32", f"set in the config; {rates} on this CPU")
    if requested == "bf16":
        warning = None
        if not fast:
            slowdown = probe.fp32_gflops / max(probe.bf16_gflops, 1e-9)
            why = "no bf16 instructions on this CPU" if not info.bf16_instructions else "bf16 measured slower"
            warning = (
                f"precision bf16 was asked for, but {why} ({rates}): matmuls run ~{slowdown:.1f}x slower "
                "than in fp32; `precision: auto` would pick fp32 here"
            )
        return PrecisionChoice("bf16", f"set in the config; {rates} on this CPU", warning)
    if not info.bf16_instructions:
        return PrecisionChoice("fp32", f"{info.isa} CPU without bf16 instructions: {rates}")
    if not fast:
        return PrecisionChoice("fp32", f"bf16 not measurably faster on this {info.isa} CPU: {rates}")
    return PrecisionChoice("bf16", f"{info.isa} CPU with bf16 instructions: {rates}")


def _cuda_choice(requested: str, device: torch.device) -> PrecisionChoice:
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    ampere = major >= 8
    if requested != "auto":
        warning = None
        if requested == "bf16" and not ampere:
            warning = (
                f"bf16 on {name} (compute capability {major}.{minor}) is emulated and slow; fp16 is native"
            )
        return PrecisionChoice(
            requested, f"set in the config; {name}, compute capability {major}.{minor}", warning
        )
    if ampere:
        return PrecisionChoice("bf16", f"{name}, compute capability {major}.{minor} (Ampere or newer)")
    return PrecisionChoice(
        "fp16", f"{name}, compute capability {major}.{minor} (before Ampere: fp16 with a loss scaler)"
    )


def choose_precision(precision: str, device: torch.device) -> PrecisionChoice:
    """`auto`: bf16 on CUDA Ampere+, fp16 (loss-scaled) before; on CPU bf16 only with bf16 instructions
    (AVX512-BF16 or AMX) and a probe that shows it faster, else fp32. fp16 only on CUDA."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "precision fp16 needs a CUDA GPU (fp16 on CPU is pathologically slow); use auto, bf16 or fp32"
        )
    if device.type == "cuda":
        return _cuda_choice(precision, device)
    return _cpu_choice(precision)


def resolve_precision(precision: str, device: torch.device, *, announce: bool = True) -> str:
    """The precision to run in; the choice and its reason are printed once per process."""
    choice = choose_precision(precision, device)
    if announce or choice.warning:
        from llamaforge.console import say, warn

        say(choice.line(), once=True)
        if choice.warning:
            warn(choice.warning)
    return choice.precision


def autocast_context(device: torch.device, precision: str):
    """Autocast for `precision`; `auto` is resolved (and announced) here, a resolved one passes silently."""
    precision = resolve_precision(precision, device, announce=precision == "auto")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
