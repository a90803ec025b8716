"""The general suite joined to `llamaforge eval`'s runner: at the end of training (`eval.general: true`)
and lm-evaluation-harness scores added to a finished table. Kept above both so neither imports the
other (evaluate/general/ scores, evaluate/runner.py orchestrates)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llamaforge.evaluate.general.lm_eval import check_lm_eval, run_lm_eval

log = logging.getLogger(__name__)


def after_training(cfg, run_dir: Path) -> dict[str, Any]:
    """Base vs tuned on the suite, written to <run>/general/results.*; adds `general` to summary.json.

    `cfg` is the job (JobConfig): its evaluation.general and evaluation.dtype are used, none of its
    task or gate settings (those belong to `llamaforge eval`)."""
    from llamaforge.evaluate.config import EvalMetricsConfig, EvaluationConfig
    from llamaforge.evaluate.runner import run_evaluation

    run_dir = Path(run_dir)
    evaluation = EvaluationConfig(
        candidates=[f"base=base:{run_dir}", f"tuned={run_dir}"],
        suites=["general"],
        general=cfg.evaluation.general,
        dtype=cfg.evaluation.dtype,
        loss=False,
        scoring=EvalMetricsConfig(seed=cfg.evaluation.scoring.seed),
    )
    result = run_evaluation(evaluation, run_dir / "general")
    table = result.table
    tuned = table.cells["general"]["tuned"]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["general"] = {
        "base": table.value("base", "general"),
        "tuned": tuned.value,
        "delta": tuned.delta,
        "delta_ci": list(tuned.delta_ci) if tuned.delta_ci else None,
        "per_task": {
            m.removeprefix("general_"): {"base": table.value("base", m), "tuned": table.value("tuned", m)}
            for m in table.metrics
            if m.startswith("general_") and m != "general_norm"
        },
        "results": str(result.out_dir / "results.md"),
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    log.info(
        "general suite: base %.2f, tuned %.2f (%+.2f) -> %s",
        summary["general"]["base"],
        tuned.value,
        tuned.delta or 0.0,
        result.out_dir / "results.txt",
    )
    return summary["general"]


def add_lm_eval_scores(result, evaluation, text: str) -> None:
    """Run lm-eval on every candidate of a finished `llamaforge eval` and add rows lm_<task>_<metric>."""
    import gc

    from llamaforge.evaluate.candidates import load_candidate, parse_candidates
    from llamaforge.evaluate.compare import Cell
    from llamaforge.evaluate.runner import write_results

    tasks = check_lm_eval(text)
    table = result.table
    for cand in parse_candidates(evaluation.candidates):
        model, tokenizer, _ = load_candidate(cand, evaluation)
        for task, metrics in run_lm_eval(model, tokenizer, tasks).items():
            for metric, value in metrics.items():
                name = f"lm_{task}_{metric}".replace("-", "_")
                if name not in table.cells:
                    table.metrics.append(name)
                    table.cells[name] = {c: None for c in table.candidates}
                    table.higher_is_better[name] = True
                    table.num_examples[name] = 0
                first = table.cells[name][table.baseline]
                table.cells[name][cand.name] = Cell(
                    100 * value, delta=None if first is None else 100 * value - first.value
                )
        del model
        gc.collect()
    table.info["lm-eval"] = (
        f"lm-evaluation-harness tasks {text} (raw prompts, its own sample counts; no intervals)"
    )
    write_results(result, evaluation)
