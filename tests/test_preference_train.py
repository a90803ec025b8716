"""`method.objective: dpo | kto | orpo` through the training recipe on the tiny Llama."""

from __future__ import annotations

import json
import math

import pytest

from conftest import chat_rows, read_metrics, write_jsonl
from llamaforge.config import load_config
from llamaforge.errors import ConfigError
from llamaforge.train.recipe import run_training

REWARDS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}


def pair_rows(n: int) -> list[dict]:
    """Prompts from chat_rows; the chosen answer is the requested words, the rejected one them reversed."""
    return [
        {
            "prompt": r["instruction"],
            "chosen": r["output"],
            "rejected": " ".join(reversed(r["output"].split())),
        }
        for r in chat_rows(n)
    ]


def kto_rows(n: int) -> list[dict]:
    rows = pair_rows(n)
    return [
        {"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
        for i, r in enumerate(rows)
    ]


def job(tmp_path, model_dir, data, **extra):
    overrides = [
        f"model.source={model_dir}",
        f"data.sources=[{{path: {data}}}]",
        "data.template=llama3",
        "data.val_size=3",
        f"output.dir={tmp_path / 'runs'}",
        "output.name=p",
        "eval.prompts=[]",
        "train.batch_size=4",
        "train.lr=3e-2",
        "train.warmup_ratio=0",
        "train.precision=fp32",
        "method.rank=4",
        "method.dropout=0",
        "method.beta=0.5",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def test_dpo_lora_run_logs_rewards_and_learns_the_preference(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(15))
    # every step sees all 12 training pairs (4 x 3 micro-batches), so the descent is not batch noise
    extra = {"method.objective": "dpo", "train.max_steps": 8, "train.grad_accum": 3, "train.lr": 1e-2}
    run_dir, summary = run_training(job(tmp_path, tiny_llama_dir, data, **extra))
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    assert len(steps) == 8 and all(set(r) >= REWARDS for r in steps)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # a fresh LoRA is the reference
    assert steps[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert steps[-1]["rewards/margins"] > 0.1 and steps[-1]["loss"] < math.log(2) - 0.05, steps
    card = json.loads((run_dir / "data_card.json").read_text())
    assert (card["kind"], card["train_records"], card["val_records"]) == ("pairs", 12, 3)
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert {"eval_rewards/margins", "eval_rewards/accuracies"} <= set(summary["after"])
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert len((run_dir / "val.jsonl").read_text().splitlines()) == 3


def test_kto_full_fine_tuning_needs_and_uses_a_precomputed_reference(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows(12))
    base = {"method.objective": "kto", "method.name": "full", "train.max_steps": 4, "train.lr": 1e-3}
    with pytest.raises(ConfigError, match="precompute_reference"):
        run_training(job(tmp_path / "a", tiny_llama_dir, data, **base))
    run_dir, _ = run_training(
        job(tmp_path / "b", tiny_llama_dir, data, **base, **{"method.precompute_reference": True})
    )
    assert (run_dir / "reference_logps.pt").is_file()
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    assert len(steps) == 4 and {"rewards/chosen", "rewards/rejected"} <= set(steps[0])
    assert steps[0]["loss"] == pytest.approx(
        0.5, abs=1e-5
    )  # policy = reference: 1 - sigmoid(0) for every example
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_orpo_lora_run_and_packing_is_refused(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(10))
    run_dir, _ = run_training(
        job(tmp_path, tiny_llama_dir, data, **{"method.objective": "orpo", "train.max_steps": 4})
    )
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    assert len(steps) == 4 and set(steps[-1]) >= REWARDS and steps[-1]["loss"] < steps[0]["loss"]
    with pytest.raises(ConfigError, match="packing"):
        run_training(
            job(tmp_path / "c", tiny_llama_dir, data, **{"method.objective": "orpo", "train.packing": True})
        )


@pytest.mark.slow  # ~2 min: three full fine-tuning runs
def test_resumed_full_kto_run_reloads_its_reference_and_continues_the_same_losses(tmp_path, tiny_llama_dir):
    """A resumed run reads the reference log-probs saved by its first start, and continues the losses of a
    straight run exactly."""
    from conftest import step_losses
    from llamaforge.train.recipe import FineTuneRecipe

    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows(12))
    extra = {
        "method.objective": "kto",
        "method.name": "full",
        "method.precompute_reference": True,
        "train.max_steps": 6,
        "train.save_every": 3,
        "train.lr": 1e-3,
        "eval.before_after": False,
    }
    straight, _ = run_training(job(tmp_path / "a", tiny_llama_dir, data, **extra))
    first = job(tmp_path / "b", tiny_llama_dir, data, **extra)
    recipe = FineTuneRecipe(first)
    recipe.setup()
    recipe.total_steps = 3  # stop half-way, as an interrupted run would
    recipe.train()
    resumed, _ = run_training(first, run_dir=recipe.run_dir, resume=True)
    assert len(step_losses(resumed)) == 6
    assert step_losses(resumed) == pytest.approx(step_losses(straight), rel=1e-5)
