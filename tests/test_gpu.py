"""What only a CUDA GPU can check: bitsandbytes NF4 QLoRA gradients on the device, paged AdamW through
the recipe, packing through flash-attention's varlen path, and the precision resolved on the real device.

All `gpu`-marked and skipped with the reason on a machine without CUDA; `bench/gpu_check.sh` runs them
(`pytest -m gpu`) on a lent GPU machine.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import test_qlora
from conftest import chat_rows, step_losses, write_jsonl
from llamaforge.config import load_config
from llamaforge.device import choose_precision
from test_qlora import METHOD, bnb_dequantised, lora_grads, randomise_lora_b, reference, sample_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (run bench/gpu_check.sh there)"
    ),
]
CUDA = torch.device("cuda")
tiny64_dir = test_qlora.tiny64_dir  # the fixture: a tiny Llama with 64-wide layers, as bitsandbytes needs


def job(tmp_path, model_dir, **extra):
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(16))
    overrides = [
        f"model.source={model_dir}",
        f"data.sources=[{{path: {data}}}]",
        "data.template=llama3",
        "data.val_size=0",
        f"output.dir={tmp_path / 'runs'}",
        "output.name=gpu",
        "eval.before_after=false",
        "eval.prompts=[]",
        "train.batch_size=4",
        "train.max_steps=4",
        "train.lr=1e-2",
        "train.warmup_ratio=0",
        "method.dropout=0",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def test_the_precision_is_resolved_on_the_real_device(tmp_path, tiny_llama_dir):
    from llamaforge.train.recipe import FineTuneRecipe

    major, _ = torch.cuda.get_device_capability()
    choice = choose_precision("auto", CUDA)
    assert choice.precision == ("bf16" if major >= 8 else "fp16")
    assert torch.cuda.get_device_name() in choice.reason
    recipe = FineTuneRecipe(job(tmp_path, tiny_llama_dir, **{"train.max_steps": 1}))
    recipe.setup()
    assert recipe.precision == choice.precision
    assert recipe.amp.precision == choice.precision  # the recipe casts; accelerate's state stays "no"
    assert recipe.accelerator.mixed_precision == "no"
    assert (recipe.amp.scaler is not None) is (choice.precision == "fp16")
    assert next(recipe.model.parameters()).device.type == "cuda"
    recipe.train()
    recipe.cleanup()


def test_bitsandbytes_nf4_lora_gradients_on_cuda_match_the_dequantised_reference(tiny64_dir):
    import bitsandbytes as bnb

    from llamaforge.models import load_model
    from llamaforge.train.adapters import attach_method

    model, tokenizer = load_model(str(tiny64_dir), quantization="4bit", quantization_backend="bitsandbytes")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and layers[0].weight.device.type == "cuda"
    assert layers[0].weight.quant_state.quant_type == "nf4"
    model = attach_method(model, METHOD)
    randomise_lora_b(model)
    ref = reference(tiny64_dir, model, bnb_dequantised).to(CUDA)
    batch = {k: v.to(CUDA) for k, v in sample_batch(tokenizer).items()}
    got, want = lora_grads(model, batch), lora_grads(ref, batch)
    assert set(got) == set(want) and all(g.abs().sum() > 0 for g in want.values())
    # the 4-bit model computes in bf16, the reference in fp32: close in direction, not bit-equal
    assert min(F.cosine_similarity(got[n], want[n], dim=0).item() for n in got) >= 0.995


def test_qlora_with_paged_adamw_8bit_trains_through_the_recipe(tmp_path, tiny64_dir):
    from llamaforge.train.recipe import FineTuneRecipe

    cfg = job(
        tmp_path,
        tiny64_dir,
        **{
            "method.name": "qlora",
            "method.rank": 4,
            "method.alpha": 8,
            "model.quantization": "4bit",
            "train.optimizer": "paged_adamw_8bit",
        },
    )
    recipe = FineTuneRecipe(cfg)
    recipe.setup()
    recipe.train()
    adapter = recipe.save()
    recipe.cleanup()
    losses = step_losses(recipe.run_dir)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    optimizer = getattr(recipe.optimizer, "optimizer", recipe.optimizer)  # accelerate wraps it
    states = [s for s in optimizer.state.values() if "state1" in s]
    assert states and all(s["state1"].dtype == torch.uint8 for s in states)
    assert (adapter / "adapter_model.safetensors").is_file()


def test_packing_through_flash_attention_varlen_keeps_examples_apart(tmp_path, tiny64_dir):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed: the varlen path is not available")
    from llamaforge.models import load_model
    from llamaforge.train.packing import verify_packing
    from llamaforge.train.recipe import FineTuneRecipe

    model, _ = load_model(str(tiny64_dir), dtype=torch.bfloat16, attn_implementation="flash_attention_2")
    verify_packing(model.to(CUDA), flatten=True)  # raises if packed examples see each other
    cfg = job(
        tmp_path,
        tiny64_dir,
        **{
            "method.name": "lora",
            "model.dtype": "bfloat16",
            "model.attn_implementation": "flash_attention_2",
            "train.packing": "true",
            "train.pack_length": 128,
        },
    )
    recipe = FineTuneRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    losses = step_losses(recipe.run_dir)
    assert len(losses) == 4 and losses[-1] < losses[0]
