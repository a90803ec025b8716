"""`llamaforge train --dry-run`: the planner's memory estimate for the job as the recipe would run it."""

from __future__ import annotations

import re

import pytest

from llamaforge.cli import main
from llamaforge.planning.memory import GiB


def parse(text: str) -> dict:
    assert "memory estimate" in text, text
    numbers = {
        k: float(v) for k, v in re.findall(r"(weights|gradients|optimizer|activations|peak) (\d+\.\d+)", text)
    }
    available = float(re.search(r"(\d+\.\d+) GiB of RAM available", text).group(1))
    return {"text": text, "available": available, **numbers}


def dry_run(capsys, *overrides) -> dict:
    """The whole command, as a user runs it."""
    assert main(["train", "--dry-run", *overrides]) == 0
    return parse("\n".join(line for line in capsys.readouterr().out.splitlines() if line.startswith("#")))


def estimate_lines(model_dir, *overrides) -> dict:
    """Only the memory lines (no parameter count on a meta model): the variants of one job."""
    from transformers import AutoConfig

    from llamaforge.config import load_config
    from llamaforge.planning.dry_run import memory_lines

    return parse(
        "\n".join(memory_lines(load_config(None, list(overrides)), AutoConfig.from_pretrained(model_dir)))
    )


@pytest.fixture(scope="module")
def default_model():
    from llamaforge.catalog import resolve

    try:
        return resolve("smollm2-135m-instruct")
    except Exception as exc:  # noqa: BLE001 - no cache and no PyPI: nothing to estimate from
        pytest.skip(f"default model not available: {exc}")


def test_default_job_estimate_is_sensible(capsys, default_model):
    lora = dry_run(capsys, "train.batch_size=4")
    assert "(lora, micro-batch 4 x 1024 tokens" in lora["text"] and "on cpu" in lora["text"]
    assert "note: precision: " in lora["text"]  # the resolved precision, with its reason
    # 134.5M fp32 weights = 0.50 GiB, plus the LoRA adapter; LoRA gradients and AdamW states are tiny
    assert 0.49 <= lora["weights"] <= 0.53
    assert lora["gradients"] < 0.05 and lora["optimizer"] == pytest.approx(2 * lora["gradients"], abs=0.011)
    assert 1 < lora["activations"] < 20 and lora["peak"] > lora["weights"] + lora["activations"]
    assert ("fits" in lora["text"]) == (lora["peak"] <= lora["available"])

    auto = dry_run(capsys)  # the default: batch_size auto plans the micro-batch within the budget
    assert "batch_size auto, planned at rows of data.max_length: batch: micro-batch" in auto["text"]
    assert auto["peak"] <= 0.6 * auto["available"] and "fits" in auto["text"]

    ckpt = estimate_lines(default_model, "train.batch_size=4", "train.gradient_checkpointing=true")
    assert ckpt["activations"] < lora["activations"] / 3 and ckpt["peak"] < lora["peak"]
    qlora = estimate_lines(default_model, "train.batch_size=4", "method.name=qlora")
    assert qlora["weights"] < lora["weights"] / 2 and "NF4" in qlora["text"]
    full = estimate_lines(default_model, "train.batch_size=4", "method.name=full")
    assert full["optimizer"] == pytest.approx(2 * full["gradients"], abs=0.011) and full["gradients"] > 0.45


def test_a_job_that_cannot_fit_says_so_and_what_to_change(default_model):
    huge = estimate_lines(default_model, "train.batch_size=512", "data.max_length=8192")
    assert huge["peak"] > huge["available"] and "DOES NOT FIT" in huge["text"]
    assert "try: train.gradient_checkpointing=true" in huge["text"]
    assert huge["peak"] * GiB > 100 * GiB
