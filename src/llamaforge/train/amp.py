"""Mixed precision owned by the recipe, through torch's public AMP API.

accelerate keeps one process-wide state, and refuses a second `Accelerator` with another
`mixed_precision` in the same process (tests, sweeps). So the `Accelerator` is always made with the
same process-level settings (train/launch.py) and the recipe applies its own precision here:
`torch.autocast` for bf16/fp16, and for fp16 a `torch.amp.GradScaler` (scale the loss, unscale before
clipping, skip the update when a gradient is inf/nan and lower the scale). Under DeepSpeed the engine
owns precision (its config's fp16/bf16 sections): autocast and scaling are left to it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """One run's precision ("bf16", "fp16", "fp32", already resolved by device.resolve_precision).

    `autocast()` around forwards, `backward(loss)`, then `unscale_and_clip(...)` and `step(optimizer)`
    once per optimizer step. `accelerator` carries the backward of the launch (DDP, DeepSpeed) and the
    gradient-norm clipping that knows sharded (DTensor) gradients; `delegated`: DeepSpeed rules precision.
    """

    def __init__(self, precision: str, device: torch.device, accelerator, *, delegated: bool = False):
        if precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be resolved to bf16, fp16 or fp32, not {precision!r}")
        self.precision, self.device, self.delegated = precision, device, delegated
        self.accelerator = accelerator
        owned = precision == "fp16" and not delegated
        self.scaler: torch.amp.GradScaler | None = torch.amp.GradScaler(device.type) if owned else None
        self.skipped_steps = 0  # fp16 updates skipped for an inf/nan gradient

    def autocast(self) -> AbstractContextManager:
        """The forward's autocast for this precision (none for fp32 or under DeepSpeed)."""
        if self.delegated or self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through the launch's wrapper; fp16 scales the loss first so small gradients survive."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            self.accelerator.backward(loss)

    def unscale_and_clip(self, optimizer, parameters, max_norm: float) -> float | None:
        """The gradients back at their true scale, clipped to `max_norm`; their norm before clipping
        (inf/nan on an fp16 overflow, None under DeepSpeed, which clips inside its step)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        return None if norm is None else float(norm)

    def step(self, optimizer) -> bool:
        """The optimizer update; False when fp16's scaler skipped it (an inf/nan gradient) and lowered
        the scale. The schedule and the step count advance either way, as with any loss scaler."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        stepped = self.scaler.get_scale() >= before
        self.skipped_steps += not stepped
        return stepped
