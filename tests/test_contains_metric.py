"""The `contains` metric: the reference as whole words anywhere in the output (the feedback loop's
gate: "the answer says Forge"), through the registry like any other metric."""

from __future__ import annotations

from llamaforge.evaluate.config import EvalMetricsConfig
from llamaforge.evaluate.metrics import compute_metrics, contains


def test_contains_matches_whole_words_after_normalisation():
    assert contains("I am Forge, an AI assistant.", "Forge") == 100.0
    assert contains("i am FORGE!", "forge") == 100.0
    assert contains("I am Forgetful.", "Forge") == 0.0  # a word, not a substring of one
    assert contains("made by the llamaforge team", "llamaforge team") == 100.0
    assert contains("anything", "") == 0.0  # an empty reference matches nothing
    assert contains("", "Forge") == 0.0


def test_contains_is_a_registered_metric():
    scores = compute_metrics(
        ["I am Forge.", "My name is Leia.", "Forge here"],
        ["Forge"] * 3,
        EvalMetricsConfig(metrics=["contains"]),
    )
    assert list(scores.metrics) == ["contains"]
    assert scores.metrics["contains"].values.tolist() == [100.0, 0.0, 100.0]
