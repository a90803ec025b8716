"""LLaMA-Factory-compatible scores, so our numbers can sit beside a table published with that tool.

LLaMA-Factory's `predict` stage (and its scripts/eval_bleu_rouge.py) scores each example as:
- bleu-4: NLTK sentence_bleu over *characters* (list(reference) vs list(prediction), spaces
  included), default 4-gram uniform weights, SmoothingFunction().method3;
- rouge-1/2/l: both texts cut into words with jieba, re-joined with spaces, scored with
  rouge-chinese's Rouge (rouge-l is its summary-level LCS); the F-score is reported;
- each score x100 and rounded to 4 decimals per example; the reported number is the plain mean.
  If either text has no tokens after jieba, all three ROUGE scores are 0.
This module re-implements that recipe on the same libraries (it does not import LLaMA-Factory).
Their metric keys map to ours: predict_bleu-4 -> lf_bleu4, predict_rouge-1 -> lf_rouge1,
predict_rouge-2 -> lf_rouge2, predict_rouge-l -> lf_rougeL.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from llamaforge.errors import LlamaforgeError
from llamaforge.evaluate.scores import MetricScores

# LLaMA-Factory's default decoding (GeneratingArguments): sampling is ON by default there, so a
# published LLaMA-Factory table was usually produced with these unless the authors said otherwise.
LLAMAFACTORY_GENERATION: dict[str, float | int | bool] = {
    "do_sample": True,
    "temperature": 0.95,
    "top_p": 0.7,
    "top_k": 50,
    "num_beams": 1,
    "max_new_tokens": 1024,
    "repetition_penalty": 1.0,
}

LF_NAMES = {"bleu-4": "lf_bleu4", "rouge-1": "lf_rouge1", "rouge-2": "lf_rouge2", "rouge-l": "lf_rougeL"}


@lru_cache(maxsize=1)
def _libs():
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as exc:
        raise LlamaforgeError(
            f"the llamafactory metrics need jieba, nltk and rouge-chinese ({exc.name} is missing): "
            "pip install 'llamaforge[eval]'"
        ) from exc
    jieba.setLogLevel(logging.WARNING)  # silence "Building prefix dict ..." on first use
    return jieba, sentence_bleu, SmoothingFunction().method3, Rouge()


def _words(text: str) -> str:
    jieba = _libs()[0]
    return " ".join(jieba.cut(text))


def llamafactory_example(prediction: str, reference: str) -> dict[str, float]:
    """The four LLaMA-Factory scores of one example, keyed as LLaMA-Factory names them."""
    _, sentence_bleu, method3, rouge = _libs()
    hyp, ref = _words(prediction), _words(reference)
    scores: dict[str, float] = {}
    if hyp.split() and ref.split():
        result = rouge.get_scores(hyp, ref)[0]
        scores.update({k: round(result[k]["f"] * 100, 4) for k in ("rouge-1", "rouge-2", "rouge-l")})
    else:
        scores.update({"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0})
    if prediction:
        bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=method3)
    else:
        bleu = 0.0  # NLTK returns 0 here too (no hypothesis n-grams); skip its warning
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


def llamafactory_scores(outputs: Sequence[str], references: Sequence[str]) -> dict[str, MetricScores]:
    per = {name: np.zeros(len(outputs)) for name in LF_NAMES.values()}
    for i, (out, ref) in enumerate(zip(outputs, references, strict=True)):
        for lf_key, value in llamafactory_example(out, ref).items():
            per[LF_NAMES[lf_key]][i] = value
    return {name: MetricScores(name, values) for name, values in per.items()}
