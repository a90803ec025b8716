"""Merge a run's adapter into a full-precision copy of its base and save it as safetensors.

QLoRA adapters are merged into the base loaded unquantized (never into 4-bit weights, Llama 3 item 9);
the base's config (RoPE scaling included) is saved as it came. `merged_model` and `save_merged`
are shared with `llamaforge export`.
"""

from __future__ import annotations

import json
from pathlib import Path

from llamaforge.dtypes import torch_dtype
from llamaforge.errors import ConfigError
from llamaforge.padding import ensure_pad_token
from llamaforge.runs import Run


def merged_model(run: Run, *, dtype: str = "float32"):
    """(model, tokenizer, template): the run's adapter merged into its fp32 base, cast once to `dtype`;
    a full fine-tune's own weights. Generation config: the template's stop tokens, pad, bos."""
    torch_dtype(dtype)  # an unknown name fails here, before any weights load
    # Merge in float32 whatever the target dtype, then cast once: no rounding of the delta.
    model, tokenizer = run.load(dtype="float32", merge=True)
    if hasattr(model, "peft_config"):
        raise ConfigError(f"{run.dir}: a {run.method} adapter has no weights to merge into its base")
    model = model.to(torch_dtype(dtype))
    ensure_pad_token(tokenizer, model)
    template = run.template(tokenizer)
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


def merge_run(
    run_dir: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Merge into `out`, written beside it and renamed into place; an existing `out` is replaced only
    with `overwrite` and only when llamaforge made it; `out` may not be or contain the run or its base."""
    from llamaforge.atomic import building_folder, check_not_input, check_replaceable

    out = Path(out)
    run = Run.open(run_dir)
    if not run.is_adapter:
        raise ConfigError(
            f"{run.dir} is a full fine-tune: its weights in {run.weights_dir} are already merged"
        )
    torch_dtype(dtype)  # an unknown name fails here, before any weights load
    base = run.base_model if Path(run.base_model).exists() else None
    check_not_input(out, [run.dir, base], "--out")
    check_replaceable(out, overwrite=overwrite, what="--out", hint="; pass --overwrite to replace it")

    model, tokenizer, template = merged_model(run, dtype=dtype)
    with building_folder(out, "merge") as tmp:
        save_merged(model, tokenizer, template, tmp)
        (tmp / "llamaforge_merge.json").write_text(
            json.dumps(
                {
                    "run": str(run.dir),
                    "base_model": run.base_model,
                    "method": run.method,
                    "dtype": dtype,
                    "dataset_sha256": run.dataset_sha256,
                },
                indent=2,
            )
        )
    return out
