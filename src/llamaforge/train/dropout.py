"""LoRA dropout that costs half as much on CPU, and a quarter of the memory.

torch's CPU dropout draws one bernoulli per element into a float noise tensor and keeps that tensor
for backward: on the default model `aten::bernoulli_` was 20% of a LoRA step (torch.profiler, one call
per adapted layer, 210 a step). Here the mask is cut from 64-bit random words, 15 bits per element,
and backward keeps the 1-byte mask. Same distribution, with p rounded to a multiple of 1/32768 and
the scale 1/(1-p) of that rounded p, so the output stays unbiased. On CUDA, and in eval, it is
`nn.functional.dropout` (CUDA's fused dropout is already fast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 1 << 15  # 15 bits per element: torch's int64 random_() leaves the top bit of each word at 0


class _ScaleKept(torch.autograd.Function):
    """x * keep * scale, saving the 1-byte mask (not a float copy of it) for backward. The bool mask is
    multiplied as its uint8 view (the same 0/1 bytes, the same result): torch converts bool to float one
    element at a time and uint8 vectorised, 0.68 vs 0.23 ms for 800 x 576 (AMD EPYC AVX2, 2 cores)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        keep = keep.view(torch.uint8)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def keep_mask(shape: torch.Size, cutoff: int) -> torch.Tensor:
    """Bool mask, each element True with probability 1 - cutoff / 32768, from the CPU generator."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()
    return ((words.view(torch.int16)[:n] & (LEVELS - 1)) >= cutoff).view(shape)


class FastDropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.cutoff = round(p * LEVELS)
        self.scale = 1.0 / (1.0 - self.cutoff / LEVELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cutoff == 0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training)
        return _ScaleKept.apply(x, keep_mask(x.shape, self.cutoff), self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every LoRA layer's nn.Dropout for FastDropout; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            if isinstance(layer, nn.Dropout) and layer.p > 0:
                dropouts[name] = FastDropout(layer.p)
                swapped += 1
    return swapped
