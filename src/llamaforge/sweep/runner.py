"""Run the trials of a sweep one after another, each in its own `llamaforge train` subprocess.

One process per trial so that its peak memory (the child's ru_maxrss, from os.wait4) is its own and a
crash, an OOM kill or a divergence ends only that trial. Each finished trial is then scored by a
`llamaforge eval` subprocess when the job has an `evaluation:` task, and its result.json is written;
`--resume` keeps the trials whose result.json says completed (for the same resolved config).

Sweep folder:  sweep.json (definition), results.{md,json,html}, trials/<name>/{config.yaml, train.log,
               run/ (the run dir), eval.log, eval/ (eval results), result.json}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from llamaforge.atomic import MARKER, check_not_input, check_replaceable, is_ours, write_marker
from llamaforge.config import to_yaml
from llamaforge.errors import ConfigError
from llamaforge.runs import run_status
from llamaforge.sweep import grid, report

FAILED = ("failed", "diverged", "eval_failed")


@dataclass
class Child:
    exit_code: int
    signal: str | None
    peak_rss_mb: float | None
    wall_s: float
    command: str


def _vm_hwm_mb(pid: int) -> float:
    """The process's own peak RSS so far (Linux /proc; 0 elsewhere or once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def run_child(argv: list[str], log_path: Path, poll_s: float = 0.2) -> Child:
    """Run argv with its output in log_path; peak RSS and wall time of that process alone.

    ru_maxrss from os.wait4 is the child's peak, but Linux carries the spawning process's high-water
    mark across fork/vfork + exec, so it never reads below this process's own peak: below that floor,
    the child's VmHWM polled from /proc is what it really used."""
    import resource

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TQDM_MININTERVAL", "5")  # progress bars in a log file: a line every few seconds
    unit = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    with log_path.open("w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        if not hasattr(os, "wait4"):  # not POSIX: no per-child rusage
            code = proc.wait()
            return Child(code, None, None, round(time.perf_counter() - start, 1), shlex.join(argv))
        polled = 0.0
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                polled = max(polled, _vm_hwm_mb(proc.pid))
                time.sleep(poll_s)
        except KeyboardInterrupt:
            # Ctrl-C reached the child too: let it save its checkpoint and exit before we stop
            os.wait4(proc.pid, 0)
            proc.returncode = -1
            raise
        proc.returncode = code = os.waitstatus_to_exitcode(status)
    wall = round(time.perf_counter() - start, 1)
    rusage_mb = usage.ru_maxrss / unit
    peak = max(polled, rusage_mb if rusage_mb > floor * 1.01 else 0.0) or rusage_mb
    sig = signal.Signals(-code).name if code < 0 else None
    return Child(code, sig, round(peak, 1), wall, shlex.join(argv))


def last_error_line(log_path: Path) -> str:
    """The line that says why: `error: ...` from the CLI, else a traceback's last line, else the last line."""
    if not log_path.is_file():
        return "no log"
    text = log_path.read_text(encoding="utf-8", errors="replace")
    lines = [seg.strip() for line in text.splitlines() for seg in line.split("\r")[-1:] if seg.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:") :].strip()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback (most recent call last)"):
            tail = [ln for ln in lines[i + 1 :] if not ln.startswith(("File ", "^", "~"))]
            errors = [ln for ln in tail if ln.split(":", 1)[0].replace(".", "").isidentifier() and ":" in ln]
            return (errors or tail or ["traceback"])[-1]
    return lines[-1] if lines else "empty log"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def train_metrics(run_dir: Path) -> dict[str, Any]:
    """What the run wrote: summary.json (on success) and the last train loss in metrics.jsonl."""
    from llamaforge.train.tracking import read_metrics

    summary = _read_json(run_dir / "summary.json") or {}
    after = summary.get("after") or {}
    try:
        rows = read_metrics(run_dir / "metrics.jsonl")
    except ValueError:
        rows = []
    losses = [r for r in rows if "loss" in r]
    return {
        "trainable_params": summary.get("trainable_params"),
        "total_params": summary.get("total_params"),
        "steps": summary.get("steps", losses[-1]["step"] if losses else None),
        "train_s": summary.get("train_seconds"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "train_loss": losses[-1]["loss"] if losses else None,
        "eval_loss": after.get("eval_loss"),
        "eval_ppl": after.get("eval_ppl"),
        # eval.general: true -> the general suite after training (tuned accuracy, and its change from base)
        "general": (summary.get("general") or {}).get("tuned"),
        "general_delta": (summary.get("general") or {}).get("delta"),
    }


def eval_metrics(eval_dir: Path) -> tuple[dict[str, float], dict[str, bool]]:
    """The tuned candidate's metrics from `llamaforge eval`'s results.json (loss -> task_loss)."""
    data = _read_json(eval_dir / "results.json") or {}
    values, higher = {}, {}
    for metric, cells in (data.get("metrics") or {}).items():
        cell = (cells or {}).get("tuned")
        if cell and cell.get("value") is not None:
            name = report.TASK_RENAMES.get(metric, metric)
            values[name] = cell["value"]
            higher[name] = bool(data.get("higher_is_better", {}).get(metric, True))
    return values, higher


def run_trial(trial: grid.Trial, trial_dir: Path, *, evaluate: bool, sha: str, previous: dict | None) -> dict:
    """Train (unless a previous attempt trained it and only its evaluation failed), then evaluate."""
    cli = [sys.executable, "-m", "llamaforge.cli"]
    config = trial_dir / "config.yaml"
    run_dir = trial_dir / "run"
    result: dict[str, Any] = {
        "name": trial.name,
        "values": trial.values,
        "overrides": trial.overrides,
        "config_sha256": sha,
        "run_dir": str(run_dir),
        "status": "completed",
        "reason": None,
    }
    reuse = (
        previous
        and previous.get("status") == "eval_failed"
        and previous.get("config_sha256") == sha
        and run_status(run_dir) == "completed"
    )
    shutil.rmtree(trial_dir / "eval", ignore_errors=True)  # never read an earlier attempt's numbers
    if reuse:
        result["train"] = previous["train"]
    else:
        if run_dir.exists():  # an earlier attempt's run: replaced only if llamaforge made it
            check_replaceable(run_dir, overwrite=True, what="trial run folder")
            shutil.rmtree(run_dir, ignore_errors=True)
        child = run_child([*cli, "train", str(config)], trial_dir / "train.log")
        result["train"] = asdict(child)
    metrics = train_metrics(run_dir)
    result["metrics"] = {
        **metrics,
        "peak_rss_mb": result["train"]["peak_rss_mb"],
        "wall_s": result["train"]["wall_s"],
    }
    code, sig = result["train"]["exit_code"], result["train"]["signal"]
    status = run_status(run_dir)
    loss = metrics["train_loss"]
    if code != 0:
        result["status"] = "diverged" if status == "diverged" else "failed"
        result["reason"] = (
            f"killed by {sig}" + (" (out of memory?)" if sig == "SIGKILL" else "")
            if sig
            else last_error_line(trial_dir / "train.log")
        )
    elif status == "diverged" or (loss is not None and not math.isfinite(loss)):
        result["status"], result["reason"] = "diverged", f"train loss {loss} at step {metrics['steps']}"
    elif evaluate:
        child = run_child([*cli, "eval", str(config)], trial_dir / "eval.log")
        result["eval"] = asdict(child)
        if child.exit_code != 0:
            result["status"] = "eval_failed"
            result["reason"] = (
                f"eval: killed by {child.signal}"
                if child.signal
                else f"eval: {last_error_line(trial_dir / 'eval.log')}"
            )
        else:
            result["task_metrics"], result["higher_is_better"] = eval_metrics(trial_dir / "eval")
    result["finished"] = datetime.now().isoformat(timespec="seconds")
    (trial_dir / "result.json").write_text(
        json.dumps(report.finite(result), indent=2, default=str), encoding="utf-8"
    )
    return result


def progress_line(result: dict, metric: str) -> str:
    m = {**result.get("metrics", {}), **result.get("task_metrics", {})}
    parts = [result["status"]]
    if result["status"] == "completed":
        for key in dict.fromkeys(["eval_loss", metric]):
            if m.get(key) is not None:
                parts.append(f"{key} {report.fmt(key, m[key])}")
    if m.get("peak_rss_mb") is not None:
        parts.append(f"peak {m['peak_rss_mb']:,.0f} MB")
    if m.get("train_s") is not None:
        parts.append(f"train {m['train_s']:.0f} s")
    if result.get("reason"):
        parts.append(f"- {result['reason'][:160]}")
    return "  ".join(parts)


def run_sweep(
    job: str | None,
    tokens: list[str],
    *,
    out: str | None = None,
    resume: bool = False,
    retry_failed: bool = False,
    evaluate: bool = True,
    metric: str = "eval_loss",
    dry_run: bool = False,
    echo: Callable[..., None] = print,
) -> Path:
    """Expand, validate, run (or resume) the trials; write the comparison. Returns the sweep folder."""
    axes, fixed = grid.parse_arguments(tokens)
    trials = grid.expand(axes)
    configs = grid.trial_configs(job, fixed, trials)
    evaluate = evaluate and configs[0].evaluation.task.path is not None
    metric_name, higher = report.parse_metric(metric, evaluate)
    sweep_dir = Path(out) if out else grid.default_out(configs[0], job)
    header = (
        f"sweep: {len(trials)} trial(s)"
        + (f" over {' x '.join(a.key for a in axes)}" if axes else "")
        + f" -> {sweep_dir}"
        + ("" if evaluate else " (no evaluation task in the job: the runs' own eval loss only)")
    )
    echo(header)
    if dry_run:
        for t in trials:
            echo(f"  {t.name}: {' '.join([*fixed, *t.overrides])}")
        return sweep_dir
    trials_dir = sweep_dir / "trials"
    inputs = [job, *(s.path for c in configs for s in c.data.sources), *(c.data.prepared for c in configs)]
    check_not_input(sweep_dir, inputs, "sweep folder")
    if sweep_dir.is_dir() and any(sweep_dir.iterdir()) and not is_ours(sweep_dir):
        raise ConfigError(
            f"sweep folder {sweep_dir} is not empty and was not created by llamaforge (no "
            f"{MARKER} file): nothing is written there; choose another --out"
        )
    if trials_dir.is_dir() and any(trials_dir.iterdir()) and not (resume or retry_failed):
        raise ConfigError(
            f"sweep folder {sweep_dir} has trials already: add --resume to keep the completed ones "
            "(--retry-failed also reruns failed ones), or choose another --out"
        )
    trials_dir.mkdir(parents=True, exist_ok=True)
    write_marker(sweep_dir, "sweep")
    definition = {
        "job": job,
        "axes": {a.key: a.texts for a in axes},
        "fixed": fixed,
        "trials": [t.name for t in trials],
        "evaluate": evaluate,
        "metric": metric_name,
        "higher_is_better": higher,
    }
    (sweep_dir / "sweep.json").write_text(json.dumps(definition, indent=2), encoding="utf-8")
    results: list[dict] = []
    ran_seconds, ran = 0.0, 0
    try:
        for i, (trial, cfg) in enumerate(zip(trials, configs, strict=True), 1):
            trial_dir = trials_dir / trial.name
            trial_dir.mkdir(exist_ok=True)
            text = to_yaml(grid.for_trial(cfg, trial_dir))
            sha = hashlib.sha256(text.encode()).hexdigest()
            previous = _read_json(trial_dir / "result.json")
            tag = f"[{i}/{len(trials)}] {trial.name}"
            if previous and previous.get("config_sha256") == sha:
                if previous["status"] == "completed" or (previous["status"] in FAILED and not retry_failed):
                    note = "" if previous["status"] == "completed" else " (--retry-failed reruns it)"
                    echo(f"{tag}  kept: {progress_line(previous, metric_name)}{note}")
                    results.append(previous)
                    continue
            elif previous:
                echo(f"{tag}  config changed since its last run: running it again")
            (trial_dir / "config.yaml").write_text(text, encoding="utf-8")
            echo(f"{tag} ...", end="", flush=True)
            started = time.perf_counter()
            result = run_trial(trial, trial_dir, evaluate=evaluate, sha=sha, previous=previous)
            ran_seconds, ran = ran_seconds + time.perf_counter() - started, ran + 1
            left = len(trials) - i
            eta = f"  (~{ran_seconds / ran * left / 60:.0f} min left)" if left else ""
            echo(f" {progress_line(result, metric_name)}{eta}")
            results.append(result)
    finally:
        if results:
            paths = report.write_report(sweep_dir, definition, results)
            echo(f"\n{paths['md'].read_text(encoding='utf-8')}")
            echo(f"results: {sweep_dir}/results.{{md,json,html}}; per trial: {trials_dir}/<name>/")
    return sweep_dir
