"""Score a loaded candidate on the general suite, and run the suite at the end of training.

Metrics (0-100, one value per question, so compare.py bootstraps them like any other):
  general          accuracy over all questions: the highest summed log-prob choice ("choice" tasks,
                   BIG-bench's multiple_choice_grade), the greedy continuation is the target ("answer")
  general_norm     the same with each choice's log-prob divided by its length in characters
                   (lm-evaluation-harness's acc_norm), so long choices are not penalised for length
  general_<task>   `general` on one task's 100 questions
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaforge.data.types import Message
from llamaforge.evaluate.config import GENERAL_METRICS, GeneralSuiteConfig  # noqa: F401 - re-exported
from llamaforge.evaluate.general.scoring import ChoiceScores, Request, score_requests
from llamaforge.evaluate.general.suite import Suite
from llamaforge.evaluate.metrics import MetricScores

log = logging.getLogger(__name__)


def requests_for(suite: Suite, tokenizer, template, prompt: str) -> list[Request]:
    """Token ids of each question and of its choices, as the candidate would see them.

    chat: the question is a user turn rendered by the candidate's template with the assistant header
    after it; the choice is the start of the assistant's answer. raw: BIG-bench's plain text (with BOS
    where the tokenizer adds one) and the choice after a space, as lm-evaluation-harness does."""
    requests = []
    for ex in suite.examples:
        if prompt == "chat":
            context = template.encode_prompt([Message("user", ex.prompt)])
            choices = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in ex.choices]
        else:
            context = tokenizer(ex.prompt)["input_ids"]
            choices = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in ex.choices]
        requests.append((context, choices))
    return requests


@dataclass
class SuiteScores:
    metrics: dict[str, MetricScores]
    records: list[dict[str, Any]]  # one per question: choices, log-probs, predictions


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first


def suite_metrics(suite: Suite, scores: list[ChoiceScores]) -> SuiteScores:
    """Per-question correctness (0 or 100) and the metrics built from it."""
    right, right_norm, records = [], [], []
    for ex, sc in zip(suite.examples, scores, strict=True):
        if ex.kind == "answer":
            ok = any(sc.greedy[i] for i in ex.correct)
            pred = pred_norm = next((i for i, g in enumerate(sc.greedy) if g), _argmax(sc.logprobs))
            ok_norm = ok
        else:
            normalised = [lp / max(len(c), 1) for lp, c in zip(sc.logprobs, ex.choices, strict=True)]
            pred, pred_norm = _argmax(sc.logprobs), _argmax(normalised)
            ok, ok_norm = pred in ex.correct, pred_norm in ex.correct
        right.append(100.0 * ok)
        right_norm.append(100.0 * ok_norm)
        records.append(
            {
                "task": ex.task,
                "index": ex.index,
                "kind": ex.kind,
                "prompt": ex.prompt,
                "choices": ex.choices,
                "correct": ex.correct,
                "logprobs": [round(v, 5) for v in sc.logprobs],
                "greedy": sc.greedy,
                "tokens": sc.num_tokens,
                "prediction": pred,
                "prediction_norm": pred_norm,
                "right": ok,
                "right_norm": ok_norm,
            }
        )
    metrics = {
        "general": MetricScores("general", right),
        "general_norm": MetricScores("general_norm", right_norm),
    }
    for task in suite.task_names():
        metrics[f"general_{task}"] = MetricScores(
            f"general_{task}", [v for v, ex in zip(right, suite.examples, strict=True) if ex.task == task]
        )
    return SuiteScores(metrics, records)


def score_suite(
    model, tokenizer, template, suite: Suite, cfg: GeneralSuiteConfig, *, desc: str = "general"
) -> SuiteScores:
    requests = requests_for(suite, tokenizer, template, cfg.prompt)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = score_requests(
        model, requests, batch_size=cfg.batch_size, precision=cfg.precision, pad_id=pad, desc=desc
    )
    return suite_metrics(suite, scores)


def write_suite_jsonl(path: Path, result: SuiteScores) -> Path:
    with Path(path).open("w", encoding="utf-8") as f:
        for record in result.records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return Path(path)


def read_suite_jsonl(path: Path) -> dict[str, MetricScores]:
    """The suite's metrics rebuilt from a `<candidate>.general.jsonl` (to compare runs scored apart)."""
    records = [
        json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    right = [100.0 * r["right"] for r in records]
    metrics = {
        "general": MetricScores("general", right),
        "general_norm": MetricScores("general_norm", [100.0 * r["right_norm"] for r in records]),
    }
    for task in dict.fromkeys(r["task"] for r in records):
        metrics[f"general_{task}"] = MetricScores(
            f"general_{task}", [v for v, r in zip(right, records, strict=True) if r["task"] == task]
        )
    return metrics
