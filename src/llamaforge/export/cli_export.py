"""What `llamaforge export` does for each format (the built-in exporters, registry.EXPORTERS);
`--format gguf` lives here.

GGUF: the run is merged into an fp32 safetensors folder inside the export's temporary directory,
converted with `export_gguf`, the LoRA adapter alone is written with `export_lora_gguf` (for
`llama-cli --lora`, when the adapter is one llama.cpp can apply), an Ollama Modelfile is written
beside the model, the merged folder is removed, and the manifest is written last. Every check that
needs no weights (run, adapter, base model, architecture, dtype, target, disk) runs first.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from llamaforge.errors import ConfigError
from llamaforge.export.manifest import ExportError, atomic_dir
from llamaforge.registry import EXPORTERS, Exporter

log = logging.getLogger(__name__)


def export_gguf_run(
    run_dir: str | Path, out: str | Path, *, dtype: str = "f16", overwrite: bool = False, adapter: bool = True
) -> Path:
    from llamaforge.export import gguf as gx
    from llamaforge.export.gguf_lora import export_lora_gguf
    from llamaforge.export.modelfile import MODELFILE_NAME, render_modelfile
    from llamaforge.export.safetensors import base_config, finish, prepare, write_merged

    if dtype not in gx.DTYPES:
        raise ExportError(f"GGUF dtype must be one of {', '.join(gx.DTYPES)}, got {dtype!r}")
    run, source, params = prepare(run_dir)
    cfg = base_config(source)
    if cfg:  # unsupported architectures are refused before anything is loaded or written
        gx.LlamaHParams.from_config(cfg, where=f"{source}/config.json")
    out = Path(out)
    bits = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5}[dtype]
    required = int(params * (4 + bits / 8)) + (params // 10 if run.is_adapter else 0)
    name = run.dir.resolve().name
    with atomic_dir(out, overwrite=overwrite, required_bytes=required) as tmp:
        merged = tmp / ".merged"
        template = write_merged(run, merged, dtype="f32")
        gguf_path = gx.export_gguf(merged, tmp / f"{name}-{dtype}.gguf", dtype=dtype, name=name)
        adapter_note: dict = {"file": None}
        if adapter and run.is_adapter:
            try:
                lora = export_lora_gguf(
                    run.weights_dir,
                    merged / "config.json",
                    tmp / f"{name}-lora-f32.gguf",
                    dtype="f32",
                    name=f"{name}-lora",
                )
                adapter_note = {"file": lora.name, "base": run.base_model}
            except ExportError as exc:  # DoRA, modules_to_save, tied lm_head...: the merged GGUF still stands
                log.warning("no LoRA adapter GGUF: %s", exc)
                adapter_note = {"file": None, "skipped": str(exc)}
        # rendered from the run's template rather than write_modelfile's re-read of the GGUF: gguf's
        # GGUFReader takes ~20 s on a 128K vocabulary; the stops are the same tokens the GGUF names
        stops = template.tokenizer.convert_ids_to_tokens(template.stop_token_ids)
        text = render_modelfile(
            gguf_path.name,
            template=None if template.name == "model" else template.name,
            chat_template=template.jinja,
            stop=stops,
        )
        (tmp / MODELFILE_NAME).write_text(text, encoding="utf-8")
        shutil.rmtree(merged)
        finish(
            tmp,
            export_format="gguf",
            run=run,
            dtype=dtype,
            extra={"gguf": gguf_path.name, "lora_adapter": adapter_note, "modelfile": MODELFILE_NAME},
        )
    return out


def _check_out(run_dir: str | Path, out: str | Path) -> None:
    """--out may not be, or contain, the run or a local base model: replacing it would delete them."""
    from llamaforge.atomic import check_not_input
    from llamaforge.runs import Run

    base = Run.open(run_dir).base_model
    check_not_input(out, [run_dir, base if Path(base).exists() else None], "--out")


def _safetensors(
    run_dir, out, *, dtype=None, bits=None, shard_size="2GB", overwrite=False, **options
) -> Path:
    from llamaforge.export.safetensors import export_safetensors

    _no_options("safetensors", bits, options)
    return export_safetensors(run_dir, out, dtype=dtype or "f32", shard_size=shard_size, overwrite=overwrite)


def _gguf(run_dir, out, *, dtype=None, bits=None, shard_size=None, overwrite=False, **options) -> Path:
    _no_options("gguf", bits, options)
    return export_gguf_run(run_dir, out, dtype=dtype or "f16", overwrite=overwrite)


def _quantized(run_dir, out, *, dtype=None, bits=None, shard_size=None, overwrite=False, **options) -> Path:
    from llamaforge.export.quantized import export_quantized

    if dtype is not None:
        raise ConfigError("--format quantized takes --bits 8|4, not --dtype")
    return export_quantized(run_dir, out, bits=bits or 8, overwrite=overwrite, **options)


def _no_options(name: str, bits: int | None, options: dict) -> None:
    if bits is not None:
        raise ConfigError("--bits is for --format quantized")
    if options:
        raise ConfigError(f"--format {name} takes no {', '.join(sorted(options))}")


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    export_format: str,
    dtype: str | None = None,
    bits: int | None = None,
    shard_size: str = "2GB",
    overwrite: bool = False,
    **options,
) -> Path:
    """Dispatch one export to its registered exporter (registry.EXPORTERS); returns the export folder."""
    exporter = EXPORTERS.get(export_format, field="--format")
    _check_out(run_dir, out)
    started = time.perf_counter()
    path = exporter.export(
        run_dir, out, dtype=dtype, bits=bits, shard_size=shard_size, overwrite=overwrite, **options
    )
    log.info("export done in %.1f s", time.perf_counter() - started)
    return path


for _exporter in (
    Exporter("safetensors", _safetensors, "the merged model as sharded safetensors for plain transformers"),
    Exporter(
        "gguf", _gguf, "a GGUF for llama.cpp / Ollama (f32 ... q4_1), the LoRA as its own GGUF, a Modelfile"
    ),
    Exporter("quantized", _quantized, "bitsandbytes int8 / NF4 safetensors, compared with the merged model"),
):
    EXPORTERS.register(_exporter)
