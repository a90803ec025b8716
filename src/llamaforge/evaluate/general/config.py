"""Settings of the general suite (`evaluation.general`), and the metric names it adds to a table."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llamaforge.schema import Section

SuiteName = Literal["general"]


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
