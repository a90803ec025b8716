"""Precision, threads and memory chosen by measurement: each branch on a faked machine."""

from __future__ import annotations

import pytest
import torch

from llamaforge import console, device, hardware
from llamaforge.errors import ConfigError

AVX2 = hardware.CpuInfo("AMD EPYC 7B13", "AVX2", avx512_bf16=False, amx=False)
SAPPHIRE = hardware.CpuInfo("Intel Xeon Platinum 8481C", "AVX512", avx512_bf16=True, amx=True)
CPU = torch.device("cpu")


def fake_machine(monkeypatch, info: hardware.CpuInfo, bf16: float, fp32: float) -> None:
    probe = hardware.PrecisionProbe(info.model, torch.__version__, bf16, fp32, (1, 1, 1), (1, 1, 1))
    monkeypatch.setattr(hardware, "cpu_info", lambda: info)
    monkeypatch.setattr(hardware, "probe_cpu_precision", lambda info=None: probe)


def test_avx2_cpu_gets_fp32_with_the_reason(monkeypatch):
    fake_machine(monkeypatch, AVX2, bf16=0.9, fp32=87.0)
    choice = device.choose_precision("auto", CPU)
    assert choice.precision == "fp32" and choice.warning is None
    assert (
        choice.line() == "precision: fp32 (AVX2 CPU without bf16 instructions: bf16 0.9 vs fp32 87 GFLOP/s)"
    )


def test_bf16_cpu_with_a_fast_probe_gets_bf16(monkeypatch):
    fake_machine(monkeypatch, SAPPHIRE, bf16=800.0, fp32=190.0)
    choice = device.choose_precision("auto", CPU)
    assert choice.precision == "bf16" and "AVX512+AVX512-BF16+AMX CPU with bf16 instructions" in choice.reason


def test_bf16_instructions_but_a_slow_probe_gets_fp32(monkeypatch):
    # e.g. a VM that reports the flag while its hypervisor traps the instructions
    fake_machine(monkeypatch, SAPPHIRE, bf16=150.0, fp32=190.0)
    choice = device.choose_precision("auto", CPU)
    assert choice.precision == "fp32" and "not measurably faster" in choice.reason


def test_explicit_bf16_on_a_slow_cpu_runs_with_the_measured_slowdown(monkeypatch):
    fake_machine(monkeypatch, AVX2, bf16=0.9, fp32=87.0)
    choice = device.choose_precision("bf16", CPU)
    assert choice.precision == "bf16"
    assert "~96.7x slower than in fp32" in choice.warning and "pick fp32" in choice.warning


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        device.choose_precision("fp16", CPU)


@pytest.mark.parametrize(
    ("capability", "expected"), [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16")]
)
def test_cuda_capability_branches(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")
    choice = device.choose_precision("auto", torch.device("cuda", 0))
    assert choice.precision == expected
    assert f"compute capability {capability[0]}.{capability[1]}" in choice.reason
    if expected == "fp16":
        assert "loss scaler" in choice.reason


def test_explicit_bf16_before_ampere_warns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    choice = device.choose_precision("bf16", torch.device("cuda", 0))
    assert choice.precision == "bf16" and "emulated" in choice.warning


def test_the_choice_is_printed_once_with_its_reason(monkeypatch, capsys):
    fake_machine(monkeypatch, AVX2, bf16=0.9, fp32=87.0)
    monkeypatch.setattr(console, "_said", set())
    assert device.resolve_precision("auto", CPU) == "fp32"
    assert device.resolve_precision("auto", CPU) == "fp32"
    err = capsys.readouterr().err
    assert err.count("precision: fp32 (AVX2 CPU without bf16 instructions") == 1


def test_the_probe_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMAFORGE_HOME", str(tmp_path))
    monkeypatch.setattr(hardware, "_looks_busy", lambda cores: False)
    calls = []

    def fake_rate(dtype_name, shape=hardware.PROBE_SHAPE, seconds=0.15):
        calls.append((dtype_name, shape))
        return {"bf16": 0.9e9, "fp32": 87e9}[dtype_name]

    monkeypatch.setattr(hardware, "matmul_flops", fake_rate)
    first = hardware.probe_cpu_precision(AVX2)
    # without bf16 instructions the emulated path is only timed on a small product
    assert calls == [("bf16", hardware.SLOW_PROBE_SHAPE), ("fp32", hardware.PROBE_SHAPE)]
    path = hardware.probe_cache_path(AVX2)
    assert path.parent == tmp_path / "hardware" and "AMD-EPYC-7B13-AVX2-torch" in path.name
    again = hardware.probe_cpu_precision(AVX2)
    assert again == first and len(calls) == 2  # read back, not measured again
    other = hardware.probe_cpu_precision(SAPPHIRE)  # another CPU model: its own entry
    assert len(calls) == 4 and other.bf16_shape == hardware.PROBE_SHAPE


def test_a_probe_taken_on_a_busy_machine_is_not_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMAFORGE_HOME", str(tmp_path))
    monkeypatch.setattr(hardware, "_looks_busy", lambda cores: True)
    monkeypatch.setattr(hardware, "matmul_flops", lambda *a, **k: 1e9)
    hardware.probe_cpu_precision(AVX2)
    assert not hardware.probe_cache_path(AVX2).exists()


def test_the_real_probe_is_quick_and_sane(monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("LLAMAFORGE_HOME", str(tmp_path))
    start = time.perf_counter()
    probe = hardware.probe_cpu_precision(hardware.cpu_info())
    assert time.perf_counter() - start < 5  # "well under a second" on an idle machine; loose for CI
    assert probe.fp32_gflops > 0 and probe.bf16_gflops > 0


def test_usable_cores_follow_affinity_and_cgroup_quota(monkeypatch):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(hardware, "_cgroup_cpu_quota", lambda: None)
    assert hardware.usable_cores() == 4
    monkeypatch.setattr(hardware, "_cgroup_cpu_quota", lambda: 1.5)  # `docker run --cpus 1.5`
    assert hardware.usable_cores() == 1
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {3})  # `taskset -c 3`
    monkeypatch.setattr(hardware, "_cgroup_cpu_quota", lambda: 8.0)
    assert hardware.usable_cores() == 1


def test_threads_are_set_to_the_usable_cores_unless_the_user_chose(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(hardware, "usable_cores", lambda: 1)
    monkeypatch.setattr(hardware, "_looks_busy", lambda cores: False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert hardware.configure_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert hardware.configure_threads() == 2  # the user's setting wins
    finally:
        torch.set_num_threads(before)


def test_shared_cores_are_warned_about_once(monkeypatch, capsys):
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (5.0, 4.0, 3.0))
    monkeypatch.setattr(hardware, "_warned_shared", False)
    hardware.warn_if_cores_shared(2)
    hardware.warn_if_cores_shared(2)
    err = capsys.readouterr().err
    assert err.count("the cores look shared (load average 5.0 on 2 usable cores)") == 1
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    monkeypatch.setattr(hardware, "_warned_shared", False)
    hardware.warn_if_cores_shared(2)
    assert "shared" not in capsys.readouterr().err


def test_memory_readings_are_positive():
    assert hardware.available_memory_bytes() > 0 and hardware.process_rss_bytes() > 0
