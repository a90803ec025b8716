"""A studio workspace with a finished tiny run (shared by the studio's API and browser tests).

The run is a real one: the tiny random Llama trained 3 fp32 steps by the recipe, so every file the
studio reads (run.json, metrics.jsonl, summary.json, data_card.json, rejects.jsonl, config.yaml,
checkpoints/) is exactly what training writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_llama, chat_rows, write_jsonl

BAD_RECORDS = [{"instruction": "", "output": "an answer with no question"}, {"question": "wrong field names"}]


def tiny_job(workspace: Path, name: str, **train) -> dict:
    """A 3-step fp32 LoRA job on the workspace's tiny model, with relative paths as a user would write."""
    return {
        "model": {"source": "tiny"},
        "data": {"sources": [{"path": "data/train.jsonl"}], "val_size": 0.25, "max_length": 64},
        "method": {"rank": 4, "alpha": 8},
        "train": {
            "max_steps": 3,
            "batch_size": 4,
            "precision": "fp32",
            "eval_every": 1,
            "lr": 0.01,
            "save_every": 3,
            **train,
        },
        "eval": {"prompts": ["Who are you?"], "max_new_tokens": 6},
        "output": {"dir": "runs", "name": name},
    }


@pytest.fixture(scope="session")
def studio_workspace(tmp_path_factory, llama3_tokenizer_dir) -> Path:
    """<ws>/tiny (model), <ws>/data/train.jsonl (24 good + 2 bad records), <ws>/runs/done (finished) and
    <ws>/runs/eval-done (`llamaforge eval` of its base and adapter on 6 held-out records) and <ws>/prepared
    (`llamaforge prepare` of the same data, 8 records in review.csv)."""
    import os

    from llamaforge.config import JobConfig
    from llamaforge.evaluate.runner import EvaluationConfig, run_evaluation
    from llamaforge.train.recipe import run_training

    workspace = tmp_path_factory.mktemp("studio-ws")
    build_tiny_llama(workspace / "tiny", llama3_tokenizer_dir)
    (workspace / "data").mkdir()
    write_jsonl(workspace / "data" / "train.jsonl", chat_rows(24) + BAD_RECORDS)
    job = tiny_job(workspace, "done")
    (workspace / "done.yaml").write_text(yaml.safe_dump(job))
    cwd = os.getcwd()
    os.chdir(workspace)  # relative paths, as the studio's jobs (which run inside the workspace) see them
    try:
        run_training(JobConfig.model_validate(job))
        write_jsonl(workspace / "data" / "eval.jsonl", chat_rows(30)[24:])
        evaluation = EvaluationConfig.model_validate(
            {
                "candidates": ["base=base:runs/done", "tuned=runs/done"],
                "task": {"path": "data/eval.jsonl"},
                "generation": {"max_new_tokens": 6},
                "scoring": {"bootstrap_samples": 200, "fail_if": ["tuned.loss > base.loss + 1"]},
            }
        )
        run_evaluation(evaluation, "runs/eval-done")
        from llamaforge.cli import main

        assert (
            main(["prepare", "done.yaml", "prepare.output_dir=prepared", "prepare.review.sample_size=8"]) == 0
        )
    finally:
        os.chdir(cwd)
    return workspace


def run_files(run_dir: Path) -> tuple[dict, dict, list[dict]]:
    """(run.json, summary.json, metrics.jsonl records) as training wrote them."""
    metrics = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    return (
        json.loads((run_dir / "run.json").read_text()),
        json.loads((run_dir / "summary.json").read_text()),
        metrics,
    )
