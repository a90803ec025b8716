"""QLoRA's 4-bit NF4 base through torchao, for machines where bitsandbytes cannot run.

Each decoder Linear (lm_head excepted, as bitsandbytes does) keeps its weight as a torchao
`NF4Tensor` (4-bit codes, double-quantised block scales) and computes with `linear_nf4`, whose
backward dequantises the weight again, so only the activations' gradient flows and the base stays
frozen. The layer is still an `nn.Linear`: peft wraps it with its plain LoRA layer, and the adapter
it saves is the same as on a bitsandbytes base. Adapters are merged into the unquantised base
(export/merge.py loads it without quantisation), never into these weights.

torchao needs block sizes that divide the tensor: the weight's element count by the block size, and
the block count by the scaler block size (hidden 576 takes 64/64, not the default 64/256), so both
are chosen per layer.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

BLOCK_SIZES = (64, 32, 16)  # elements per absmax block; 64 is QLoRA's (and bitsandbytes') choice
SCALER_BLOCK_SIZES = (256, 128, 64, 32, 16, 8, 4, 2, 1)  # absmax values per double-quantisation block


def torchao_nf4_available() -> bool:
    try:
        from torchao.quantization import to_nf4  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is as good as none
        return False
    return True


def block_sizes(numel: int) -> tuple[int, int] | None:
    """(block_size, scaler_block_size) that torchao accepts for a tensor of `numel` elements, or None."""
    for block in BLOCK_SIZES:
        if numel % block == 0:
            blocks = numel // block
            scaler = next(s for s in SCALER_BLOCK_SIZES if blocks % s == 0)
            return block, scaler
    return None


def _linear_nf4():
    try:  # torchao 0.18 keeps it with the tensor; earlier releases had it in torchao.dtypes
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
    except ImportError:
        from torchao.dtypes.nf4tensor import linear_nf4
    return linear_nf4


class NF4Linear(nn.Linear):
    """A frozen Linear whose weight is an NF4Tensor; forward (and backward, for the input's gradient)
    dequantises the weight for the matmul and lets it go."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NF4Linear | None:
        from torchao.quantization import to_nf4

        sizes = block_sizes(linear.weight.numel())
        if sizes is None:
            return None
        weight = linear.weight.detach()
        with torch.device("meta"):
            new = cls(
                linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=weight.dtype
            )
        new.weight = nn.Parameter(to_nf4(weight.contiguous(), *sizes), requires_grad=False)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _linear_nf4()(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.get_original_weight()


def quantize_nf4(model: nn.Module, *, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace the model's Linear layers by NF4Linear in place; returns how many were quantised."""
    if not torchao_nf4_available():
        from llamaforge.errors import ConfigError

        raise ConfigError("model.quantization_backend=torchao needs torchao (pip install torchao)")
    done, left = 0, []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, NF4Linear):
            continue
        if name.split(".")[-1] in skip:
            continue
        new = NF4Linear.from_linear(module)
        if new is None:
            left.append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        done += 1
    if left:
        log.warning(
            "kept %d Linear layers unquantised (sizes no NF4 block divides): %s",
            len(left),
            ", ".join(left[:5]),
        )
    return done


def is_nf4_model(model: nn.Module) -> bool:
    return any(isinstance(m, NF4Linear) for m in model.modules())


def prepare_nf4_for_training(model: nn.Module) -> nn.Module:
    """What peft's prepare_model_for_kbit_training does for bitsandbytes, without its fp32 cast, which
    would dequantise the NF4 weights: freeze everything, keep the other (norm, embedding) weights in fp32."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, NF4Linear):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16):
                setattr(module, name, nn.Parameter(param.detach().float(), requires_grad=False))
    return model
