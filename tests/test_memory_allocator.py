"""train.release_memory: glibc malloc hands freed tensor memory back to the system (hardware.py), and the
planner counts the allocator's slack for each mode (planning/memory.py)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from llamaforge import hardware
from llamaforge.planning.arch import load_arch
from llamaforge.planning.memory import CPU_SLACK, Setup, estimate

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only"
)

# Frees 64 blocks of 2 MiB (below glibc's dynamic mmap threshold once a 16 MiB block was freed) under a
# block that stays, so the heap cannot shrink from its top: the freed pages stay resident unless released.
FRAGMENT = """
import json, sys, torch
from llamaforge import hardware
print(hardware.configure_allocator(sys.argv[1]), file=sys.stderr)
big = torch.ones(4 << 20)  # 16 MiB, mapped on its own: once freed glibc raises its threshold past 2 MiB
del big
blocks = [torch.ones(1 << 19) for _ in range(64)]  # 2 MiB each, touched
pin = torch.ones(1 << 16)  # 256 KiB from the top of the heap, above the freed blocks
before = hardware.process_rss_bytes()
del blocks
freed = hardware.process_rss_bytes()
released = hardware.release_free_memory()
print(json.dumps({"before": before, "freed": freed, "trimmed": hardware.process_rss_bytes(), "released": released}))
"""


def _fragment(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENT, mode], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


MiB = 1 << 20


@glibc
def test_off_keeps_freed_blocks_resident_and_step_returns_them():
    off = _fragment("off")
    assert off["before"] - off["freed"] < 32 * MiB  # glibc's default keeps the 128 MiB freed
    assert off["before"] - off["trimmed"] < 32 * MiB and not off["released"]  # nothing asked back
    step = _fragment("step")
    assert step["before"] - step["freed"] < 32 * MiB  # still kept at free...
    assert step["before"] - step["trimmed"] > 96 * MiB and step["released"]  # ...until the step ends


@glibc
def test_eager_returns_large_blocks_at_free():
    eager = _fragment("eager")
    assert eager["before"] - eager["freed"] > 96 * MiB


def test_user_allocator_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert hardware.configure_allocator("eager") == "allocator: left as set (MALLOC_ARENA_MAX)"
    assert hardware.release_free_memory() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert "left as set" in hardware.configure_allocator("step")
    assert hardware.configure_allocator("off") == "allocator: glibc defaults (train.release_memory off)"


def test_planner_counts_each_modes_slack_on_cpu_only():
    arch = load_arch("smollm2-135m")
    cpu = Setup(method="lora", batch=4, seq=377, precision="fp32", device="cpu", rank=16)
    peaks = {mode: estimate(arch, cpu.with_(release_memory=mode)).peak for mode in CPU_SLACK}
    assert peaks["eager"] < peaks["step"] < peaks["off"]
    tensors = max(estimate(arch, cpu).phases.values())
    assert peaks["step"] == pytest.approx(tensors * CPU_SLACK["step"])
    gpu = cpu.with_(device="cuda", precision="bf16")
    assert estimate(arch, gpu.with_(release_memory="off")).peak == estimate(arch, gpu).peak


def test_the_schema_knob_reaches_the_dry_run_setup():
    from llamaforge.config import load_config
    from llamaforge.planning.dry_run import job_setup

    cfg = load_config(None, ["train.release_memory=eager"])
    assert job_setup(cfg, "cpu", "fp32")[0].release_memory == "eager"
    assert load_config(None, []).train.release_memory == "off"


def test_a_bare_yaml_off_is_the_off_mode(tmp_path):
    """YAML 1.1 reads `release_memory: off` as false; the knob takes it as the "off" the user wrote,
    from a job file and from a command-line override alike, and still refuses other values."""
    from llamaforge.config import load_config
    from llamaforge.errors import ConfigError

    job = tmp_path / "job.yaml"
    job.write_text("train:\n  release_memory: off\n")
    assert load_config(job).train.release_memory == "off"
    assert load_config(None, ["train.release_memory=off"]).train.release_memory == "off"
    assert load_config(None, ["train.release_memory=eager"]).train.release_memory == "eager"
    with pytest.raises(ConfigError, match="release_memory"):
        load_config(None, ["train.release_memory=true"])
