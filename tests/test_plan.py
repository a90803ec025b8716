"""`llamaforge plan`: parameter counts, the activation bill, scaling of the estimates, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from llamaforge.planning.activations import Precision, layer_bytes
from llamaforge.planning.arch import Arch, load_arch, shipped_archs
from llamaforge.planning.memory import GiB, Setup, estimate, largest_fitting
from llamaforge.planning.throughput import flops_per_token

TINY = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=256,
)


def tiny_model(layers: int = 2, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "num_hidden_layers": layers, **overrides})
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


# ------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize(
    "name, total",
    [
        ("llama3-8b", 8_030_261_248),
        ("llama3-70b", 70_553_706_496),
        ("llama3-405b", 405_853_388_800),
        ("llama3.2-1b", 1_235_814_400),
        ("llama3.2-3b", 3_212_749_824),
        ("smollm2-135m", 134_515_008),
    ],
)
def test_shipped_configs_match_published_parameter_counts(name, total):
    assert load_arch(name).total_params == total


def test_all_six_architectures_ship():
    assert {"llama3-8b", "llama3-70b", "llama3-405b", "llama3.2-1b", "llama3.2-3b", "smollm2-135m"} <= set(
        shipped_archs()
    )


@pytest.mark.parametrize("name", ["llama3-8b", "smollm2-135m", "llama3.2-1b"])
def test_shipped_config_builds_the_same_model_in_transformers(name):
    from importlib import resources

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((resources.files("llamaforge") / "assets" / "archs" / f"{name}.json").read_text())
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    assert sum(p.numel() for p in model.parameters()) == load_arch(name).total_params


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True}, {"head_dim": 32}],
)
def test_random_config_count_equals_numel(overrides):
    model = tiny_model(**overrides)
    arch = Arch.from_config(model.config.to_dict())
    assert arch.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], "attention"])
@pytest.mark.parametrize("dora", [False, True])
def test_lora_count_equals_peft(targets, dora):
    from peft import LoraConfig, get_peft_model

    peft_targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if targets == "attention" else targets
    model = get_peft_model(tiny_model(), LoraConfig(r=8, target_modules=peft_targets, use_dora=dora))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    arch = Arch.from_config(model.config.to_dict())
    assert arch.lora_params(8, targets, dora=dora) == trainable


def test_unknown_model_and_targets_are_explained(tmp_path):
    from llamaforge.errors import ConfigError

    with pytest.raises(ConfigError, match="llama3-8b"):
        load_arch("llama-9000")
    with pytest.raises(ConfigError, match="all-linear"):
        load_arch("llama3-8b").lora_params(8, ["mlp"])
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert load_arch(str(tmp_path)).hidden == 64


def test_hub_ids_and_catalog_names_map_to_shipped_architectures():
    assert load_arch("meta-llama/Meta-Llama-3-8B-Instruct").name == "llama3-8b"
    assert load_arch("meta-llama/Llama-3.3-70B-Instruct").name == "llama3-70b"
    assert load_arch("smollm2-135m-instruct").total_params == 134_515_008


# ------------------------------------------------------------------- activation bill vs autograd


def _saved_bytes(model, ids, autocast: bool) -> int:
    """Bytes of distinct storages autograd saves for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        model(input_ids=ids, use_cache=False)
    return sum(seen.values())


def _build(method: str, dtype: torch.dtype, layers: int, dropout: float, tmp_path):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
        from transformers import BitsAndBytesConfig, LlamaForCausalLM

        folder = tmp_path / f"q{layers}"
        tiny_model(layers).save_pretrained(folder)
        model = LlamaForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
        )
        from llamaforge.models import keep_4bit_gradients_exact

        keep_4bit_gradients_exact(model)
    else:
        model = tiny_model(layers).to(dtype)
    if method != "full":
        from peft import LoraConfig, get_peft_model

        from llamaforge.train.dropout import use_fast_dropout

        model = get_peft_model(model, LoraConfig(r=8, lora_dropout=dropout, target_modules="all-linear"))
        use_fast_dropout(model)  # as attach_method does: bool masks
    return model.train()


@pytest.mark.parametrize(
    "method, dtype, dropout",
    [
        ("full", torch.float32, 0.0),
        ("full", torch.bfloat16, 0.0),
        ("lora", torch.float32, 0.05),
        ("lora", torch.bfloat16, 0.0),
        ("qlora", torch.float32, 0.05),
    ],
)
def test_layer_bill_matches_what_autograd_saves(method, dtype, dropout, tmp_path):
    """One decoder layer's saved tensors (model with 3 layers minus model with 2) equal the bill."""
    ids = torch.randint(0, TINY["vocab_size"], (2, 48))
    measured = [_saved_bytes(_build(method, dtype, n, dropout, tmp_path), ids, True) for n in (2, 3)]
    one_layer = measured[1] - measured[0]
    arch = Arch.from_config(TINY)
    prec = Precision(4 if dtype == torch.float32 else 2, 2, True, "cpu")
    modules = [] if method == "full" else arch.lora_modules("all-linear")
    expected = ids.numel() * sum(
        layer_bytes(arch, method, prec, lora_modules=modules, rank=8, dropout=dropout).values()
    )
    if dtype == torch.float32 and method != "qlora":
        expected += 2 * arch.layer_linear_params  # bf16 copies of the weights, kept for backward
    if method != "full":
        expected += 2 * arch.lora_params(8, "all-linear") // arch.layers  # cached casts of the adapters
    assert one_layer == pytest.approx(expected, rel=0.02)


# --------------------------------------------------------------------------- scaling and fitting


def _setup(**kw) -> Setup:
    base = dict(batch=1, seq=2048, weights_dtype="bfloat16", dropout=0.0)
    base.update(kw)
    return Setup(**base)


def test_qlora_below_lora_below_full():
    arch = load_arch("llama3-8b")
    full = estimate(arch, _setup(method="full", weights_dtype="float32")).peak
    lora = estimate(arch, _setup(method="lora")).peak
    qlora = estimate(arch, _setup(method="qlora")).peak
    assert qlora < lora < full


def test_checkpointing_lowers_activations_and_peak():
    arch = load_arch("llama3-8b")
    for method in ("full", "lora", "qlora"):
        off = estimate(arch, _setup(method=method, batch=4))
        on = estimate(arch, _setup(method=method, batch=4, checkpointing=True))
        assert on.activations < off.activations / 4
        assert on.peak <= off.peak


def test_sharding_divides_model_states_by_gpus():
    arch = load_arch("llama3-70b")
    setup = _setup(method="full", weights_dtype="float32", checkpointing=True)
    for strategy in ("fsdp", "zero3"):
        one, eight = (
            estimate(arch, setup, strategy=strategy, gpus=1),
            estimate(arch, setup, strategy=strategy, gpus=8),
        )
        assert eight.weights == pytest.approx(one.weights / 8)
        assert eight.optimizer == pytest.approx(one.optimizer / 8)
        assert eight.gradients == pytest.approx(one.gradients / 8)
        assert eight.activations == one.activations  # the micro-batch is per GPU
        assert eight.peak < one.peak / 4
    ddp8 = estimate(arch, setup, strategy="ddp", gpus=8)
    assert ddp8.weights == estimate(arch, setup).weights  # DDP replicates


def test_activations_scale_with_tokens_and_8bit_optimizer_shrinks_state():
    arch = load_arch("llama3.2-1b")
    a = estimate(arch, _setup(method="full", batch=1)).activations
    b = estimate(arch, _setup(method="full", batch=4)).activations
    assert b == pytest.approx(4 * a, rel=0.02)
    adam = estimate(arch, _setup(method="full", weights_dtype="float32")).optimizer
    adam8 = estimate(arch, _setup(method="full", weights_dtype="float32", optimizer="adamw8bit")).optimizer
    assert adam8 == pytest.approx(adam * 2.03 / 8, rel=0.01)


def test_largest_fitting_is_the_boundary():
    arch, cap = load_arch("llama3-8b"), 24 * GiB
    setup = _setup(method="qlora", seq=1024, checkpointing=True)
    best = largest_fitting(arch, setup, cap, what="batch")
    assert best > 1
    assert (
        estimate(arch, setup.with_(batch=best)).peak <= cap < estimate(arch, setup.with_(batch=best + 1)).peak
    )
    seq = largest_fitting(arch, setup.with_(batch=1), cap, what="seq")
    assert seq % 64 == 0 and estimate(arch, setup.with_(batch=1, seq=seq)).peak <= cap


def test_published_ballparks():
    """Within sight of the well-known tables (HF Llama 3.1 blog, LLaMA-Factory, Unsloth) at batch 1 x 512."""

    def peak(name, method, **kw):
        dtype = "float32" if method == "full" else "bfloat16"
        setup = Setup(method=method, batch=1, seq=512, checkpointing=True, weights_dtype=dtype, **kw)
        return estimate(load_arch(name), setup).peak / GiB

    assert 14 < peak("llama3-8b", "lora") < 22  # HF 16 GB, LLaMA-Factory 16 GB (7B), Unsloth 22 GB
    assert 5 < peak("llama3-8b", "qlora") < 9  # HF 6 GB, Unsloth 6 GB
    assert 120 < peak("llama3-8b", "full", adam_impl="fused") < 150  # LLaMA-Factory AMP 18x = 144 GB
    assert 130 < peak("llama3-70b", "lora") < 170  # HF 160 GB, Unsloth 164 GB
    assert 38 < peak("llama3-70b", "qlora") < 50  # HF 48 GB, Unsloth 41 GB


def test_flops_per_token():
    arch = load_arch("llama3-8b")
    n, attn = arch.matmul_params, 12 * arch.layers * arch.q_dim * 1024
    assert flops_per_token(arch, "full", 1024) == 6 * n + attn
    assert flops_per_token(arch, "lora", 1024, adapter_params=0) == 4 * n + attn
    assert flops_per_token(arch, "full", 1024, checkpointing=True) > flops_per_token(arch, "full", 1024)


# -------------------------------------------------------------------------------------------- CLI


def _cli(capsys, *argv) -> str:
    from llamaforge.cli import main

    assert main(["plan", *argv]) == 0
    return capsys.readouterr().out


def test_cli_8b_on_24gb(capsys):
    out = _cli(
        capsys, "--model", "llama3-8b", "--gpu", "24GB", "--tokens", "2e6", "--price-per-gpu-hour", "0.5"
    )
    assert "llama3-8b (8.03B params) on 1 x 24 GiB" in out
    for method in ("full", "lora", "qlora"):
        assert out.count(f"\n{method:6} ") == 2  # with and without checkpointing
    assert "recommended: lora + gradient checkpointing" in out
    assert "per epoch" in out and "$" in out


def test_cli_json_70b_on_80gb(capsys):
    plan = json.loads(
        _cli(
            capsys,
            "--model",
            "llama3-70b",
            "--gpu",
            "A100-80GB",
            "--json",
            "--tokens",
            "1e7",
            "--batch-size",
            "1",
            "--seq-len",
            "2048",
        )
    )
    assert plan["hardware"]["tflops"] == 312 and plan["hardware"]["precision"] == "bf16"
    assert plan["recommendation"]["method"] == "qlora"
    assert not any(r["fits"] for r in plan["methods"]["lora"]["rows"])
    assert plan["methods"]["full"]["rows"][1]["min_gpus_fsdp"] > 8
    assert plan["time"]["qlora"]["epoch_hours"] > 0


def test_cli_several_gpus_shows_each_strategy(capsys):
    plan = json.loads(
        _cli(capsys, "--model", "llama3-8b", "--gpu", "H100", "--gpus", "8", "--json", "--tokens", "5e8")
    )
    row = plan["methods"]["full"]["rows"][1]
    assert set(row["peak_gib"]) == {"ddp", "fsdp", "zero3"}
    assert row["peak_gib"]["fsdp"] < row["peak_gib"]["ddp"]
    assert plan["recommendation"]["method"] == "full"  # fits sharded, and 500M tokens


def test_cli_job_file_tokens_from_data(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": "x" * 396, "output": "y" * 400}) + "\n" for _ in range(100))
    )
    job = tmp_path / "job.yaml"
    job.write_text(
        f"data:\n  sources: [{{path: {data}}}]\n  val_size: 0\n  max_length: 512\n"
        "model:\n  source: smollm2-135m-instruct\n"
    )
    plan = json.loads(_cli(capsys, str(job), "train.batch_size=2", "--gpu", "L4", "--json"))
    assert plan["model"]["name"] == "smollm2-135m"
    assert plan["settings"]["batch_size"] == 2 and plan["settings"]["seq_len"] == 512
    assert plan["data"]["tokens_per_epoch"] == pytest.approx(100 * (796 / 4 + 10))


def test_cli_rejects_unknown_gpu(capsys):
    from llamaforge.cli import main

    assert main(["plan", "--model", "llama3-8b", "--gpu", "TPU9"]) == 2
    assert "GPU name" in capsys.readouterr().err


def test_cli_on_this_cpu(capsys):
    plan = json.loads(_cli(capsys, "--model", "smollm2-135m", "--tokens", "1e5", "--json"))
    assert plan["hardware"]["device"] == "cpu" and plan["hardware"]["tflops"] > 0
    assert plan["hardware"]["precision"] == plan["settings"]["precision"]  # the resolved one, with its peak
    assert set(plan["settings"]["strategies"]) == {"ddp"}
    assert plan["recommendation"]["method"] in ("lora", "qlora", "full")
    assert all(plan["time"][m]["epoch_hours"] > 0 for m in ("full", "lora", "qlora"))
