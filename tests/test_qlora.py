"""QLoRA: LoRA gradients on a 4-bit NF4 base must be those of the dequantised weights.

bitsandbytes on an AVX512-BF16 CPU repacks its 4-bit weights on the first no-grad forward (eval,
generate) and later backward passes then give wrong gradients, with only a warning (DESIGN.md);
`keep_4bit_gradients_exact` prevents it. These tests run eval and generate first, then compare the
LoRA gradients of a training step with a full-precision model holding the dequantised weights.
The same for the torchao NF4 fallback, which also trains and merges through the real recipe.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import chat_rows, write_jsonl
from llamaforge.config import MethodConfig, load_config
from llamaforge.losses import collate, token_loss_sum
from llamaforge.models import bitsandbytes_supports, load_model
from llamaforge.train.adapters import attach_method

CPU = torch.device("cpu")
needs_bnb = pytest.mark.skipif(not bitsandbytes_supports(CPU), reason="bitsandbytes does not run on this CPU")
METHOD = MethodConfig(name="qlora", rank=4, alpha=8, dropout=0)


@pytest.fixture(scope="module")
def tiny64_dir(tmp_path_factory, llama3_tokenizer_dir):
    """A tiny Llama whose linear layers have 64+ inputs: bitsandbytes' CPU repacking (the bug guarded
    here) works on blocks of 64 along the input dimension and fails outright on narrower layers.
    Tied embeddings halve the 128K-vocabulary bulk (the tests' load time)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny64")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def bnb_dequantised(module):
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    return None


def nf4_dequantised(module):
    from llamaforge.quant_nf4 import NF4Linear

    return module.dequantized_weight().float() if isinstance(module, NF4Linear) else None


def randomise_lora_b(model, seed: int = 1) -> None:
    """LoRA starts with B = 0, which leaves A without gradient: give B values so both get one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def reference(model_dir, quantised, dequantise):
    """fp32 model holding the dequantised weights of `quantised`, with the same LoRA weights."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    replaced = 0
    with torch.no_grad():
        for name, module in quantised.get_base_model().named_modules():
            weight = dequantise(module)
            if weight is not None:
                ref.get_submodule(name.removesuffix(".base_layer")).weight.copy_(weight)
                replaced += 1
    assert replaced == 14  # 2 layers x 7 projections; lm_head stays unquantised
    ref = attach_method(ref, MethodConfig(name="lora", rank=METHOD.rank, alpha=METHOD.alpha, dropout=0))
    lora = {k: v for k, v in quantised.state_dict().items() if "lora_" in k}
    result = ref.load_state_dict(lora, strict=False)
    assert not result.unexpected_keys and len(lora) == 28
    return ref


def eval_and_generate(model, tokenizer, batch) -> None:
    """What eval-before-training does to the model: a no-grad forward and a generate."""
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    prompt = tokenizer(["Who are you?"], return_tensors="pt")
    model.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)


def lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    token_loss_sum(model, batch).backward()
    return {n: p.grad.detach().float().flatten() for n, p in model.named_parameters() if p.requires_grad}


def min_cosine(model, ref, batch) -> float:
    got, want = lora_grads(model, batch), lora_grads(ref, batch)
    assert set(got) == set(want) and all(g.abs().sum() > 0 for g in want.values())
    return min(F.cosine_similarity(got[n], want[n], dim=0).item() for n in got)


def sample_batch(tokenizer) -> dict[str, torch.Tensor]:
    rows = []
    for text in ("the quick brown fox jumps over the lazy dog", "seven wizards quietly judge boxing"):
        ids = tokenizer(text)["input_ids"]
        rows.append({"input_ids": ids, "labels": ids})
    return collate(rows, tokenizer.pad_token_id)


@needs_bnb
def test_bitsandbytes_lora_gradients_stay_exact_after_eval_and_generate(tiny64_dir):
    import bitsandbytes as bnb

    model, tokenizer = load_model(str(tiny64_dir), quantization="4bit", quantization_backend="bitsandbytes")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    state = layers[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # NF4 with double quantisation
    assert layers[0].compute_dtype == torch.bfloat16
    model = attach_method(model, METHOD)
    randomise_lora_b(model)
    ref = reference(tiny64_dir, model, bnb_dequantised)  # dequantise before anything can repack
    batch = sample_batch(tokenizer)
    eval_and_generate(model, tokenizer, batch)
    assert min_cosine(model, ref, batch) >= 0.999


def test_torchao_nf4_lora_gradients_match_the_dequantised_reference(tiny64_dir):
    from llamaforge.quant_nf4 import NF4Linear

    model, tokenizer = load_model(str(tiny64_dir), quantization="4bit", quantization_backend="torchao")
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 14 and not isinstance(model.lm_head, NF4Linear)
    assert type(layers[0].weight).__name__ == "NF4Tensor"
    model = attach_method(model, METHOD)
    # rank 4 on q,o (64->64), k,v (64->32), gate,up (64->128), down (128->64), in 2 layers
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 4 * (
        2 * 128 + 2 * 96 + 3 * 192
    )
    randomise_lora_b(model)
    ref = reference(tiny64_dir, model, nf4_dequantised)
    batch = sample_batch(tokenizer)
    eval_and_generate(model, tokenizer, batch)
    assert min_cosine(model, ref, batch) >= 0.999
    # the quantisation is real: the dequantised weights differ from the originals by NF4's rounding
    from transformers import AutoModelForCausalLM

    original = (
        AutoModelForCausalLM.from_pretrained(tiny64_dir, dtype=torch.float32)
        .model.layers[0]
        .mlp.up_proj.weight
    )
    rounded = ref.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight
    assert 0 < (rounded - original).abs().max() < 0.2 * original.abs().max()


def job(tmp_path, model_dir, **extra):
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(16))
    overrides = [
        f"model.source={model_dir}",
        f"data.sources=[{{path: {data}}}]",
        "data.template=llama3",
        "data.val_size=4",
        f"output.dir={tmp_path / 'runs'}",
        "output.name=q",
        "eval.prompts=[Hi]",
        "eval.max_new_tokens=3",
        "train.batch_size=4",
        "train.lr=1e-2",
        "train.warmup_ratio=0",
        "train.precision=fp32",
        "method.name=qlora",
        "method.rank=4",
        "method.alpha=8",
        "method.dropout=0",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


@needs_bnb
def test_recipe_setup_guards_the_4bit_base_before_eval(tmp_path, tiny64_dir):
    """Through the real recipe: setup, eval-before (loss and sample answers), then a training step."""
    import bitsandbytes as bnb

    from llamaforge.train.recipe import FineTuneRecipe

    recipe = FineTuneRecipe(job(tmp_path, tiny64_dir, **{"train.max_steps": 1}))
    recipe.setup()
    base = recipe.model.get_base_model()
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    randomise_lora_b(recipe.model)
    ref = reference(tiny64_dir, recipe.model, bnb_dequantised)
    assert recipe.evaluate()["eval_loss"] > 0
    assert list(recipe.validator.sample_answers()) == ["Hi"]
    batch = collate([recipe.data.train[i] for i in range(4)], recipe.tokenizer.pad_token_id)
    assert min_cosine(recipe.model, ref, batch) >= 0.999
    assert not any(m.support_avx512bf16_for_cpu for m in layers)  # how: the repacking kernel is off


def test_torchao_qlora_trains_through_the_recipe_and_merges_into_the_unquantised_base(tmp_path, tiny64_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llamaforge.export.merge import merge_run
    from llamaforge.train.recipe import run_training

    cfg = job(tmp_path, tiny64_dir, **{"train.max_steps": 3, "model.quantization_backend": "torchao"})
    run_dir, summary = run_training(cfg)
    losses = [
        r["loss"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert json.loads((run_dir / "run.json").read_text())["method"] == "qlora"
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert len([k for k in adapter if "lora_" in k]) == 28
    merged_dir = merge_run(run_dir, tmp_path / "merged")  # loads the adapter with PeftModel.from_pretrained
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny64_dir, dtype=torch.float32)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    delta = (METHOD.alpha / METHOD.rank) * adapter[key.format("B")] @ adapter[key.format("A")]
    assert delta.abs().max() > 0
    # merged = the full-precision base + the LoRA delta (not the NF4-rounded base)
    torch.testing.assert_close(
        merged.model.layers[0].self_attn.q_proj.weight,
        base.model.layers[0].self_attn.q_proj.weight + delta,
        rtol=0,
        atol=1e-6,
    )


def test_backend_choice_and_config():
    from llamaforge.errors import ConfigError
    from llamaforge.models import resolve_quantization_backend

    expected = "bitsandbytes" if bitsandbytes_supports(CPU) else "torchao"
    assert resolve_quantization_backend("auto", CPU) == expected
    assert resolve_quantization_backend("torchao", CPU) == "torchao"
    assert load_config(None, ["model.quantization_backend=torchao"]).model.quantization_backend == "torchao"
    with pytest.raises(ConfigError, match="quantization_backend"):
        load_config(None, ["model.quantization_backend=gptq"])
    with pytest.raises(ConfigError, match="8bit needs bitsandbytes"):
        load_model("/nonexistent-but-never-read", quantization="8bit", quantization_backend="torchao")
