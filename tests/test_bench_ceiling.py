"""bench/step_ceiling.py: its list of a LoRA step's GEMMs is the whole of the bench's useful-FLOP formula."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.fixture()
def step_ceiling():
    """The bench module, imported without keeping the offline/CPU-only environment it sets for its runs."""
    saved = dict(os.environ)
    import step_ceiling

    os.environ.clear()
    os.environ.update(saved)
    return step_ceiling


def test_padding_free_gemms_are_exactly_the_useful_flops(tiny_llama_dir, step_ceiling):
    """Every term of model_flops (frozen linears, LoRA, attention, lm_head at targets) comes from a GEMM
    the ceiling times, and nothing else: a missing or extra product breaks the equality."""
    from train_throughput import model_flops

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    rank = 4
    model = get_peft_model(
        AutoModelForCausalLM.from_config(config),
        LoraConfig(r=rank, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    arch = step_ceiling.arch_of(config, rank, chunk=5)
    lengths, targets = [7, 12, 3], 13  # 13 targets: three lm_head chunks of 5, 5 and 3
    seconds, flops = step_ceiling.step_parts(
        sum(lengths), [(1, n) for n in lengths], targets, arch, repeats=1
    )
    counts = {
        "real_tokens": sum(lengths),
        "target_tokens": targets,
        "trainable_params": trainable,
        "sum_n_n1": sum(n * (n + 1) for n in lengths),
    }
    assert sum(flops.values()) == model_flops(str(tiny_llama_dir), counts)
    assert set(seconds) == set(step_ceiling.PARTS) and all(s > 0 for s in seconds.values())
