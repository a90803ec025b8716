"""`llamaforge sweep` results for the studio: the sweep's own table (sweep.report.table) and chart."""

from __future__ import annotations

from pathlib import Path

from llamaforge.studio.workspace import find_folders, read_json


def is_sweep(folder: Path) -> bool:
    data = read_json(folder / "results.json")
    return (folder / "sweep.json").is_file() and isinstance(data, dict) and "trials" in data


def find_sweeps(workspace: Path, depth: int = 2) -> list[Path]:
    return find_folders(workspace, is_sweep, depth, inside_matches=False)  # its trials are not sweeps


def resolve_sweep(workspace: Path, sid: str) -> Path | None:
    root = workspace.resolve()
    path = (root / sid).resolve()
    return path if path.is_relative_to(root) and is_sweep(path) else None


def sweep_table(folder: Path) -> dict:
    """definition, best trial, columns and formatted rows exactly as the sweep's Markdown table has them."""
    from llamaforge.sweep.report import table

    data = read_json(folder / "results.json") or {}
    definition, trials = data.get("sweep") or {}, data.get("trials") or []
    columns, rows, _ = table(definition, trials)
    return {"definition": definition, "best": definition.get("best"), "columns": columns, "rows": rows}


def chart(folder: Path) -> bytes | None:
    from llamaforge.sweep.report import chart_png

    data = read_json(folder / "results.json") or {}
    definition = data.get("sweep") or {}
    return chart_png(definition, data.get("trials") or [], definition.get("best"))
