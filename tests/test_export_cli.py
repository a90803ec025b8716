"""`llamaforge export` on a tiny random Llama (real Llama 3 tokenizer) and a few-step LoRA run.

Tolerances (max |logit difference| against base + adapter through PEFT, logits of std ~0.1 here):
safetensors f32 1e-4 (measured ~1e-6), GGUF f32 1e-4; quantized against the merged model: int8 0.1,
NF4 0.5 (what the quantizers' error allows on random weights), and the reload must equal the model
that was saved exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import chat_rows, write_jsonl
from llamaforge.atomic import MARKER
from llamaforge.catalog import sha256_file
from llamaforge.cli import main
from llamaforge.errors import ModelSourceError
from llamaforge.export.cli_export import export_run
from llamaforge.export.manifest import ExportError, verify_manifest


def _tiny_llama(out: Path, tokenizer_dir: Path) -> Path:
    """Like conftest's tiny Llama but 64 wide: bitsandbytes' CPU 4-bit kernel needs rows of >= 64."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, llama3_tokenizer_dir):
    from llamaforge.config import load_config
    from llamaforge.train.recipe import run_training

    tmp = tmp_path_factory.mktemp("export-run")
    base = _tiny_llama(tmp / "base", llama3_tokenizer_dir)
    data = write_jsonl(tmp / "data.jsonl", chat_rows(20))
    cfg = load_config(
        None,
        [
            f"model.source={base}",
            f"data.sources=[{{path: {data}}}]",
            "data.template=llama3",
            "data.val_size=4",
            f"output.dir={tmp}",
            "output.name=run",
            "eval.prompts=[]",
            "eval.before_after=false",
            "train.max_steps=6",
            "train.lr=5e-2",
            "train.precision=fp32",
            "method.rank=4",
            "method.dropout=0",
        ],
    )
    run_dir, _ = run_training(cfg)
    return run_dir


@pytest.fixture(scope="module")
def reference(run):
    """Input ids and the logits of base + adapter through PEFT (what every export must reproduce)."""
    from transformers import AutoModelForCausalLM

    from llamaforge.runs import load_for_inference

    model, tokenizer, template = load_for_inference(run)
    from llamaforge.data.types import Message

    ids = torch.tensor([template.encode_prompt([Message("user", "Repeat five words, number 3.")])])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(json.loads((run / "run.json").read_text())["base_model"])
        assert (base(input_ids=ids).logits - logits).abs().max() > 1e-2, (
            "adapter changes nothing: tests vacuous"
        )
    return ids, logits, tokenizer, template


def _check_manifest(out: Path, run: Path, fmt: str, dtype: str) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    info = json.loads((run / "run.json").read_text())
    assert manifest["format"] == fmt and manifest["dtype"] == dtype and manifest["source_run"] == str(run)
    assert manifest["base_model"] == info["base_model"] and manifest["method"] == "lora"
    assert manifest["dataset_sha256"] == info["dataset_sha256"] and len(info["dataset_sha256"]) == 64
    on_disk = sorted(
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file() and p.name not in ("manifest.json", MARKER)
    )
    assert [f["path"] for f in manifest["files"]] == on_disk  # every file, and no leftover intermediate
    for f in manifest["files"]:
        assert f["sha256"] == sha256_file(out / f["path"]) and f["bytes"] == (out / f["path"]).stat().st_size
    assert verify_manifest(out) == []
    return manifest


def _debris(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def sharded(run, tmp_path_factory):
    """The run exported as f32 safetensors in 10 MB shards: checked below, and reused as the earlier
    llamaforge export that an `overwrite` replaces (exports are read-only in the tests that read them)."""
    out = tmp_path_factory.mktemp("sharded") / "st"
    return export_run(run, out, export_format="safetensors", shard_size="10MB")


def test_safetensors_sharded_matches_base_plus_adapter(run, reference, sharded):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids, expected, _, template = reference
    out = sharded
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and set(index["weight_map"].values()) == set(
        shards
    )  # 2 x 33 MB embeddings + layers
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    assert merged.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out).chat_template == template.jinja
    gen = json.loads((out / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == set(template.stop_token_ids) >= {128009}  # <|eot_id|> among the stops
    manifest = _check_manifest(out, run, "safetensors", "f32")
    assert manifest["shards"] == len(shards) and manifest["shard_size_bytes"] == 10**7


def test_gguf_export_with_adapter_and_modelfile(run, reference, tmp_path, capsys):
    """Files, Modelfile, metadata, manifest. Identical tokenisation and logits: the slow test below (rebuilding
    a 128K tokenizer from GGUF takes transformers ~15 s); test_export_gguf.py tests both on the converter."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    _, _, tokenizer, template = reference
    out = tmp_path / "gguf"
    assert main(["export", str(run), "--format", "gguf", "--dtype", "f32", "--out", str(out)]) == 0
    assert "manifest.json" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == [MARKER, "Modelfile", "manifest.json", "run-f32.gguf", "run-lora-f32.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./run-f32.gguf" in modelfile and 'PARAMETER stop "<|eot_id|>"' in modelfile
    meta = read_gguf_metadata(str(out / "run-f32.gguf"))[0]
    assert meta["tokenizer.ggml.pre"] == "llama-bpe" and meta["tokenizer.chat_template"] == template.jinja
    assert meta["tokenizer.ggml.eot_token_id"] == 128009 and meta["llama.block_count"] == 2
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    lora = read_gguf_metadata(str(out / "run-lora-f32.gguf"))[0]
    assert lora["general.type"] == "adapter" and lora["adapter.lora.alpha"] == 32.0  # method.alpha (default)
    manifest = _check_manifest(out, run, "gguf", "f32")
    assert manifest["lora_adapter"]["file"] == "run-lora-f32.gguf"


@pytest.mark.parametrize("bits,tolerance", [(8, 0.1), (4, 0.5)])
def test_quantized_export_reloads_and_compares(run, reference, tmp_path, bits, tolerance):
    import bitsandbytes as bnb

    from llamaforge.export.quantized import load_quantized

    ids, expected, _, _ = reference
    out = export_run(
        run, tmp_path / f"q{bits}", export_format="quantized", bits=bits, eval_samples=4, generate=False
    )
    model = load_quantized(out)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit)
    with torch.no_grad():
        diff = (model(input_ids=ids).logits.float() - expected).abs().max().item()
    assert 0 < diff <= tolerance, diff
    quality = json.loads((out / "quality.json").read_text())
    merged, quant = quality["models"]["merged"], quality["models"]["quantized"]
    assert quality["sample"] == 4 and merged["target_tokens"] == quant["target_tokens"] > 0
    assert quant["bytes"] < merged["bytes"] and quant["loss"] != merged["loss"]
    assert "| quantized |" in (out / "quality.md").read_text()
    assert "eval" not in quality and not (out / "eval").exists()
    manifest = _check_manifest(out, run, "quantized", "int8" if bits == 8 else "nf4")
    assert manifest["bits"] == bits and manifest["quality"]["sample"] == 4


@pytest.mark.slow
def test_gguf_logits_and_quantized_eval_table(run, reference, tmp_path):
    """GGUF: identical tokenisation, f32 logits equal base + adapter (1e-4); a quantized export runs `llamaforge eval` side by side."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids, expected, tokenizer, _ = reference
    out = export_run(run, tmp_path / "gguf", export_format="gguf", dtype="f32")
    gguf_tok = AutoTokenizer.from_pretrained(out, gguf_file="run-f32.gguf")
    text = "Hi there <|eot_id|> 12345 ünïcödé " + tokenizer.decode(ids[0])
    assert (
        gguf_tok(text, add_special_tokens=False)["input_ids"]
        == tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="run-f32.gguf").eval()
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - expected).abs().max().item() <= 1e-4
    pytest.importorskip("llamaforge.evaluate.runner")
    out = export_run(
        run, tmp_path / "q8", export_format="quantized", bits=8, eval_samples=4, max_new_tokens=3
    )
    ev = json.loads((out / "quality.json").read_text())["eval"]
    if ev["ran"]:
        results = json.loads((out / "eval" / "results.json").read_text())
        assert "merged" in json.dumps(results) and "quantized" in json.dumps(results)
    else:  # the random tiny model may stop at once: the runner refuses all-empty outputs, and says so
        assert "empty output for all" in ev["reason"] and not (out / "eval").exists(), ev
    assert verify_manifest(out) == []


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, nothing half-written


def _copy_run(run: Path, dest: Path, **changes) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints"))
    info = json.loads((dest / "run.json").read_text())
    info.update(changes)
    (dest / "run.json").write_text(json.dumps(info))
    return dest


def test_bad_runs_are_refused_before_writing(run, tmp_path):
    no_adapter = _copy_run(run, tmp_path / "no_adapter")
    shutil.rmtree(no_adapter / "adapter")
    with pytest.raises(ModelSourceError, match="has no adapter"):
        export_run(no_adapter, tmp_path / "out", export_format="safetensors")
    missing_base = _copy_run(run, tmp_path / "missing_base", base_model=str(tmp_path / "gone"))
    with pytest.raises(ModelSourceError, match="base model .* cannot be found"):
        export_run(missing_base, tmp_path / "out", export_format="gguf")
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    cfg = json.loads(
        (Path(json.loads((run / "run.json").read_text())["base_model"]) / "config.json").read_text()
    )
    (qwen / "config.json").write_text(
        json.dumps({**cfg, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})
    )
    other_arch = _copy_run(run, tmp_path / "other_arch", base_model=str(qwen))
    with pytest.raises(ModelSourceError, match="Qwen2ForCausalLM.*supported: LlamaForCausalLM"):
        export_run(other_arch, tmp_path / "out", export_format="gguf")
    with pytest.raises(ModelSourceError, match="not a llamaforge run"):
        export_run(tmp_path, tmp_path / "out", export_format="safetensors")
    with pytest.raises(ExportError, match="q8_0/q4_0 are GGUF types"):
        export_run(run, tmp_path / "out", export_format="safetensors", dtype="q8_0")
    assert not (tmp_path / "out").exists() and not _debris(tmp_path)


def test_existing_target_disk_space_and_cli_errors(run, sharded, tmp_path, monkeypatch, capsys):
    target = tmp_path / "exists"
    target.mkdir()
    (target / "keep.txt").write_text("keep me")
    with pytest.raises(ExportError, match="already exists.*overwrite"):
        export_run(run, target, export_format="safetensors")
    with pytest.raises(
        ExportError, match="not created by llamaforge"
    ):  # a folder the user made: never replaced
        export_run(run, target, export_format="safetensors", overwrite=True)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(ExportError, match="not enough disk space"):
        export_run(run, tmp_path / "new", export_format="gguf")
    monkeypatch.undo()
    assert (target / "keep.txt").read_text() == "keep me" and not _debris(tmp_path)
    assert main(["export", str(run), "--format", "safetensors", "--out", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                str(run),
                "--format",
                "safetensors",
                "--shard-size",
                "lots",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "is not a size" in capsys.readouterr().err
    target = tmp_path / "ours"
    shutil.copytree(sharded, target)  # an earlier llamaforge export: its marker says so
    (target / "keep.txt").write_text("left by an earlier export")
    export_run(run, target, export_format="safetensors", dtype="bf16", overwrite=True)  # ours: replaced
    assert not (target / "keep.txt").exists() and _check_manifest(target, run, "safetensors", "bf16")
