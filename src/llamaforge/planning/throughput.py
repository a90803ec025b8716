"""Time and cost: FLOPs per token, a device's bf16 rate and an assumed utilisation (MFU).

FLOPs per trained token (PaLM, Chowdhery et al. 2022, appendix B): 6*N + 12*L*h*s for full
fine-tuning, N = parameters in matmuls (decoder linears + output projection; the embedding lookup
is free), s = sequence length (the attention term). LoRA skips the frozen weights' gradients:
4*N + 12*L*h*s + 6*N_adapter. Gradient checkpointing re-runs the forward: + 2*N + 4*L*h*s.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamaforge.planning.arch import Arch
from llamaforge.planning.memory import objective_passes

GB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense, with fp32 accumulation, from the vendor's data sheet


GPUS = {
    g.name.lower(): g
    for g in [
        GPU("H100", 80, 989),
        GPU("H100-PCIe", 80, 756),
        GPU("H200", 141, 989),
        GPU("B200", 180, 2250),
        GPU("A100-80GB", 80, 312),
        GPU("A100-40GB", 40, 312),
        GPU("L40S", 48, 362),
        GPU("A6000", 48, 155),
        GPU("A10", 24, 125),
        GPU("L4", 24, 121),
        GPU("RTX4090", 24, 165),
        GPU("RTX3090", 24, 71),
        GPU("MI300X", 192, 1307),
    ]
}
GPU_ALIASES = {
    "a100": "a100-80gb",
    "h100-80gb": "h100",
    "h100-sxm": "h100",
    "4090": "rtx4090",
    "3090": "rtx3090",
    "rtx-4090": "rtx4090",
    "rtx-3090": "rtx3090",
}
DEFAULT_MFU = {"cuda": 0.40, "cpu": 0.30}
QLORA_SLOWDOWN = 0.70  # dequantising NF4 weights in every forward and backward: ~30% slower than LoRA


def find_gpu(name: str) -> GPU | None:
    key = name.strip().lower().replace("_", "-")
    key = GPU_ALIASES.get(key, key)
    return GPUS.get(key) or GPUS.get(key.replace("-", ""))


def representative_gpu(memory_gib: float) -> GPU:
    """A common GPU of that memory size, for a time estimate when only the memory was given."""
    preferred = {24: "rtx4090", 40: "a100-40gb", 48: "l40s", 80: "h100", 141: "h200"}
    key = preferred.get(round(memory_gib))
    if key:
        return GPUS[key]
    return min(GPUS.values(), key=lambda g: (abs(g.memory_gib - memory_gib), -g.bf16_tflops))


def flops_per_token(
    arch: Arch,
    method: str,
    seq: int,
    *,
    checkpointing: bool = False,
    adapter_params: int = 0,
    objective: str = "sft",
    precompute_reference: bool = False,
) -> float:
    """Per token of the data (a preference row counts its prompt + answer once): the training passes
    and the forward-only ones (the reference, KTO's KL) of the objective (memory.objective_passes)."""
    n = arch.matmul_params
    attn = 12 * arch.layers * arch.q_dim * seq  # QK^T and AV, forward (4) + backward (8)
    flops = (6 * n if method == "full" else 4 * n + 6 * adapter_params) + attn
    if checkpointing:
        flops += 2 * n + attn / 3
    trained, forward_only = objective_passes(objective, precompute_reference)
    return float(trained * flops + forward_only * (2 * n + attn / 3))
