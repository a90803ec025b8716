"""Prepared datasets (`llamaforge prepare` output) for the studio: the report, and the expert review.

The review round trip is the CLI's: the verdicts chosen in the browser are written to a new CSV
(reviewed-<time>.csv, columns of review.csv; review.csv itself is never modified) and applied with
data.curate.review.apply_review, exactly as `llamaforge prepare job.yaml --apply-review FILE` does.
"""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path

from llamaforge.errors import ConfigError
from llamaforge.studio.workspace import find_folders, read_json


def find_prepared(workspace: Path, depth: int = 3) -> list[Path]:
    """Folders written by `llamaforge prepare` (a report.json with per-step counts)."""
    return find_folders(workspace, is_prepared, depth)


def is_prepared(folder: Path) -> bool:
    report = read_json(folder / "report.json")
    return isinstance(report, dict) and "steps" in report


def resolve_prepared(workspace: Path, did: str) -> Path | None:
    root = workspace.resolve()
    path = (root / did).resolve()
    return path if path.is_relative_to(root) and path in [p.resolve() for p in find_prepared(root)] else None


def report(folder: Path) -> dict:
    data = read_json(folder / "report.json")
    return data if isinstance(data, dict) else {}


def review_rows(folder: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of the review sample (review.csv as `prepare` exported it)."""
    path = folder / "review.csv"
    if not path.is_file():
        return [], []
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def apply_verdicts(folder: Path, verdicts: dict[str, dict[str, str]]) -> dict:
    """Write the verdicts as a reviewed CSV next to review.csv and apply it (the --apply-review path)."""
    from llamaforge.data.curate.review import VERDICTS, apply_review, read_verdicts
    from llamaforge.errors import DataError

    columns, rows = review_rows(folder)
    if not rows:
        raise ConfigError(f"{folder}: no review.csv (prepare.review.enabled and sample_size > 0 export one)")
    known = {r["id"] for r in rows}
    unknown = sorted(set(verdicts) - known)
    if unknown:
        raise ConfigError(f"review: ids not in review.csv: {', '.join(unknown[:5])}")
    for rid, given in verdicts.items():
        if given.get("verdict", "") not in VERDICTS:
            raise ConfigError(f"review: id {rid}: verdict must be accept, reject, edit or empty")
    if not any(v.get("verdict") for v in verdicts.values()):
        raise ConfigError("review: choose accept, reject or edit for at least one record")
    editable = ("verdict", "edited_prompt", "edited_answer", "note")
    for row in rows:
        for key in editable:
            row[key] = (verdicts.get(row["id"]) or {}).get(key, row.get(key, "")) or ""
    path = folder / f"reviewed-{datetime.now():%Y%m%d-%H%M%S-%f}.csv"
    with path.open("x", encoding="utf-8", newline="") as fh:  # "x": a new file, never over another
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    try:
        read_verdicts(path)  # the CLI's checks (an edit needs its text), before anything is applied
    except DataError:
        path.unlink()  # our own file, just written: nothing of the user's
        raise
    summary = apply_review(folder, path)
    summary["file"] = path.name
    return summary
