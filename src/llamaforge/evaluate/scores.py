"""Per-example scores and how they aggregate: the numbers every metric, table and bootstrap share.

A metric keeps its per-example values (so any number traces back to examples, and compare.py can
bootstrap them) plus, where the reported number is not a plain mean, the sufficient statistics it
is computed from (corpus BLEU, token-weighted loss).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from llamaforge.errors import LlamaforgeError

Kind = Literal["mean", "bleu", "loss", "perplexity"]
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})
BLEU_ORDER = 4


@dataclass
class MetricScores:
    """One metric on N examples: per-example values and how they aggregate to the reported number.

    kind "mean": the mean of `values`. kind "bleu": corpus BLEU from the summed `stats`
    (sys_len, ref_len, 4 matches, 4 totals; `values` hold sentence BLEU). kind "loss"/"perplexity":
    sum of token NLL over sum of tokens (`stats` = [nll_sum, n_tokens]), exponentiated for perplexity.
    """

    name: str
    values: np.ndarray
    kind: Kind = "mean"
    stats: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.stats is not None:
            self.stats = np.asarray(self.stats, dtype=np.float64)
        if self.kind != "mean" and (self.stats is None or len(self.stats) != len(self.values)):
            raise ValueError(f"metric {self.name} of kind {self.kind} needs one stats row per example")

    def __len__(self) -> int:
        return len(self.values)

    @property
    def higher_is_better(self) -> bool:
        return self.kind not in LOWER_IS_BETTER

    def value(self) -> float:
        return float(aggregate(self, None)[0])


def bleu_from_stats(stats: np.ndarray) -> np.ndarray:
    """Corpus BLEU-4 (0-100) for each row of summed stats, exactly as sacrebleu's compute_bleu with
    smooth_method='exp' and effective_order=False (vectorised, for the bootstrap)."""
    stats = np.atleast_2d(np.asarray(stats, dtype=np.float64))
    sys_len, ref_len = stats[:, 0], stats[:, 1]
    correct, total = stats[:, 2 : 2 + BLEU_ORDER], stats[:, 2 + BLEU_ORDER : 2 + 2 * BLEU_ORDER]
    with np.errstate(divide="ignore", invalid="ignore"):
        bp = np.where(
            sys_len < ref_len, np.where(sys_len > 0, np.exp(1 - ref_len / np.maximum(sys_len, 1)), 0.0), 1.0
        )
        # 'exp' smoothing: the k-th order with zero matches gets precision 1 / (2^k * total).
        zero_rank = np.cumsum(correct == 0, axis=1)
        smoothed = 100.0 / (np.power(2.0, zero_rank) * total)
        precision = np.where(correct > 0, 100.0 * correct / total, smoothed)
        log_mean = np.log(precision).mean(axis=1)
    # An order with no n-grams at all (short corpus) or no match anywhere gives 0, as in sacrebleu.
    valid = (total > 0).all(axis=1) & (correct > 0).any(axis=1)
    return np.where(valid, bp * np.exp(np.where(valid, log_mean, 0.0)), 0.0)


def summable(metric: MetricScores) -> np.ndarray:
    """(N, k) per-example columns whose weighted sums determine the reported number."""
    return metric.values[:, None] if metric.kind == "mean" else metric.stats


def from_sums(metric: MetricScores, sums: np.ndarray, weight_totals: np.ndarray) -> np.ndarray:
    """The reported number from weighted column sums (B, k) and the total weight of each row (B,)."""
    if metric.kind == "mean":
        return sums[:, 0] / weight_totals
    if metric.kind == "bleu":
        return bleu_from_stats(sums)
    loss = sums[:, 0] / np.maximum(sums[:, 1], 1)
    return loss if metric.kind == "loss" else np.exp(loss)


def aggregate(metric: MetricScores, weights: np.ndarray | None) -> np.ndarray:
    """The reported number under example weights (B, N) — bootstrap counts; None = every example once."""
    n = len(metric)
    w = np.ones((1, n)) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    return from_sums(metric, w @ summable(metric), w.sum(axis=1))


def token_loss_scores(nll_sums: Sequence[float], token_counts: Sequence[int]) -> dict[str, MetricScores]:
    """Held-out loss and perplexity, token-weighted (sum of NLL / number of target tokens)."""
    nll, ntok = np.asarray(nll_sums, dtype=np.float64), np.asarray(token_counts, dtype=np.float64)
    if nll.shape != ntok.shape:
        raise LlamaforgeError(f"{len(nll)} loss sums but {len(ntok)} token counts")
    stats = np.stack([nll, ntok], axis=1)
    per_example = nll / np.maximum(ntok, 1)
    return {
        "loss": MetricScores("loss", per_example, "loss", stats),
        "perplexity": MetricScores("perplexity", np.exp(per_example), "perplexity", stats),
    }


@dataclass
class EvalScores:
    """All metrics of one candidate on one task set."""

    metrics: dict[str, MetricScores]
    num_examples: int
    empty_outputs: list[int] = field(default_factory=list)
    references_sha256: str | None = None
    info: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Reported numbers, e.g. for metrics.jsonl: {'bleu': 4.1, 'rougeL': 21.3, ...}."""
        out = {name: round(m.value(), 4) for name, m in self.metrics.items()}
        out["num_examples"] = self.num_examples
        out["empty_outputs"] = len(self.empty_outputs)
        return out

    def per_example(self, index: int) -> dict[str, float]:
        """Scores of one task example (metrics measured on other examples, e.g. a loss split, are left out)."""
        return {
            name: float(m.values[index]) for name, m in self.metrics.items() if len(m) == self.num_examples
        }


def references_fingerprint(references: Sequence[str]) -> str:
    h = hashlib.sha256()
    for ref in references:
        h.update(ref.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()
