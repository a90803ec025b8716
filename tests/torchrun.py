"""Training launched in two local processes through torchrun, as a user launches it on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def torchrun_train(
    job: Path,
    *args: str,
    accelerate_use_cpu: bool = True,
    env: dict[str, str] | None = None,
    expect_success: bool = True,
    timeout: int = 900,
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m llamaforge.cli train JOB ARGS...` from the job's
    folder, offline, one thread a process; `env` adds variables (FSDP, DeepSpeed). Asserts the launch
    succeeded (with the end of its stderr) unless `expect_success` is False."""
    environment = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", **(env or {})}
    environment.pop("ACCELERATE_USE_CPU", None)
    if accelerate_use_cpu:
        environment["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "llamaforge.cli", "train", str(job), *args]
    done = subprocess.run(
        cmd, env=environment, capture_output=True, text=True, timeout=timeout, cwd=job.parent
    )
    if expect_success:
        assert done.returncode == 0, done.stderr[-4000:]
    return done
