"""The run directory before training: its name, the inputs it must not be, made (or replaced) once.

Nothing the user made is ever deleted: an existing folder is only replaced when it carries
llamaforge's run marker and `output.overwrite` (or `--resume`) says so.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

from llamaforge.atomic import check_not_input, check_replaceable, write_marker
from llamaforge.config import JobConfig, to_yaml


def run_name(cfg: JobConfig) -> str:
    if cfg.output.name:
        return cfg.output.name
    stem = Path(cfg.model.source.rstrip("/")).name.removesuffix(".gguf")
    return f"{stem}-{cfg.method.name}-{datetime.now():%Y%m%d-%H%M%S}"


def run_inputs(cfg: JobConfig) -> list[str]:
    """What a run reads from disk (data, a local model): its folder may be none of them, nor hold one."""
    sources = [*cfg.data.sources, *cfg.data.val_sources]
    prepared = [cfg.data.prepared] if cfg.data.prepared else []
    return [s.path for s in sources] + prepared + [cfg.model.source]


def prepare_run_dir_once(run_dir: Path, cfg: JobConfig, accelerator, *, resume: bool) -> Path:
    """Every process of a launch uses the main one's run directory, made (or wiped) once, before
    any of them writes into it. Returns that directory."""
    if accelerator.num_processes > 1 and not cfg.output.name:  # timestamped names may differ by a second
        from accelerate.utils import broadcast_object_list

        run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, cfg, resume=resume)
    accelerator.wait_for_everyone()
    return run_dir


def prepare_run_dir(run: Path, cfg: JobConfig, *, resume: bool) -> None:
    if run.exists() and not resume:
        check_not_input(run, run_inputs(cfg), "run directory")
        check_replaceable(
            run,
            overwrite=cfg.output.overwrite,
            what="run directory",
            hint=": use --resume, output.overwrite=true or another output.name",
        )
        shutil.rmtree(run)  # a run folder llamaforge made (it carries the marker)
    run.mkdir(parents=True, exist_ok=True)
    write_marker(run, "run")
    (run / "config.yaml").write_text(to_yaml(cfg))
