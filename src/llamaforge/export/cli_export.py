"""What `llamaforge export` does for each format; `--format gguf` lives here.

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

from llamaforge.export.manifest import ExportError, atomic_dir

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "gguf", "quantized")


def export_gguf_run(run_dir: str | Path, out: str | Path, *, dtype: str = "f16", overwrite: bool = False,
                    adapter: bool = True) -> Path:
    from llamaforge.export import gguf as gx
    from llamaforge.export.modelfile import MODELFILE_NAME, render_modelfile
    from llamaforge.export.safetensors import base_config, finish, prepare, write_merged

    if dtype not in gx.DTYPES:
        raise ExportError(f"GGUF dtype must be one of {', '.join(gx.DTYPES)}, got {dtype!r}")
    run_dir, info, source, params = prepare(run_dir)
    cfg = base_config(source)
    if cfg:  # unsupported architectures are refused before anything is loaded or written
        gx.LlamaHParams.from_config(cfg, where=f"{source}/config.json")
    out = Path(out)
    bits = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5}[dtype]
    required = int(params * (4 + bits / 8)) + (params // 10 if info["method"] != "full" else 0)
    name = run_dir.resolve().name
    with atomic_dir(out, overwrite=overwrite, required_bytes=required) as tmp:
        merged = tmp / ".merged"
        template = write_merged(run_dir, info, merged, dtype="f32")
        gguf_path = gx.export_gguf(merged, tmp / f"{name}-{dtype}.gguf", dtype=dtype, name=name)
        adapter_note: dict = {"file": None}
        if adapter and info["method"] != "full":
            try:
                lora = gx.export_lora_gguf(run_dir / info["weights"], merged / "config.json",
                                           tmp / f"{name}-lora-f32.gguf", dtype="f32", name=f"{name}-lora")
                adapter_note = {"file": lora.name, "base": info["base_model"]}
            except ExportError as exc:  # DoRA, modules_to_save, tied lm_head...: the merged GGUF still stands
                log.warning("no LoRA adapter GGUF: %s", exc)
                adapter_note = {"file": None, "skipped": str(exc)}
        # rendered from the run's template rather than write_modelfile's re-read of the GGUF: gguf's
        # GGUFReader takes ~20 s on a 128K vocabulary; the stops are the same tokens the GGUF names
        stops = template.tokenizer.convert_ids_to_tokens(template.stop_token_ids)
        text = render_modelfile(gguf_path.name, template=None if template.name == "model" else template.name,
                                chat_template=template.jinja, stop=stops)
        (tmp / MODELFILE_NAME).write_text(text, encoding="utf-8")
        shutil.rmtree(merged)
        finish(tmp, export_format="gguf", run_dir=run_dir, info=info, dtype=dtype,
               extra={"gguf": gguf_path.name, "lora_adapter": adapter_note, "modelfile": MODELFILE_NAME})
    return out


def _check_out(run_dir: str | Path, out: str | Path) -> None:
    """--out may not be, or contain, the run or a local base model: replacing it would delete them."""
    from llamaforge.atomic import check_not_input
    from llamaforge.export.merge import read_run

    base = read_run(run_dir).get("base_model")
    check_not_input(out, [run_dir, base if base and Path(base).exists() else None], "--out")


def export_run(run_dir: str | Path, out: str | Path, *, export_format: str, dtype: str | None = None,
               bits: int | None = None, shard_size: str = "2GB", overwrite: bool = False, **quantized_options) -> Path:
    """Dispatch one export; returns the export folder."""
    from llamaforge.errors import ConfigError

    if export_format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {export_format!r}")
    if export_format != "quantized" and bits is not None:
        raise ConfigError("--bits is for --format quantized")
    if export_format == "quantized" and dtype is not None:
        raise ConfigError("--format quantized takes --bits 8|4, not --dtype")
    _check_out(run_dir, out)
    started = time.perf_counter()
    if export_format == "safetensors":
        from llamaforge.export.safetensors import export_safetensors

        path = export_safetensors(run_dir, out, dtype=dtype or "f32", shard_size=shard_size, overwrite=overwrite)
    elif export_format == "gguf":
        path = export_gguf_run(run_dir, out, dtype=dtype or "f16", overwrite=overwrite)
    else:
        from llamaforge.export.quantized import export_quantized

        path = export_quantized(run_dir, out, bits=bits or 8, overwrite=overwrite, **quantized_options)
    log.info("export done in %.1f s", time.perf_counter() - started)
    return path
