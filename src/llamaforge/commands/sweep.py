"""`llamaforge sweep`: train a job over a grid of overrides, one subprocess per trial, and compare them."""

from __future__ import annotations

from llamaforge.commands._common import add_job_arguments, formatter, setup_logging, split_job_and_overrides

EPILOG = """grid:  key=v1,v2,...  is an axis (every combination of all axes is a trial); key=value without a
top-level comma is a fixed override for every trial. Values parse like normal overrides; commas inside
[...] or {...} or quotes do not split: method.targets=attention,[q_proj,v_proj] is two values.

examples:
  llamaforge sweep examples/sweep.yaml --grid method.rank=8,16 method.targets=attention,all-linear
  llamaforge sweep job.yaml --grid train.lr=1e-4,3e-4,1e-3 train.max_steps=50 --metric rougeL --out runs/lr
  llamaforge sweep examples/sweep.yaml --grid method.rank=8,16 method.targets=attention,all-linear --resume

Each trial trains in its own process (peak RSS, wall time, exit status measured per trial) and, when the
job has an `evaluation:` task, is scored by `llamaforge eval`. A failed trial (error, NaN divergence,
killed e.g. out of memory) is recorded with its reason and the sweep goes on. An existing sweep folder
is only continued with --resume: completed trials (same resolved config) are kept, failed ones too
unless --retry-failed. Results: OUT/results.{md,json,html}; per trial: OUT/trials/<name>/.
exit status: 0 at least one trial completed, 1 none did, 2 an error before any trial ran.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="train over a grid of overrides and compare the trials",
        epilog=EPILOG,
        formatter_class=formatter(),
        description="Run a job once per combination of the grid values, sequentially, and "
        "write one comparison table (Markdown, JSON, HTML with a chart).",
    )
    add_job_arguments(p)
    p.add_argument(
        "--grid",
        nargs="+",
        action="extend",
        default=[],
        metavar="key=v1,v2",
        help="grid axes (and fixed key=value overrides)",
    )
    p.add_argument("--out", metavar="DIR", help="sweep folder (default: <output.dir>/sweep-<output.name>)")
    p.add_argument("--resume", action="store_true", help="continue a sweep folder: keep completed trials")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="continue the sweep folder and rerun its failed trials (implies --resume)",
    )
    p.add_argument(
        "--metric",
        default="eval_loss",
        metavar="NAME[:min|:max]",
        help="primary metric for the best trial: eval_loss (default), rougeL, bleu, task_loss, "
        "peak_rss_mb, tokens_per_s, ...; direction inferred unless given",
    )
    p.add_argument("--no-eval", action="store_true", help="skip `llamaforge eval` even if the job has a task")
    p.add_argument(
        "--dry-run", action="store_true", help="validate every trial config, list the trials, stop"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from llamaforge.errors import ConfigError
    from llamaforge.sweep.runner import run_sweep

    setup_logging()
    grid = list(args.grid)
    if not args.job:  # `sweep --grid a=1,2 job.yaml`: --grid took the job file
        jobs = [g for g in grid if "=" not in g and g.endswith((".yaml", ".yml"))]
        if jobs:
            args.job = jobs[0]
            grid.remove(jobs[0])
    job, overrides = split_job_and_overrides(args)
    bad = [t for t in grid if "=" not in t]
    if bad:
        raise ConfigError(f"--grid takes key=v1,v2 items, got '{bad[0]}'")
    sweep_dir = run_sweep(
        job,
        [*overrides, *grid],
        out=args.out,
        resume=args.resume or args.retry_failed,
        retry_failed=args.retry_failed,
        evaluate=not args.no_eval,
        metric=args.metric,
        dry_run=args.dry_run,
    )
    if args.dry_run:
        return 0
    results = json.loads((Path(sweep_dir) / "results.json").read_text(encoding="utf-8"))["trials"]
    return 0 if any(r["status"] == "completed" for r in results) else 1
