"""`llamaforge export RUN --format quantized --bits 8|4`: the merged model quantized for inference with
bitsandbytes (LLM.int8 or NF4 with double quantization), saved as safetensors so that
`AutoModelForCausalLM.from_pretrained(out)` reloads it quantized (the quantization config travels in
config.json). bitsandbytes 0.50 serialises both on CPU. torchao is not used: its transformers
integration saves tensor subclasses that need pickle, and we never write or read pickled weights.

The adapter is merged into the full-precision base first (never into quantized weights), and the
merged and the quantized model are then compared on a held-out sample (the run's validation records,
or `eval_data`) so that the quantization loss is seen before deployment:

- always: token-weighted loss and perplexity of the references, masked as in training
  (`quality.json`, `quality.md`);
- when `llamaforge.evaluate.runner` is there: `llamaforge eval` on the same sample, both models side
  by side with generation metrics (`eval/results.*`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from llamaforge.errors import ConfigError, ModelSourceError
from llamaforge.export.manifest import ExportError, atomic_dir
from llamaforge.export.safetensors import finish, prepare, write_merged
from llamaforge.losses import held_out_loss
from llamaforge.runs import Run

log = logging.getLogger(__name__)

BITS = (8, 4)
# bytes per parameter on disk (4-bit: packed weights plus absmax; embeddings and norms stay 16/32-bit)
_BYTES = {8: 1.2, 4: 0.7}


def bnb_config(bits: int):
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_quantized(folder: Path):
    """Reload a quantized export. On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights on the first
    forward, which fails for layers narrower than a block (64); opting out keeps every shape working."""
    from transformers import AutoModelForCausalLM

    from llamaforge.models import keep_4bit_gradients_exact

    model = AutoModelForCausalLM.from_pretrained(folder)
    keep_4bit_gradients_exact(model)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# the held-out sample and the loss comparison


def held_out_conversations(run: Run, eval_data: str | Path | None, limit: int):
    """Up to `limit` conversations the run did not train on: `eval_data`, else its validation set."""
    if eval_data is None:
        try:
            return run.val_conversations()[:limit], "the run's validation split"  # system prompt applied
        except ModelSourceError as exc:
            raise ModelSourceError(f"{exc} (llamaforge export --eval-data FILE, or --no-eval)") from None
    from llamaforge.data.formats import read_source
    from llamaforge.data.types import Conversation, with_system_prompt

    system = run.config().data.system_prompt
    convs = [c for c in read_source(Path(eval_data), "auto", strict=False) if isinstance(c, Conversation)]
    return [with_system_prompt(c, system) for c in convs[:limit]], str(eval_data)


def loss_and_perplexity(model, template, convs) -> dict[str, float]:
    """Token-weighted NLL of the assistant tokens (training masks), one conversation per forward."""
    rows, skipped = [], 0
    for conv in convs:
        try:
            enc = template.encode(conv)
        except Exception:  # noqa: BLE001 - a record the template cannot mask is skipped, and counted
            skipped += 1
            continue
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    held = held_out_loss(model, rows, template.tokenizer.pad_token_id)
    return {
        "loss": held.loss,
        "perplexity": held.perplexity,
        "target_tokens": held.tokens,
        "skipped": skipped,
    }


def _quality_markdown(rows: dict[str, dict], where: str, n: int) -> str:
    lines = [
        f"# merged vs quantized on {n} held-out example(s) from {where}",
        "",
        "| model | loss | perplexity | target tokens | size |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['loss']:.4f} | {r['perplexity']:.3f} | {r['target_tokens']} | "
            f"{r['bytes'] / 1e6:.1f} MB |"
        )
    q, m = rows["quantized"], rows["merged"]
    lines += [
        "",
        f"loss delta (quantized - merged): {q['loss'] - m['loss']:+.4f}; "
        f"perplexity ratio: {q['perplexity'] / m['perplexity']:.4f}",
    ]
    return "\n".join(lines) + "\n"


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _run_eval(merged: Path, quantized: Path, convs, out_dir: Path, max_new_tokens: int) -> dict[str, Any]:
    """`llamaforge eval` on the same sample, when that module is there. Any failure is reported, not fatal:
    the loss table is already written."""
    try:
        from llamaforge.evaluate.runner import EvaluationConfig, GenerationSettings, run_evaluation
        from llamaforge.evaluate.tasks import TaskConfig
    except ImportError as exc:
        return {"ran": False, "reason": f"llamaforge.evaluate.runner unavailable: {exc}"}
    task_file = out_dir.parent / ".eval_task.jsonl"
    rows = [
        {"messages": [{"role": m.role, "content": m.content} for m in c.messages]}
        for c in convs
        if c.messages and c.messages[-1].role == "assistant"
    ]
    task_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    try:
        cfg = EvaluationConfig(
            candidates=[f"merged={merged}", f"quantized={quantized}"],
            task=TaskConfig(path=str(task_file), format="messages"),
            generation=GenerationSettings(max_new_tokens=max_new_tokens),
        )
        result = run_evaluation(cfg, out_dir)
        return {"ran": True, "results": "eval/results.md", "gate_failed": result.failed}
    except Exception as exc:  # noqa: BLE001 - see docstring
        log.warning(
            "the side-by-side evaluation failed (%s: %s); the loss table stands", type(exc).__name__, exc
        )
        shutil.rmtree(out_dir, ignore_errors=True)
        return {"ran": False, "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        task_file.unlink(missing_ok=True)


def compare_quality(
    merged_dir: Path,
    quantized_dir: Path,
    convs,
    where: str,
    out: Path,
    *,
    generate: bool = True,
    max_new_tokens: int = 64,
) -> dict[str, Any]:
    """Write quality.json / quality.md (and eval/ when `generate`) into `out`; returns quality.json's content."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamaforge.models import ensure_pad_token
    from llamaforge.templates import load_template

    if not convs:
        report = {
            "sample": 0,
            "source": where,
            "note": "no held-out records: nothing compared (pass eval_data)",
        }
        log.warning("quantized export: %s", report["note"])
        (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
        return report
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ensure_pad_token(tokenizer)
    template = load_template(merged_dir, tokenizer)
    rows: dict[str, dict] = {}
    for name, folder in (("merged", merged_dir), ("quantized", quantized_dir)):
        t0 = time.perf_counter()
        model = (
            load_quantized(folder)
            if name == "quantized"
            else AutoModelForCausalLM.from_pretrained(folder).eval()
        )
        rows[name] = {
            **loss_and_perplexity(model, template, convs),
            "bytes": _folder_bytes(folder),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        del model
    report = {
        "sample": len(convs),
        "source": where,
        "models": rows,
        "loss_delta": rows["quantized"]["loss"] - rows["merged"]["loss"],
    }
    (out / "quality.md").write_text(_quality_markdown(rows, where, len(convs)), encoding="utf-8")
    if generate:
        report["eval"] = _run_eval(merged_dir, quantized_dir, convs, out / "eval", max_new_tokens)
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.info("quantized vs merged loss: %.4f vs %.4f", rows["quantized"]["loss"], rows["merged"]["loss"])
    return report


# ---------------------------------------------------------------------------------------------
# the export


def export_quantized(
    run_dir: str | Path,
    out: str | Path,
    *,
    bits: int = 8,
    overwrite: bool = False,
    eval_data: str | Path | None = None,
    eval_samples: int = 32,
    evaluate: bool = True,
    generate: bool = True,
    max_new_tokens: int = 64,
) -> Path:
    if bits not in BITS:
        raise ConfigError(f"--bits must be 8 or 4, got {bits}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ExportError("--format quantized needs bitsandbytes (pip install bitsandbytes)") from None
    run, _, params = prepare(run_dir)
    out = Path(out)
    if evaluate:  # read before any weights are touched: a data problem is reported at once
        convs, where = held_out_conversations(run, eval_data, eval_samples)
    # the fp32 merged model is written first (it is quantized from, and compared against), then removed
    required = int(params * (4 + _BYTES[bits]))
    with atomic_dir(out, overwrite=overwrite, required_bytes=required) as tmp:
        merged = tmp / ".merged"
        write_merged(run, merged, dtype="f32")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(merged, quantization_config=bnb_config(bits))
        from llamaforge.models import keep_4bit_gradients_exact

        keep_4bit_gradients_exact(model)
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        for f in merged.iterdir():  # tokenizer, chat template, our template record
            if (
                f.suffix != ".safetensors"
                and f.name not in ("config.json", "generation_config.json")
                and not f.name.endswith(".index.json")
            ):
                shutil.copy2(f, tmp / f.name)
        shutil.copy2(merged / "generation_config.json", tmp / "generation_config.json")
        quality = None
        if evaluate:
            quality = compare_quality(
                merged, tmp, convs, where, tmp, generate=generate, max_new_tokens=max_new_tokens
            )
        shutil.rmtree(merged)
        method = (
            "bitsandbytes LLM.int8" if bits == 8 else "bitsandbytes NF4 (double quantization, bf16 compute)"
        )
        finish(
            tmp,
            export_format="quantized",
            run=run,
            dtype=f"int{bits}" if bits == 8 else "nf4",
            extra={
                "quantization": method,
                "bits": bits,
                "quality": None if quality is None else {k: v for k, v in quality.items() if k != "eval"},
            },
        )
    return out
