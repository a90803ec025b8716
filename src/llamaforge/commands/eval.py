"""`llamaforge eval`: evaluate candidates side by side on a task set; exit 1 when a --fail-if rule holds."""

from __future__ import annotations

import sys
from pathlib import Path

from llamaforge.commands._common import add_job_arguments, formatter, setup_logging, split_job_and_overrides

EPILOG = """candidates:  [name=][quant4:|quant8:][base:]SOURCE
  runs/x           a run: its base + adapter, with its template        (default name: tuned)
  base:runs/x      the run's base model, no adapter, same template      (default name: base)
  merged/x         any transformers folder, .gguf file or catalog name  (default name: the folder name)
  quant4:merged/x  loaded 4-bit (bitsandbytes NF4); quant8: 8-bit       (default name: x_q4 / x_q8)
  fast=runs/y      choose the name used in --fail-if rules
The first candidate is the baseline of the deltas. Without --candidates: base:RUN and RUN, where RUN is
the job's output.dir/output.name.

examples:
  llamaforge eval examples/summarize_xsum.yaml --write-train runs/xsum-data/train.jsonl
  llamaforge eval examples/summarize_xsum.yaml                      # base vs tuned, defaults from the job
  llamaforge eval job.yaml --candidates base:runs/x runs/x merged=merged/x q4=quant4:merged/x \\
      --task heldout.jsonl --limit 50 --fail-if "tuned.rougeL < base.rougeL" --fail-if "q4.rougeL < merged.rougeL - 1"
  llamaforge eval job.yaml --suite general --fail-if "tuned.general < base.general - 2"   # what did the tune cost?
exit status: 0 ok, 1 a --fail-if rule holds (gate failed), 2 an error.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate models side by side (loss, BLEU, ROUGE, ...) with a CI gate",
        epilog=EPILOG,
        formatter_class=formatter(),
        description="Evaluate candidates (base, base + adapter, merged, quantized, other runs) on "
        "the same examples: held-out loss/perplexity, batched generation, metrics, a table with "
        "deltas and bootstrap intervals, per-example results. Settings: the job's `evaluation:` "
        "section.",
    )
    add_job_arguments(p)
    p.add_argument("--candidates", nargs="+", metavar="SPEC", help="models to compare (see below)")
    p.add_argument("--task", metavar="FILE", help="task file (replaces evaluation.task.path)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N examples only")
    p.add_argument(
        "--fail-if",
        action="append",
        default=[],
        metavar="RULE",
        help="gate rule, e.g. 'tuned.rougeL < base.rougeL' (repeatable); exit 1 if any holds",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (replaces evaluation.output_dir)")
    p.add_argument(
        "--suite",
        action="append",
        default=[],
        choices=["general"],
        help="also score a fixed suite (adds to evaluation.suites): general = ten BIG-bench tasks, offline",
    )
    p.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="also run lm-evaluation-harness tasks (comma-separated) on the candidates; needs lm-eval "
        "installed and its datasets reachable",
    )
    p.add_argument(
        "--write-train",
        metavar="FILE",
        help="write the task records that are NOT held out as alpaca jsonl for training, and stop",
    )
    p.set_defaults(func=run)


def load_eval_config(job: str | None, overrides: list[str]):
    """(EvaluationConfig, output.dir, output.name) from the job file's `evaluation:` section + overrides."""
    from llamaforge.config import load_config

    cfg = load_config(job, overrides)
    return cfg.evaluation, cfg.output.dir, cfg.output.name


def run(args) -> int:
    from llamaforge.errors import ConfigError

    setup_logging()
    job, overrides = split_job_and_overrides(args)
    evaluation, out_root, run_name = load_eval_config(job, overrides)
    task = evaluation.task
    if args.task:
        task = task.model_copy(update={"path": args.task})
    if args.limit is not None:
        if args.limit < 1:
            raise ConfigError("--limit must be at least 1")
        task = task.model_copy(update={"limit": args.limit})
    if args.write_train:
        from llamaforge.evaluate.tasks import write_train_split

        path, count = write_train_split(task, args.write_train)
        print(
            f"wrote {count} training records to {path} (the {task.holdout:g} held-out records are left out)"
        )
        return 0
    candidates = list(args.candidates or evaluation.candidates)
    if not candidates:
        if not run_name:
            raise ConfigError(
                "no candidates: pass --candidates, set evaluation.candidates, or output.name "
                "(then base:RUN and RUN are compared)"
            )
        run_dir = Path(out_root) / run_name
        candidates = [f"base=base:{run_dir}", f"tuned={run_dir}"]
    suites = list(dict.fromkeys([*evaluation.suites, *args.suite]))
    evaluation = evaluation.model_copy(update={"task": task, "candidates": candidates, "suites": suites})
    if args.lm_eval:
        from llamaforge.evaluate.general.lm_eval import check_lm_eval

        check_lm_eval(args.lm_eval)  # before any model loads: refuse with the reason
    out = args.out or evaluation.output_dir or str(Path(out_root) / f"eval-{run_name or 'latest'}")

    from llamaforge.evaluate.runner import run_evaluation

    result = run_evaluation(evaluation, out, extra_rules=args.fail_if)
    if args.lm_eval:
        from llamaforge.evaluate.with_suites import add_lm_eval_scores

        add_lm_eval_scores(result, evaluation, args.lm_eval)
    print()
    print(result.table.to_text(result.gate))
    for rep in result.candidates:
        s = rep.stats
        parts = [f"{rep.name}: {rep.spec} (template {rep.template}) loaded in {rep.load_seconds} s"]
        if "examples_per_s" in s:
            parts.append(f"{s['examples_per_s']} examples/s, {s.get('output_tokens_per_s')} output tokens/s")
        if "general_seconds" in s:
            parts.append(f"general suite in {s['general_seconds']} s")
        print(", ".join(parts))
    for note in result.task.notes if result.task is not None else []:
        print(note)
    print(
        f"\nresults: {result.out_dir}/results.{{txt,md,json,html}}, per example: {result.out_dir}/<candidate>.jsonl"
    )
    if result.failed:
        print("gate FAILED: " + "; ".join(r.rule for r in result.gate if r.failed), file=sys.stderr)
        return 1
    return 0
