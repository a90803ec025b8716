"""Reading `llamaforge eval` results (results.json and the per-candidate <name>.jsonl) for the studio.

The table is results.json as the evaluator wrote it (values, bootstrap intervals, deltas against the
baseline, the gate); the per-example view joins the candidates' jsonl files on the example index.
"""

from __future__ import annotations

import json
from pathlib import Path

from llamaforge.studio.workspace import read_json

SKIP_DIRS = {"checkpoints", "adapter", "model", "tensorboard", "mlruns", ".studio"}


def find_evals(workspace: Path, depth: int = 3) -> list[Path]:
    """Folders holding a results.json, up to `depth` levels below the workspace."""
    found: list[Path] = []

    def walk(folder: Path, level: int) -> None:
        data = read_json(folder / "results.json")
        if (
            isinstance(data, dict) and "candidates" in data and "metrics" in data
        ):  # not a sweep's results.json
            found.append(folder)
        if level >= depth:
            return
        for child in sorted(folder.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and child.name not in SKIP_DIRS:
                walk(child, level + 1)

    if workspace.is_dir():
        walk(workspace, 0)
    return [f for f in found if f != workspace]


def resolve_eval(workspace: Path, eid: str) -> Path | None:
    root = workspace.resolve()
    path = (root / eid).resolve()
    return path if path.is_relative_to(root) and (path / "results.json").is_file() else None


def results(folder: Path) -> dict:
    data = read_json(folder / "results.json")
    return data if isinstance(data, dict) else {}


def table_rows(data: dict) -> list[dict]:
    """One row per metric: each candidate's value, interval and delta against the baseline."""
    rows = []
    for metric, cells in (data.get("metrics") or {}).items():
        rows.append(
            {
                "metric": metric,
                "higher_is_better": (data.get("higher_is_better") or {}).get(metric, True),
                "cells": [{"candidate": c, **(cells.get(c) or {})} for c in data.get("candidates", [])],
            }
        )
    return rows


def examples(folder: Path, data: dict) -> list[dict]:
    """Per example: prompt, reference, and each candidate's output and scores."""
    merged: dict[int, dict] = {}
    for name in data.get("candidates", []):
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            row = merged.setdefault(
                rec["index"],
                {
                    "index": rec["index"],
                    "prompt": rec.get("prompt"),
                    "reference": rec.get("reference"),
                    "outputs": {},
                },
            )
            row["outputs"][name] = {
                "output": rec.get("output"),
                "scores": rec.get("scores") or {},
                "empty": rec.get("empty", False),
            }
    return [merged[i] for i in sorted(merged)]


def lost_to_baseline(
    rows: list[dict], candidate: str, baseline: str, metric: str, higher_is_better: bool
) -> list[dict]:
    """The examples where `candidate` scored worse than `baseline` on `metric`."""
    out = []
    for row in rows:
        mine = row["outputs"].get(candidate, {}).get("scores", {}).get(metric)
        base = row["outputs"].get(baseline, {}).get("scores", {}).get(metric)
        if mine is None or base is None:
            continue
        if (mine < base) if higher_is_better else (mine > base):
            out.append(row)
    return out
