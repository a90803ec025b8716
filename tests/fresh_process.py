"""A training job in a fresh Python process, for tests that measure its peak RSS (a process's peak only
grows, so each measured run needs a process of its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

FRESH_RUN = """
import json, resource, sys
from llamaforge.config import load_config
from llamaforge.train.recipe import run_training
run_dir, summary = run_training(load_config(None, sys.argv[1:]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
print(json.dumps({"summary": summary, "peak_rss": peak}))
"""


def train_in_fresh_process(args: list[str], *, preload: str | None = None) -> dict:
    """Run `llamaforge train` overrides `args` on one thread, the allocator given (`preload`: a library for
    LD_PRELOAD; None: the C library's malloc with its defaults); returns {"summary", "peak_rss" (bytes)}."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}
    if preload:
        env["LD_PRELOAD"] = preload
    out = subprocess.run(
        [sys.executable, "-c", FRESH_RUN, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
