"""The planner counts what the preference objectives add (issue 19): DPO and ORPO train two sequences a
row, DPO and KTO run the reference (the adapter-disabled base) forward, unless precomputed."""

from __future__ import annotations

import pytest

from llamaforge.config import load_config
from llamaforge.planning.arch import shipped_archs
from llamaforge.planning.memory import Setup, estimate, objective_passes
from llamaforge.planning.plan import base_setup
from llamaforge.planning.throughput import flops_per_token


@pytest.fixture(scope="module")
def arch():
    from llamaforge.planning.arch import load_arch

    return load_arch(shipped_archs()[0])


@pytest.mark.parametrize(
    "objective, precompute, passes",
    [
        ("sft", False, (1, 0)),
        ("dpo", False, (2, 2)),
        ("dpo", True, (2, 0)),
        ("orpo", False, (2, 0)),
        ("kto", False, (1, 3)),
        ("kto", True, (1, 1)),
    ],
)
def test_passes_per_row(objective, precompute, passes):
    assert objective_passes(objective, precompute) == passes


def test_dpo_memory_and_flops_count_the_reference_forward(arch):
    sft = Setup(method="lora", batch=2, seq=512, device="cuda")
    dpo = sft.with_(objective="dpo")
    dpo_pre = dpo.with_(precompute_reference=True)
    e_sft, e_dpo, e_pre = estimate(arch, sft), estimate(arch, dpo), estimate(arch, dpo_pre)
    assert dpo.tokens == 2 * sft.tokens and e_dpo.activations == pytest.approx(
        2 * e_sft.activations, rel=0.01
    )
    assert "reference_forward" in e_dpo.phases and "reference_forward" not in e_pre.phases
    # a no-grad forward holds one layer at a time: below the training forward's saved activations
    assert e_dpo.phases["reference_forward"] < e_dpo.phases["forward_end"]
    assert e_dpo.peak == pytest.approx(e_pre.peak) and e_dpo.peak > e_sft.peak
    f_sft = flops_per_token(arch, "lora", 512)
    f_dpo = flops_per_token(arch, "lora", 512, objective="dpo")
    f_pre = flops_per_token(arch, "lora", 512, objective="dpo", precompute_reference=True)
    assert f_pre == pytest.approx(2 * f_sft)
    # two reference forwards (2 x 2N) cost about one LoRA step (4N: no weight gradients)
    assert f_dpo - f_pre == pytest.approx(f_sft, rel=0.1) and f_dpo - f_pre < f_sft
    assert (
        flops_per_token(arch, "lora", 512, objective="kto")
        > flops_per_token(arch, "lora", 512, objective="kto", precompute_reference=True)
        > f_sft
    )


def test_the_job_objective_reaches_the_planner():
    cfg = load_config(None, ["method.objective=kto", "method.precompute_reference=true"])
    setup = base_setup(cfg, device="cpu")
    assert (setup.objective, setup.precompute_reference) == ("kto", True)
    assert setup.forward_only_tokens == setup.tokens
