"""FastDropout: torch dropout's distribution and gradient, cheaper on CPU (train/dropout.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llamaforge.train.dropout import FastDropout, use_fast_dropout


def test_keep_rate_scale_and_gradient_match_dropout():
    torch.manual_seed(0)
    drop = FastDropout(0.1).train()
    x = torch.rand(64, 512, 96) + 0.5  # strictly positive: a zero in the output means dropped
    x.requires_grad_(True)
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.9, abs=2e-3)  # 3.1M draws: sd 1.7e-4
    torch.testing.assert_close(y[kept], x[kept] * drop.scale)
    assert drop.scale == pytest.approx(1 / 0.9, rel=1e-4)
    assert y.sum().item() == pytest.approx(x.sum().item(), rel=2e-3)  # unbiased
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() * drop.scale)
    # each of the 4 lanes cut from one 64-bit word keeps at the same rate (the top lane has 15 bits)
    lanes = kept.reshape(-1, 4).float().mean(0)
    assert (lanes - 0.9).abs().max().item() < 3e-3


def test_seeded_eval_dtype_and_zero_p():
    x = torch.randn(4, 33, 7)
    torch.manual_seed(1)
    a = FastDropout(0.3).train()(x)
    torch.manual_seed(1)
    b = FastDropout(0.3).train()(x)
    assert torch.equal(a, b)
    assert torch.equal(FastDropout(0.3).eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    assert FastDropout(0.3).train()(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dropout probability"):
        FastDropout(1.0)


def test_attach_method_swaps_every_lora_dropout(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from llamaforge.config import MethodConfig
    from llamaforge.train.adapters import attach_method

    model = attach_method(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        MethodConfig(name="lora", rank=4, dropout=0.05, targets="all-linear"),
    )
    layers = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)]
    assert len(layers) == 2 * 7
    assert all(isinstance(m.lora_dropout["default"], FastDropout) for m in layers)
    assert use_fast_dropout(model) == 0  # nothing left to swap
