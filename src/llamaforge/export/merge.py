"""Merge a run's adapter into a full-precision copy of its base and save it as safetensors.

QLoRA adapters are merged into the base loaded unquantized (never into 4-bit weights, Llama 3 item 9);
the base's config (RoPE scaling included) is saved as it came. `read_run`, `merged_model` and
`save_merged` are shared with `llamaforge export`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamaforge.errors import ConfigError, ModelSourceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_run(run_dir: str | Path) -> dict:
    """run.json of a finished run, checked: its weights (adapter or full model) must be there."""
    from llamaforge.models import read_run_info

    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    weights = run_dir / info["weights"]
    if info["method"] == "full":
        if not (weights / "config.json").is_file():
            raise ModelSourceError(f"{run_dir} has no model weights at {weights} (was training interrupted?)")
    elif not (weights / "adapter_config.json").is_file():
        raise ModelSourceError(f"{run_dir} has no adapter at {weights} (was training interrupted before saving?)")
    return info


def merged_model(run_dir: str | Path, info: dict | None = None, *, dtype: str = "float32"):
    """(model, tokenizer, template): the run's adapter merged into its fp32 base, cast once to `dtype`;
    a full fine-tune's own weights. Generation config: the template's stop tokens, pad, bos."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from llamaforge.models import ensure_pad_token, load_model
    from llamaforge.templates import load_template

    run_dir = Path(run_dir)
    info = info or read_run(run_dir)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}")
    weights = run_dir / info["weights"]
    # Merge in float32 whatever the target dtype, then cast once: no rounding of the delta.
    if info["method"] == "full":
        model, _ = load_model(str(weights), dtype=torch.float32, quantization="none")
    else:
        base, _ = load_model(info["base_model"], dtype=torch.float32, quantization="none")
        model = PeftModel.from_pretrained(base, weights).merge_and_unload()
    model = model.to(DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(weights)
    ensure_pad_token(tokenizer, model)
    template = load_template(weights, tokenizer)
    tokenizer.chat_template = template.jinja
    gen = model.generation_config
    gen.eos_token_id = template.stop_token_ids
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    return model, tokenizer, template


def save_merged(model, tokenizer, template, folder: Path, *, max_shard_size: str | int | None = None) -> None:
    """Weights (safetensors, sharded when over `max_shard_size`), config, generation config, tokenizer
    with the chat template, and our template record."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(folder)
    template.save(folder)


def merge_run(run_dir: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Merge into `out`, written beside it and renamed into place; an existing `out` is replaced only
    with `overwrite` and only when llamaforge made it; `out` may not be or contain the run or its base."""
    from llamaforge.atomic import building_folder, check_not_input, check_replaceable

    run_dir, out = Path(run_dir), Path(out)
    info = read_run(run_dir)
    if info["method"] == "full":
        raise ConfigError(f"{run_dir} is a full fine-tune: its weights in {run_dir / 'model'} are already merged")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}")
    check_not_input(out, [run_dir, info["base_model"] if Path(info["base_model"]).exists() else None], "--out")
    check_replaceable(out, overwrite=overwrite, what="--out", hint="; pass --overwrite to replace it")

    model, tokenizer, template = merged_model(run_dir, info, dtype=dtype)
    with building_folder(out, "merge") as tmp:
        save_merged(model, tokenizer, template, tmp)
        (tmp / "llamaforge_merge.json").write_text(json.dumps(
            {"run": str(run_dir), "base_model": info["base_model"], "method": info["method"], "dtype": dtype,
             "dataset_sha256": info.get("dataset_sha256")}, indent=2))
    return out
