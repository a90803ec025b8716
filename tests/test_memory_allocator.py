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
    assert "left as set" in hardware.configure_allocator("off")  # off tunes nothing: not glibc here
    monkeypatch.delenv("LD_PRELOAD")
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


# ---------------------------------------------------------------- train.allocator (jemalloc preload)

PRELOAD = """
import sys
from llamaforge import hardware
print(hardware.preload_allocator(sys.argv[1]))
print("mapped:", "jemalloc" in open("/proc/self/maps").read())
"""


def _preload(choice: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LLAMAFORGE_ALLOCATOR_PRELOADED")}
    return subprocess.run(
        [sys.executable, "-c", PRELOAD, choice],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, **env_extra},
    )


@pytest.mark.skipif(hardware.find_jemalloc() is None, reason="needs libjemalloc (apt install libjemalloc2)")
def test_auto_re_executes_once_with_jemalloc_preloaded():
    out = _preload("auto")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("allocator: re-running with") and "jemalloc" in lines[0]
    assert "(re-executed with it)" in lines[1]  # the second process says why, and does not loop
    assert lines[2] == "mapped: True" and len(lines) == 3


@pytest.mark.skipif(platform.system() != "Linux", reason="/proc/self/maps")
def test_system_never_preloads():
    out = _preload("system")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [
        "allocator: the C library's malloc (train.allocator system)",
        "mapped: False",
    ]


def test_a_preloaded_allocator_is_kept(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/opt/lib/libtcmalloc.so.4")
    monkeypatch.delenv("LLAMAFORGE_ALLOCATOR_PRELOADED", raising=False)
    assert hardware.preload_allocator("jemalloc") == "allocator: libtcmalloc.so.4 (LD_PRELOAD)"


def test_missing_jemalloc_falls_back_on_auto_and_is_an_error_when_asked_for(monkeypatch):
    from llamaforge.errors import ConfigError

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("LLAMAFORGE_ALLOCATOR_PRELOADED", raising=False)
    monkeypatch.setattr(hardware, "find_jemalloc", lambda: None)  # a machine without the library
    monkeypatch.setattr(sys, "platform", "linux")
    assert "no libjemalloc found" in hardware.preload_allocator("auto")
    with pytest.raises(ConfigError, match="train.allocator=jemalloc"):
        hardware.preload_allocator("jemalloc")


def test_the_allocator_knob_is_checked():
    from llamaforge.config import load_config
    from llamaforge.errors import ConfigError

    assert load_config(None, []).train.allocator == "auto"
    with pytest.raises(ConfigError, match="allocator"):
        load_config(None, ["train.allocator=tcmalloc"])


def test_planner_counts_jemallocs_slack_whatever_release_memory():
    """release_memory tunes glibc only; under jemalloc the planner uses jemalloc's measured slack."""
    arch = load_arch("smollm2-135m")
    cpu = Setup(
        method="lora", batch=4, seq=377, precision="fp32", device="cpu", rank=16, allocator="jemalloc"
    )
    tensors = max(estimate(arch, cpu).phases.values())
    for mode in ("off", "step", "eager"):
        assert estimate(arch, cpu.with_(release_memory=mode)).peak == pytest.approx(
            tensors * CPU_SLACK["jemalloc"]
        )
    assert CPU_SLACK["jemalloc"] < CPU_SLACK["off"]


def test_the_dry_run_plans_with_the_allocator_training_would_use(monkeypatch):
    from llamaforge.config import load_config
    from llamaforge.planning.dry_run import job_setup

    def planned(choice: str) -> str:
        return job_setup(load_config(None, [f"train.allocator={choice}"]), "cpu", "fp32")[0].allocator

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("LLAMAFORGE_ALLOCATOR_PRELOADED", raising=False)
    assert planned("system") == "glibc"
    monkeypatch.setattr(hardware, "find_jemalloc", lambda: None)  # a machine without the library
    assert planned("auto") == "glibc"
    monkeypatch.setattr(hardware, "find_jemalloc", lambda: "/usr/lib/libjemalloc.so.2")
    monkeypatch.setattr(sys, "platform", "linux")
    assert planned("auto") == "jemalloc" and planned("system") == "glibc"
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")  # preloaded by the user: kept
    assert planned("system") == "jemalloc"
    cfg = load_config(None, [])
    assert job_setup(cfg, "cuda", "bf16")[0].allocator == "glibc"


def test_called_from_python_the_cli_never_replaces_the_callers_process(monkeypatch):
    """`cli.main([...])` inside another program (a notebook, a test run) must not exec over it."""
    from llamaforge import cli
    from llamaforge.errors import ConfigError

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("LLAMAFORGE_ALLOCATOR_PRELOADED", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(hardware, "find_jemalloc", lambda: "/usr/lib/libjemalloc.so.2")
    monkeypatch.setattr(hardware.os, "execve", lambda *a: pytest.fail("the caller's process was replaced"))
    assert "called from Python" in hardware.preload_allocator("auto", may_reexec=False)
    with pytest.raises(ConfigError, match="own process"):
        hardware.preload_allocator("jemalloc", may_reexec=False)

    seen = []

    def record(choice, *, may_reexec=True):
        seen.append(may_reexec)
        raise ConfigError("stop here")

    monkeypatch.setattr(hardware, "preload_allocator", record)
    assert cli.main(["train", "train.max_steps=1"]) == 2  # the ConfigError, reported
    assert seen == [False]
