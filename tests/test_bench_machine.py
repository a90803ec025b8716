"""bench/machine.py: the machine line every bench prints, and the precisions a CPU bench runs or skips."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from llamaforge import hardware
from test_hardware import AVX2, SAPPHIRE, fake_machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import machine  # noqa: E402

RATES = {"fp32": 87e9, "bf16": 700e9}


@pytest.fixture()
def fake_peaks(monkeypatch):
    asked = []

    def peak(dtype_name, seconds=1.0):
        asked.append(dtype_name)
        return RATES[dtype_name]

    monkeypatch.setattr(hardware, "peak_flops", peak)
    return asked


def test_avx2_line_says_fp32_why_and_the_fp32_peak(monkeypatch, fake_peaks):
    fake_machine(monkeypatch, AVX2, bf16=0.9, fp32=87.0)
    m = machine.describe("auto", device="cpu")
    assert (m.precision, m.peak_gflops, m.bf16_instructions, m.isa) == ("fp32", 87.0, False, "AVX2")
    assert fake_peaks == ["fp32"]  # the peak of the precision used, nothing else
    line = m.line()
    assert line.startswith("machine: AMD EPYC 7B13 (AVX2, bf16 instructions no, ")
    assert f"torch {torch.__version__}" in line
    assert "precision fp32 (AVX2 CPU without bf16 instructions: bf16 0.9 vs fp32 87 GFLOP/s)" in line
    assert "fp32 matmul peak 87 GFLOP/s (best of short bursts)" in line
    assert m.record()["line"] == line and m.record()["cores"] == torch.get_num_threads()


def test_bf16_cpu_line_gives_the_bf16_peak(monkeypatch, fake_peaks):
    fake_machine(monkeypatch, SAPPHIRE, bf16=800.0, fp32=190.0)
    m = machine.describe("auto", device="cpu")
    assert (m.precision, m.peak_gflops, m.bf16_instructions) == ("bf16", 700.0, True)
    assert "AVX512+AVX512-BF16+AMX, bf16 instructions yes" in m.line()


def test_an_explicit_precision_is_said_to_be_asked_for_unless_auto_picks_it(monkeypatch, fake_peaks):
    fake_machine(monkeypatch, SAPPHIRE, bf16=800.0, fp32=190.0)
    fp32 = machine.describe("fp32", device="cpu")
    assert fp32.precision == "fp32" and fp32.precision_reason.startswith("asked for on the command line")
    bf16 = machine.describe("bf16", device="cpu")
    assert (
        bf16.precision_reason
        == "AVX512+AVX512-BF16+AMX CPU with bf16 instructions: bf16 800 vs fp32 190 GFLOP/s"
    )


def test_benches_without_tensor_math_get_no_precision(monkeypatch, fake_peaks):
    fake_machine(monkeypatch, AVX2, bf16=0.9, fp32=87.0)
    m = machine.describe(None, device="cpu")
    assert m.precision is None and m.peak_gflops is None and fake_peaks == []
    assert "precision" not in m.line() and "AVX2" in m.line()


def test_a_busy_machine_is_flagged_in_the_line(monkeypatch, fake_peaks):
    fake_machine(monkeypatch, AVX2, bf16=0.9, fp32=87.0)
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    assert (
        "LOAD 99.0: cores shared, timings not representative" in machine.describe("auto", device="cpu").line()
    )


def test_avx2_runs_fp32_and_skips_bf16_with_the_reason(monkeypatch):
    fake_machine(monkeypatch, AVX2, bf16=0.9, fp32=87.0)
    run, skipped = machine.plan_precisions("auto", allow_slow=False)
    assert run == ["fp32"] and list(skipped) == ["bf16"]
    assert "no bf16 instructions on this CPU" in skipped["bf16"] and "~96.7x slower" in skipped["bf16"]
    assert machine.plan_precisions("bf16,fp32", allow_slow=True) == (["bf16", "fp32"], {})


def test_a_bf16_cpu_runs_bf16_then_fp32(monkeypatch):
    fake_machine(monkeypatch, SAPPHIRE, bf16=800.0, fp32=190.0)
    assert machine.plan_precisions("auto", allow_slow=False) == (["bf16", "fp32"], {})
    with pytest.raises(SystemExit, match="fp16"):
        machine.plan_precisions("fp16", allow_slow=False)


def test_the_real_peak_is_measured_in_the_chosen_dtype():
    m = machine.describe("fp32", device="cpu", peak_seconds=0.05)
    assert m.precision == "fp32" and m.peak_gflops > 0.1
