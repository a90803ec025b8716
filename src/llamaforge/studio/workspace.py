"""Reading run directories (run.json, metrics.jsonl, summary.json, data_card.json, rejects.jsonl,
config.yaml, checkpoints/) for the studio.

All of the studio's knowledge of the run-directory format lives here, so that the pages follow the
training recipe's files in one place; run.json itself is read through the typed `llamaforge.runs.Run`. Every reader tolerates a run that is still being written: a
half-written last line of metrics.jsonl is left for the next read, a missing file is "not yet".
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaforge.errors import LlamaforgeError
from llamaforge.runs import Run

RUN_MARKERS = ("run.json", "config.yaml")  # config.yaml is written first, run.json once data is prepared


@dataclass
class RunRow:
    """One line of the runs table."""

    name: str
    path: Path
    status: str
    method: str | None = None
    base_model: str | None = None
    dataset_sha256: str | None = None
    step: int | None = None
    total_steps: int | None = None
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    started: float | None = None  # epoch seconds of the last (re)start
    duration_s: float | None = None
    weights: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("path", "extra")}
        out["path"] = str(self.path)
        return out


def read_json(path: Path) -> dict | list | None:
    """A JSON file, or None when it is missing or mid-write (the writer replaces it whole soon)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_run(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in RUN_MARKERS)


def find_runs(workspace: Path) -> list[Path]:
    """Run directories in the workspace: its children and grandchildren (output.dir is often `runs/`)."""
    found: list[Path] = []
    for child in sorted(workspace.iterdir()) if workspace.is_dir() else []:
        if child.name.startswith("."):
            continue
        if is_run(child):
            found.append(child)
        elif child.is_dir():
            found.extend(g for g in sorted(child.iterdir()) if not g.name.startswith(".") and is_run(g))
    return found


def run_id(workspace: Path, run_dir: Path) -> str:
    """The run's path relative to the workspace: its id in URLs."""
    return run_dir.resolve().relative_to(workspace.resolve()).as_posix()


def resolve_run(workspace: Path, rid: str) -> Path | None:
    """The run directory for an id, or None when it is not a run inside the workspace."""
    root = workspace.resolve()
    path = (root / rid).resolve()
    if not path.is_relative_to(root) or not is_run(path):
        return None
    return path


def read_run(run_dir: Path) -> Run | None:
    """The typed run.json (llamaforge.runs.Run), None before it exists or when it is unreadable."""
    try:
        return Run.read(run_dir)
    except LlamaforgeError:
        return None


def run_row(workspace: Path, run_dir: Path) -> RunRow:
    info = run_info(run_dir)
    summary = read_json(run_dir / "summary.json") or {}
    config = run_dir / "config.yaml"
    started = config.stat().st_mtime if config.is_file() else None
    row = RunRow(
        name=run_id(workspace, run_dir),
        path=run_dir,
        status=str(info.get("status", "starting")),
        method=info.get("method"),
        base_model=info.get("base_model"),
        dataset_sha256=info.get("dataset_sha256"),
        step=info.get("step"),
        total_steps=info.get("total_steps"),
        started=started,
        weights=info.get("weights"),
    )
    row.eval_loss_before = (summary.get("before") or {}).get("eval_loss")
    row.eval_loss_after = (summary.get("after") or {}).get("eval_loss")
    if row.status == "completed" and "steps" in summary:
        row.step = summary["steps"]
    if "train_seconds" in summary:
        row.duration_s = float(summary["train_seconds"])
    elif started is not None:
        last = max(
            (p.stat().st_mtime for p in (run_dir / "metrics.jsonl", run_dir / "run.json") if p.is_file()),
            default=started,
        )
        row.duration_s = max(0.0, (time.time() if row.status == "running" else last) - started)
    if row.method is None or row.base_model is None:  # before run.json exists: what the config asked for
        cfg = read_config(run_dir)
        row.method = row.method or (cfg.get("method") or {}).get("name")
        row.base_model = row.base_model or (cfg.get("model") or {}).get("source")
    return row


def list_runs(workspace: Path) -> list[RunRow]:
    return [run_row(workspace, d) for d in find_runs(workspace)]


def read_config(run_dir: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def config_text(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def read_metrics(run_dir: Path, start: int = 0) -> tuple[list[dict], int]:
    """Complete records of metrics.jsonl from line `start`, and the line to continue from.

    A last line without its newline is still being written: it is left for the next call.
    """
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return [], start
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    complete = lines[:-1]  # the part after the last newline is unfinished (or empty)
    records = []
    for line in complete[start:]:
        try:
            records.append(json.loads(line) if line.strip() else {})
        except ValueError:
            records.append({"unreadable": line[:200]})
    return [r for r in records if r], max(start, len(complete))


def summary(run_dir: Path) -> dict:
    data = read_json(run_dir / "summary.json")
    return data if isinstance(data, dict) else {}


def data_card(run_dir: Path) -> dict:
    data = read_json(run_dir / "data_card.json")
    return data if isinstance(data, dict) else {}


def run_info(run_dir: Path) -> dict:
    """run.json's fields as Run reads and checks them ({} when there is no valid one yet)."""
    run = read_run(run_dir)
    return {} if run is None else run.as_dict()


def rejects(run_dir: Path, query: str = "", offset: int = 0, limit: int = 50) -> dict:
    """A page of rejects.jsonl (source, line, field, reason, record), filtered by a case-insensitive
    substring of any of them."""
    path = run_dir / "rejects.jsonl"
    rows: list[dict] = []
    if path.is_file():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                item = {
                    "source": str(path),
                    "line": number,
                    "field": None,
                    "reason": "unreadable rejects line",
                }
            rows.append(item)
    needle = query.strip().lower()
    matched = [r for r in rows if not needle or needle in json.dumps(r, ensure_ascii=False).lower()]
    page = matched[max(0, offset) : max(0, offset) + max(1, limit)]
    return {
        "total": len(rows),
        "matched": len(matched),
        "offset": offset,
        "limit": limit,
        "items": [
            {
                "source": r.get("source"),
                "line": r.get("line"),
                "field": r.get("field"),
                "reason": r.get("reason"),
                "record": r.get("record"),
            }
            for r in page
        ],
    }


def checkpoints(run_dir: Path) -> list[dict]:
    """Resumable checkpoints (step-*) and the best-by-eval-loss weights (best/), newest last."""
    root = run_dir / "checkpoints"
    out: list[dict] = []
    if not root.is_dir():
        return out
    for path in sorted(root.iterdir()):
        if path.name.startswith("step-") and (path / "progress.json").is_file():
            progress = read_json(path / "progress.json") or {}
            out.append(
                {
                    "name": path.name,
                    "kind": "resumable",
                    "step": progress.get("step"),
                    "epoch": progress.get("epoch"),
                    "mtime": path.stat().st_mtime,
                }
            )
        elif path.name == "best" and (path / "best.json").is_file():
            best = read_json(path / "best.json") or {}
            out.append(
                {
                    "name": "best",
                    "kind": "best eval loss",
                    "step": best.get("step"),
                    "eval_loss": best.get("eval_loss"),
                    "mtime": path.stat().st_mtime,
                }
            )
    return out


def warnings(run_dir: Path, log_text: str = "") -> list[dict]:
    """The run's warnings: the monitor's (overfitting) from summary.json, and WARNING lines of a job log
    (untrained chat tokens and the like are logged, not stored)."""
    found = [dict(w) for w in summary(run_dir).get("warnings") or [] if isinstance(w, dict)]
    seen = {w.get("message") for w in found}
    for line in log_text.splitlines():
        if "WARNING" in line or "warning:" in line.lower():
            message = line.split("WARNING", 1)[-1].lstrip(" :-") if "WARNING" in line else line
            if message not in seen:
                found.append({"type": "log", "step": None, "message": message})
                seen.add(message)
    return found


def files_signature(run_dir: Path) -> tuple:
    """Changes whenever run.json or summary.json is rewritten (for the live page's status)."""
    sig = []
    for name in ("run.json", "summary.json"):
        p = run_dir / name
        sig.append(p.stat().st_mtime_ns if p.is_file() else 0)
    return tuple(sig)


SKIP_DIRS = {"checkpoints", "adapter", "model", "arrow", ".studio", "tensorboard", "mlruns"}


def find_folders(workspace: Path, matches, depth: int, *, inside_matches: bool = True) -> list[Path]:
    """Folders under `workspace` (at most `depth` levels down, hidden and weight folders skipped) for
    which `matches(folder)` holds; `inside_matches=False` does not look inside a folder that matched."""
    found: list[Path] = []

    def walk(folder: Path, level: int) -> None:
        if matches(folder):
            found.append(folder)
            if not inside_matches:
                return
        if level < depth:
            for child in sorted(folder.iterdir()):
                if child.is_dir() and not child.name.startswith(".") and child.name not in SKIP_DIRS:
                    walk(child, level + 1)

    if workspace.is_dir():
        walk(workspace, 0)
    return found
