"""The real default model (SmolLM2-135M-Instruct, Llama architecture): loss falls, the answer changes."""

from __future__ import annotations

import pytest

from llamaforge.config import load_config
from llamaforge.train.recipe import run_training


@pytest.mark.slow  # ~2 min of real training on 2 CPU cores; `make quickstart` runs the same job shape
def test_identity_lora_on_the_default_model(tmp_path):
    cfg = load_config(
        None,
        [
            "data.sources=[{path: identity, variables: {name: Forge, author: the llamaforge team}}]",
            "data.val_size=12",
            "data.max_length=256",
            f"output.dir={tmp_path}",
            "output.name=it",
            "train.max_steps=30",
            "train.batch_size=8",
            "train.lr=1e-3",
            "train.warmup_ratio=0.1",
            "eval.prompts=['Who are you?']",
            "eval.max_new_tokens=24",
        ],
    )
    run_dir, summary = run_training(cfg)
    before, after = summary["before"], summary["after"]
    assert after["eval_loss"] < 0.6 * before["eval_loss"], (before["eval_loss"], after["eval_loss"])
    answer_before, answer_after = before["answers"]["Who are you?"], after["answers"]["Who are you?"]
    assert answer_after != answer_before
    assert "Forge" in answer_after, answer_after
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
