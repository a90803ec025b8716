"""`llamaforge export RUN --format safetensors`: the merged model as sharded safetensors, ready for
plain transformers (config with RoPE scaling as the base had it, generation config with the
template's stop tokens, tokenizer with the chat template), plus a manifest.

Also the pieces every export format shares: checking the run and its base before anything is
written, the size estimate for the disk check, and the manifest.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from llamaforge.errors import ConfigError, ModelSourceError
from llamaforge.export.manifest import ExportError, atomic_dir, build_manifest, write_manifest
from llamaforge.runs import Run

log = logging.getLogger(__name__)

# CLI dtype names -> torch dtype names (dtypes.torch_dtype)
SAFETENSORS_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
BYTES_PER_PARAM = {"f32": 4, "bf16": 2, "f16": 2}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000 (decimal units as transformers reads them; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"shard size {text!r} is not a size like 2GB, 500MB or 1GiB")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()]
    if value < 1:
        raise ConfigError(f"shard size {text!r} must be at least one byte")
    return int(value)


def weights_source(run: Run) -> Path | str:
    """The folder holding the full-precision weights the export starts from (base, or a full fine-tune).
    Raises ModelSourceError when the base model cannot be found."""
    from llamaforge.models import local_path

    if not run.is_adapter:
        return run.weights_dir
    try:
        path = local_path(run.base_model)
    except ModelSourceError as exc:
        raise ModelSourceError(f"the base model of {run.dir} cannot be found: {exc}") from None
    if isinstance(path, Path) and not (path / "config.json").is_file():
        raise ModelSourceError(f"the base model of {run.dir} ({run.base_model}) has no config.json at {path}")
    return path


def base_config(source: Path | str) -> dict:
    if isinstance(source, Path):
        return json.loads((source / "config.json").read_text(encoding="utf-8"))
    return {}


def parameter_count(source: Path | str) -> int:
    """Number of stored parameters, from the safetensors headers (no weights loaded); 0 if unknown."""
    if not isinstance(source, Path):
        return 0
    from llamaforge.export.gguf import tensor_shapes, weight_files

    try:
        shapes = tensor_shapes(weight_files(source))
    except ModelSourceError:
        return 0
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def prepare(run_dir: str | Path) -> tuple[Run, Path | str, int]:
    """(run, weights source, parameter count): every check that needs no model loaded."""
    run = Run.open(run_dir)
    source = weights_source(run)
    return run, source, parameter_count(source)


def write_merged(run: Run, folder: Path, *, dtype: str = "f32", max_shard_size: str | int | None = None):
    """Merge and save into `folder` (which may exist, empty). Returns the run's ChatTemplate."""
    from llamaforge.export.merge import merged_model, save_merged

    model, tokenizer, template = merged_model(run, dtype=SAFETENSORS_DTYPES[dtype])
    folder.mkdir(parents=True, exist_ok=True)
    save_merged(model, tokenizer, template, folder, max_shard_size=max_shard_size)
    del model
    return template


def _readable(folder: Path) -> None:
    """transformers writes weight files 0600 (through a temporary file): an export is meant to be shared."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(0o666 & ~umask)


def finish(
    tmp: Path, *, export_format: str, run: Run, dtype: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    _readable(tmp)
    manifest = build_manifest(
        tmp,
        export_format=export_format,
        source_run=str(run.dir),
        dataset_sha256=run.dataset_sha256,
        base_model=run.base_model,
        method=run.method,
        dtype=dtype,
        extra={"template": run.template_name, **(extra or {})},
    )
    write_manifest(tmp, manifest)
    return manifest


def export_safetensors(
    run_dir: str | Path,
    out: str | Path,
    *,
    dtype: str = "f32",
    shard_size: str | int = "2GB",
    overwrite: bool = False,
) -> Path:
    """Merged model in `out` as safetensors shards of at most `shard_size` (a tensor larger than that
    gets a shard of its own). Nothing is left at `out` unless the whole export succeeded."""
    if dtype not in SAFETENSORS_DTYPES:
        raise ExportError(
            f"safetensors dtype must be one of {', '.join(SAFETENSORS_DTYPES)}, got {dtype!r} "
            "(q8_0/q4_0 are GGUF types: use --format gguf, or --format quantized --bits 8|4)"
        )
    max_shard = parse_size(shard_size)
    run, _, params = prepare(run_dir)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite, required_bytes=params * BYTES_PER_PARAM[dtype]) as tmp:
        write_merged(run, tmp, dtype=dtype, max_shard_size=max_shard)
        shards = sorted(p.name for p in tmp.glob("model*.safetensors"))
        finish(
            tmp,
            export_format="safetensors",
            run=run,
            dtype=dtype,
            extra={"shard_size_bytes": max_shard, "shards": len(shards)},
        )
    log.info("safetensors export: %d shard(s) in %s", len(shards), out)
    return out
