"""Side-by-side table: point values, paired bootstrap intervals, renderers, the --fail-if gate, jsonl."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import sacrebleu

from llamaforge.data.types import Message
from llamaforge.errors import LlamaforgeError
from llamaforge.evaluate import compare as C
from llamaforge.evaluate import rules as R
from llamaforge.evaluate.config import EvalMetricsConfig
from llamaforge.evaluate.metrics import compute_metrics
from llamaforge.evaluate.scores import EvalScores, MetricScores, aggregate, token_loss_scores

REFS = [
    "A man has been arrested after a woman was stabbed in Leeds.",
    "The cost of living rose by 3.2% in the year to March.",
    "Scientists say they have found liquid water on Mars.",
    "Wales coach Warren Gatland has named his Six Nations squad.",
    "Heavy rain has caused flooding across the north of England.",
    "The Bank of England has kept interest rates on hold.",
] * 5
BASE = ["Leeds news.", "Prices.", "", "Rugby.", "It rained.", "Rates."] * 5
TUNED = [
    "A man was arrested after a woman was stabbed in Leeds.",
    "Living costs rose 3.2% in the year to March.",
    "Scientists have found water on Mars.",
    "Warren Gatland has named his Wales squad.",
    "Flooding hit the north of England after heavy rain.",
    "Interest rates were kept on hold by the Bank of England.",
] * 5
CFG = EvalMetricsConfig(metrics=["bleu", "rouge", "exact_match"])


@pytest.fixture(scope="module")
def scored():
    return {"base": compute_metrics(BASE, REFS, CFG), "tuned": compute_metrics(TUNED, REFS, CFG)}


def test_table_values_and_deltas(scored):
    table = C.compare(scored, bootstrap_samples=200)
    assert table.candidates == ["base", "tuned"] and table.metrics[:2] == ["bleu", "rouge1"]
    assert table.value("tuned", "bleu") == pytest.approx(sacrebleu.corpus_bleu(TUNED, [REFS]).score)
    rl = table.cells["rougeL"]
    assert rl["tuned"].delta == pytest.approx(rl["tuned"].value - rl["base"].value)
    assert rl["base"].delta is None and rl["tuned"].significant
    lo, hi = rl["tuned"].delta_ci
    assert lo <= rl["tuned"].delta <= hi
    assert table.empty_outputs == {"base": 5, "tuned": 0}
    assert table.num_examples["bleu"] == len(REFS)


def test_bootstrap_is_seeded_and_paired():
    rng = np.random.default_rng(0)
    noisy = rng.normal(50, 20, size=300)
    a = {"m": MetricScores("m", noisy)}
    shifted = {"m": MetricScores("m", noisy + 1.5)}
    t1 = C.compare({"a": a, "b": shifted}, seed=3)
    t2 = C.compare({"a": a, "b": shifted}, seed=3)
    t3 = C.compare({"a": a, "b": shifted}, seed=4)
    assert t1.cells["m"]["b"].ci == t2.cells["m"]["b"].ci
    assert t1.cells["m"]["b"].ci != t3.cells["m"]["b"].ci
    # paired: a constant shift on every example has a zero-width delta interval,
    # although each candidate's own interval is wide (~ +-2.3)
    assert t1.cells["m"]["b"].delta_ci == pytest.approx((1.5, 1.5))
    lo, hi = t1.cells["m"]["a"].ci
    assert hi - lo > 3
    # and the own interval is close to the normal approximation mean +- 1.96 sd / sqrt(n)
    half = 1.96 * noisy.std(ddof=1) / np.sqrt(len(noisy))
    assert (lo, hi) == pytest.approx((noisy.mean() - half, noisy.mean() + half), abs=0.5)


def test_vectorised_resampling_equals_explicit_resampling(scored):
    """Weights (B, N) of draw counts give the same statistic as materialising each resample."""
    rng = np.random.default_rng(1)
    n = len(REFS)
    idx = rng.integers(0, n, size=(50, n))
    w = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(float)
    assert np.array_equal(C._bootstrap_weights(np.random.default_rng(1), 50, n), w)
    bleu, rouge = scored["tuned"].metrics["bleu"], scored["tuned"].metrics["rougeL"]
    vec_bleu, vec_rouge = aggregate(bleu, w), aggregate(rouge, w)
    for b, rows in enumerate(idx):
        assert vec_rouge[b] == pytest.approx(rouge.values[rows].mean())
        resampled = sacrebleu.corpus_bleu([TUNED[i] for i in rows], [[REFS[i] for i in rows]]).score
        assert vec_bleu[b] == pytest.approx(resampled, abs=1e-9)


def test_bootstrap_chunks_do_not_change_results(monkeypatch, scored):
    whole = C.compare(scored, bootstrap_samples=300, seed=7)
    monkeypatch.setattr(C, "_CHUNK_CELLS", len(REFS) * 7)  # 43 chunks of 7 resamples
    again = C.compare(scored, bootstrap_samples=300, seed=7)
    for metric in whole.metrics:
        for name in whole.candidates:
            a, b = whole.cells[metric][name], again.cells[metric][name]
            assert b.ci == pytest.approx(a.ci, rel=1e-12, abs=1e-12)
            if a.delta_ci is not None:
                assert b.delta_ci == pytest.approx(a.delta_ci, rel=1e-12, abs=1e-12)


def test_no_bootstrap_and_lower_is_better_metrics():
    a = token_loss_scores([20.0, 30.0], [10, 10])
    b = token_loss_scores([15.0, 25.0], [10, 10])
    table = C.compare({"base": a, "tuned": b}, bootstrap_samples=0)
    assert table.cells["loss"]["tuned"].delta == pytest.approx(-0.5)
    assert table.cells["loss"]["tuned"].ci is None and not table.cells["loss"]["tuned"].significant
    assert "loss (lower is better)" in table.to_text()


def test_invalid_comparisons(scored):
    with pytest.raises(LlamaforgeError, match="letters, digits"):
        C.compare({"my-run": scored["base"]})
    other = compute_metrics(TUNED[:-1], REFS[:-1], CFG)
    with pytest.raises(LlamaforgeError, match="different examples"):
        C.compare({"base": scored["base"], "short": other})
    bare = {k: v for k, v in other.metrics.items()}  # no fingerprint: caught by the sizes
    with pytest.raises(LlamaforgeError, match="different numbers of examples"):
        C.compare({"base": scored["base"], "short": bare})
    with pytest.raises(LlamaforgeError, match="no candidates"):
        C.compare({})


def test_missing_metric_shows_as_dash(scored):
    extra = EvalScores({**scored["tuned"].metrics, "x": MetricScores("x", np.ones(len(REFS)))}, len(REFS))
    table = C.compare({"base": scored["base"], "tuned": extra}, bootstrap_samples=50)
    assert table.cells["x"]["base"] is None and table.cells["x"]["tuned"].delta is None
    assert re.search(r"^x\s+-\s", table.to_text(), re.M)


# ---------------------------------------------------------------- --fail-if


@pytest.mark.parametrize(
    ("text", "lhs", "op", "rhs"),
    [
        (
            "quantized.rougeL < merged.rougeL - 1",
            ((1, "quantized.rougeL"),),
            "<",
            ((1, "merged.rougeL"), (-1, 1.0)),
        ),
        ("tuned.bleu>=base.bleu+0.5", ((1, "tuned.bleu"),), ">=", ((1, "base.bleu"), (1, 0.5))),
        ("  base.exact_match <= 1e1 ", ((1, "base.exact_match"),), "<=", ((1, 10.0),)),
        ("-1 + a.m > -b.m - -2", ((-1, 1.0), (1, "a.m")), ">", ((-1, "b.m"), (1, 2.0))),
        ("a.loss - b.loss > .05", ((1, "a.loss"), (-1, "b.loss")), ">", ((1, 0.05),)),
    ],
)
def test_rule_parsing(text, lhs, op, rhs):
    rule = R.parse_rule(text)
    assert (rule.lhs, rule.op, rule.rhs) == (lhs, op, rhs)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.m b.m", "exactly one comparison"),
        ("a.m < b.m < c.m", "exactly one comparison"),
        ("a.m < b.m -", "empty or ends"),
        ("< 3", "empty or ends"),
        ("a.m < 3 4", "without \\+ or -"),
        ("a.m == b.m", "cannot read '=="),
        ("rougeL < 3", "cannot read 'rougeL"),
        ("a.m * 2 < 3", "cannot read"),
    ],
)
def test_rule_errors(text, message):
    with pytest.raises(R.RuleError, match=message):
        R.parse_rule(text)


def test_gate(scored):
    table = C.compare(scored, bootstrap_samples=0)
    rl_base, rl_tuned = table.value("base", "rougeL"), table.value("tuned", "rougeL")
    results = R.evaluate_rules(
        [
            "tuned.rougeL < base.rougeL - 1",  # tuned is far better: holds not
            "base.rougeL < tuned.rougeL - 1",  # base is far worse: holds -> fails the gate
            "tuned.bleu >= 0",
            "tuned.exact_match > 100",
        ],
        table,
    )
    assert [r.failed for r in results] == [False, True, True, False]
    assert results[1].lhs == pytest.approx(rl_base) and results[1].rhs == pytest.approx(rl_tuned - 1)
    assert [r.rule for r in R.failed_rules(["base.rougeL < tuned.rougeL - 1"], table)] == [
        "base.rougeL < tuned.rougeL - 1"
    ]
    assert "FAILED: base.rougeL" in results[1].describe()
    with pytest.raises(LlamaforgeError, match="unknown candidate 'merged'; candidates: base, tuned"):
        R.evaluate_rules(["merged.rougeL < 1"], table)
    with pytest.raises(LlamaforgeError, match="unknown metric 'rogueL'"):
        R.evaluate_rules(["base.rogueL < 1"], table)


# ---------------------------------------------------------------- renderers


def test_renderers(scored):
    table = C.compare(scored, bootstrap_samples=100)
    gate = R.evaluate_rules(["tuned.rougeL < base.rougeL"], table)
    text = table.to_text(gate)
    assert text.splitlines()[0].split() == ["metric", "base", "tuned"]
    assert "Δ vs base" in text and "ok: tuned.rougeL < base.rougeL" in text and "tok:13a" in text
    md = table.to_markdown(gate).splitlines()
    assert md[0] == "| metric | base | tuned |" and md[1] == "|---|---:|---:|"
    assert len([line for line in md if line.startswith("| ")]) == 1 + len(table.metrics)
    data = json.loads(table.to_json(gate))
    assert data["metrics"]["bleu"]["tuned"]["value"] == pytest.approx(table.value("tuned", "bleu"))
    assert data["gate"][0]["failed"] is False and data["bootstrap"]["samples"] == 100
    page = table.to_html(gate, title="base <vs> tuned")
    assert page.startswith("<!doctype html>") and "<table>" in page and "base &lt;vs&gt; tuned" in page
    assert not re.search(r"(src|href)=|https?://|<script", page)  # self-contained
    assert 'class="d better"' in page  # significant improvement is marked


# ---------------------------------------------------------------- per-example jsonl


def test_examples_jsonl_round_trip(tmp_path, scored):
    prompts = [[Message("user", f"Summarise article {i}")] for i in range(len(REFS))]
    path = C.write_examples_jsonl(
        tmp_path / "per_example" / "base.jsonl", scored["base"], BASE, REFS, prompts
    )
    lines = path.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    assert set(first) == {"index", "prompt", "reference", "output", "empty", "scores", "stats"}
    assert first["prompt"] == [{"role": "user", "content": "Summarise article 0"}]
    assert json.loads(lines[2])["empty"] is True and json.loads(lines[2])["scores"]["rougeL"] == 0.0
    records, rebuilt = C.read_examples_jsonl(path)
    assert len(records) == len(REFS) and rebuilt.empty_outputs == scored["base"].empty_outputs
    assert rebuilt.references_sha256 == scored["base"].references_sha256
    original = C.compare(scored, bootstrap_samples=100).to_dict()
    again = C.compare({"base": rebuilt, "tuned": scored["tuned"]}, bootstrap_samples=100).to_dict()
    assert again["metrics"] == original["metrics"]
    # a loss measured on another split (other examples) sits in the table but not in the per-example file
    mixed = EvalScores({**scored["base"].metrics, **token_loss_scores([9.0] * 7, [4] * 7)}, len(REFS))
    _, rebuilt = C.read_examples_jsonl(C.write_examples_jsonl(tmp_path / "mixed.jsonl", mixed, BASE, REFS))
    assert "loss" not in rebuilt.metrics and "bleu" in rebuilt.metrics
    assert C.compare({"a": mixed, "b": mixed}, bootstrap_samples=20).num_examples["loss"] == 7
    with pytest.raises(LlamaforgeError, match="6 outputs"):
        C.write_examples_jsonl(tmp_path / "x.jsonl", scored["base"], BASE[:6], REFS)
