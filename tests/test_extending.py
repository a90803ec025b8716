"""Extension axes take a new member from outside the package (as docs/extending.md shows): a toy
metric and a toy training method, registered here, used through the normal entry points."""

from __future__ import annotations

import json

import pytest

from conftest import chat_rows, write_jsonl
from llamaforge.config import load_config
from llamaforge.errors import ConfigError
from llamaforge.evaluate.metrics import compute_metrics
from llamaforge.evaluate.scores import MetricScores
from llamaforge.registry import METHODS, METRICS, Method, Metric


def length_ratio(outputs, references, config) -> dict[str, MetricScores]:
    """Output words per reference word, x100 (0-100 scale like the others, capped)."""
    values = [
        min(100.0, 100.0 * len(o.split()) / max(len(r.split()), 1)) for o, r in zip(outputs, references)
    ]
    return {"length_ratio": MetricScores("length_ratio", values)}


def train_norms_only(model, method_cfg, gradient_checkpointing):
    """Train the RMSNorm weights only; the run saves the whole model."""
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name)
    return model


@pytest.fixture()
def toy_members():
    metric = METRICS.register(
        Metric("length_ratio", ("length_ratio",), length_ratio, curve=("length_ratio",))
    )
    method = METHODS.register(
        Method(
            "norms",
            train_norms_only,
            "model",
            mergeable=False,
            hot_swappable=False,
            planner="full",
            quantized_base=False,
        )
    )
    yield metric, method
    METRICS.unregister("length_ratio")
    METHODS.unregister("norms")


def test_a_registered_metric_is_validated_scored_and_gated(toy_members):
    cfg = load_config(
        None,
        [
            "evaluation.scoring.metrics=[exact_match, length_ratio]",
            "evaluation.scoring.fail_if=['tuned.length_ratio < 50']",
        ],
    )
    scoring = cfg.evaluation.scoring
    assert scoring.metric_names() == ["exact_match", "length_ratio"]
    scores = compute_metrics(["a b", "a b c d"], ["a b c d", "a b c d"], scoring)
    assert scores.summary()["length_ratio"] == pytest.approx(75.0)
    with pytest.raises(ConfigError, match="did you mean 'length_ratio'"):
        load_config(None, ["evaluation.scoring.metrics=[length_ratoi]"])


def test_a_registered_metric_joins_the_training_curves(toy_members, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamaforge.data.types import Message
    from llamaforge.templates import get_template
    from llamaforge.train.monitor import generation_scores

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    template = get_template("llama3", tokenizer)
    sample = [([Message("user", "Say two words.")], "two words")]
    scores = generation_scores(
        model, tokenizer, template, sample, max_new_tokens=3, batch_size=1, precision="fp32"
    )
    assert "eval_length_ratio" in scores and "eval_rougeL" in scores


def test_a_registered_method_trains_saves_and_loads(toy_members, tmp_path, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from llamaforge.runs import Run
    from llamaforge.train.recipe import run_training

    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(12))
    cfg = load_config(
        None,
        [
            f"model.source={tiny_llama_dir}",
            f"data.sources=[{{path: {data}}}]",
            "data.template=llama3",
            "data.val_size=0.25",
            f"output.dir={tmp_path / 'runs'}",
            "output.name=norms",
            "eval.prompts=[]",
            "eval.before_after=false",
            "train.batch_size=4",
            "train.max_steps=2",
            "train.lr=1e-1",
            "train.precision=fp32",
            "method.name=norms",
        ],
    )
    with pytest.raises(ConfigError, match="cannot train 4bit"):
        load_config(None, ["method.name=norms", "model.quantization=4bit"])
    run_dir, _ = run_training(cfg)
    run = Run.open(run_dir)
    assert (run.method, run.weights, run.status) == ("norms", "model", "completed")
    assert (
        len((run_dir / "val.jsonl").read_text().splitlines())
        == json.loads((run_dir / "data_card.json").read_text())["val_records"]
    )
    tuned, _ = run.load()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, base.get_parameter(n))}
    assert changed and all("norm" in n for n in changed)
