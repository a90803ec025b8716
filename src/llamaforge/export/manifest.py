"""What every export leaves behind, and how it is written without ever leaving half a file.

- `atomic_file` / `atomic_dir`: write into a temporary sibling of the target, then rename it into
  place (`llamaforge.atomic`). An existing target is refused unless `overwrite`, and an existing
  folder that llamaforge did not create (no marker file) is refused even then; free disk space is
  checked against an estimate *before* anything is written; on any error the temporary is removed
  and an existing target is left untouched.
- `build_manifest` / `write_manifest`: `manifest.json` naming the source run, the dataset sha256,
  the base model, the method, the dtype and every file with its size and sha256.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamaforge.atomic import MARKER, is_ours, remove_path, swap_into_place, tmp_sibling, write_marker
from llamaforge.catalog import sha256_file
from llamaforge.errors import LlamaforgeError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Room kept free beyond the estimate: metadata, filesystem overhead, and what the OS needs.
_DISK_MARGIN_BYTES = 64 << 20
_DISK_MARGIN_FRACTION = 0.05


class ExportError(LlamaforgeError):
    """An export that cannot be done as asked (target exists, no disk space, bad adapter...)."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_disk_space(directory: Path, required_bytes: int) -> None:
    """Refuse early when `directory`'s filesystem cannot hold `required_bytes` plus a margin."""
    probe = directory
    while not probe.exists():  # the target's parent may not exist yet
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    needed = int(required_bytes * (1 + _DISK_MARGIN_FRACTION)) + _DISK_MARGIN_BYTES
    if free < needed:
        raise ExportError(
            f"not enough disk space in {probe}: the export needs about {human_bytes(needed)} "
            f"(estimate {human_bytes(required_bytes)} plus margin), {human_bytes(free)} free"
        )


def _refuse_existing(target: Path, overwrite: bool, *, folder: bool = False) -> None:
    """Replace an existing target only with `overwrite`; a folder only when llamaforge made it."""
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise ExportError(f"{target} already exists; pass --overwrite (overwrite=True) to replace it")
    if folder and target.is_dir() and any(target.iterdir()) and not is_ours(target):
        raise ExportError(
            f"{target} is not empty and was not created by llamaforge (no {MARKER} file): "
            "it is never replaced, even with --overwrite; choose another --out"
        )


@contextlib.contextmanager
def atomic_file(target: Path, *, overwrite: bool = False, required_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed to `target`."""
    target = Path(target)
    _refuse_existing(target, overwrite)
    check_disk_space(target.parent, required_bytes)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(target, "tmp")
    try:
        yield tmp
        if not tmp.is_file():
            raise ExportError(f"internal error: nothing was written for {target}")
        swap_into_place(tmp, target)
    finally:
        remove_path(tmp)


@contextlib.contextmanager
def atomic_dir(target: Path, *, overwrite: bool = False, required_bytes: int = 0) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; on success it becomes `target`."""
    target = Path(target)
    _refuse_existing(target, overwrite, folder=True)
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} exists and is not a directory")
    check_disk_space(target.parent, required_bytes)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        write_marker(tmp, "export")
        swap_into_place(tmp, target)
    finally:
        remove_path(tmp)


def describe_files(root: Path, exclude: tuple[str, ...] = (MANIFEST_NAME, MARKER)) -> list[dict[str, Any]]:
    """Every file under `root` (relative path, bytes, sha256), sorted by path."""
    root = Path(root)
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    rows = []
    for p in paths:
        rel = p.name if root.is_file() else p.relative_to(root).as_posix()
        if rel in exclude:
            continue
        rows.append({"path": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return rows


def build_manifest(
    files_root: Path,
    *,
    export_format: str,
    source_run: str | None = None,
    dataset_sha256: str | None = None,
    base_model: str | None = None,
    method: str | None = None,
    dtype: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of an export whose files lie under `files_root` (a folder, or one file)."""
    from llamaforge import __version__

    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "format": export_format,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "llamaforge_version": __version__,
        "source_run": source_run,
        "dataset_sha256": dataset_sha256,
        "base_model": base_model,
        "method": method,
        "dtype": dtype,
        "files": describe_files(files_root),
    }
    if extra:
        clash = set(extra) & set(manifest)
        if clash:
            raise ValueError(f"extra manifest keys clash with standard ones: {sorted(clash)}")
        manifest.update(extra)
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def verify_manifest(directory: Path) -> list[str]:
    """Problems found when checking the files of an export against its manifest (empty: all good)."""
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    problems = []
    for row in manifest.get("files", []):
        p = directory / row["path"]
        if not p.is_file():
            problems.append(f"missing: {row['path']}")
        elif sha256_file(p) != row["sha256"]:
            problems.append(f"sha256 mismatch: {row['path']}")
    return problems
