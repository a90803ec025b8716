"""Writing outputs so that nothing a user made is lost and nothing half-written is ever accepted.

- Every folder llamaforge creates as an output (prepared dataset, run, export, merge, sweep) carries
  the marker file `.llamaforge-output`. An existing non-empty folder is replaced (overwrite) only
  when it carries the marker: a folder llamaforge did not create is never deleted.
- An output may not be, or contain, any of the job's inputs (overwriting it would delete them),
  and an output *name* is one plain folder name (no `..`, separators or absolute paths).
- Files and folders are written beside their target under a temporary name and renamed into place
  (`atomic_write_text`, `building_folder`, `swap_into_place`): a process killed mid-write leaves
  the previous version, or nothing, never half of the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from llamaforge.errors import ConfigError

MARKER = ".llamaforge-output"


# ---------------------------------------------------------------- temporary siblings and renames


def tmp_sibling(target: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name beside `target` (same filesystem, so the rename is atomic)."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_path(path: Path) -> None:
    """Remove a temporary file or folder this module made (a symlink is unlinked, not followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an existing target is moved aside first and deleted only after."""
    old = None
    if target.exists() or target.is_symlink():
        old = tmp_sibling(target, "old")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        remove_path(old)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to a temporary sibling, flush it to disk, then rename it over `path`."""
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        with tmp.open("w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        remove_path(tmp)
    return path


# ---------------------------------------------------------------- the marker and what may be replaced


def write_marker(folder: Path, kind: str) -> None:
    """Mark `folder` as an output llamaforge created (so that a later overwrite may replace it)."""
    text = json.dumps(
        {
            "created_by": "llamaforge",
            "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    (Path(folder) / MARKER).write_text(text + "\n", encoding="utf-8")


def is_ours(folder: Path) -> bool:
    """True when `folder` carries the marker of a folder llamaforge created."""
    marker = Path(folder) / MARKER
    return marker.is_file() and not marker.is_symlink()


def name_problem(name: str) -> str | None:
    """Why `name` is not one plain folder name (it is joined to an output folder, which may be replaced)."""
    if not name.strip():
        return "is empty"
    if name in (".", "..") or any(c in name for c in "/\\\x00") or Path(name).is_absolute():
        return (
            f"must be a plain folder name (no '..', '/', '\\' or absolute path), got {name!r}; "
            "put the parent folder in output.dir"
        )
    return None


def check_name(name: str, field: str) -> str:
    """`name`, when it is one plain folder name; ConfigError naming `field` otherwise."""
    problem = name_problem(name)
    if problem:
        raise ConfigError(f"{field} {problem}")
    return name


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_not_input(output: str | Path, inputs: Iterable[str | Path | None], what: str) -> None:
    """Refuse an output that is, or contains, one of the inputs (or the current folder): replacing it
    would delete them."""
    out = _resolved(output)
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ConfigError(
            f"{what} {output} is, or holds, the current folder {cwd}: an output needs a folder of its own"
        )
    for item in inputs:
        if item is None or str(item) == "":
            continue
        p = _resolved(item)
        if p == out or out in p.parents:
            relation = "is" if p == out else "contains"
            raise ConfigError(
                f"{what} {output} {relation} the input {item}: writing there could delete it; "
                "choose another output folder"
            )


def check_replaceable(
    target: str | Path, *, overwrite: bool, what: str, hint: str = "", empty_ok: bool = False
) -> None:
    """An existing `target` may be replaced only with `overwrite`, and only when llamaforge made it.

    A non-empty folder without the marker, or a file where a folder is expected, is refused whatever
    `overwrite` says. An empty folder holds nothing to lose: it needs no marker, and with `empty_ok`
    (prepare's long-standing rule) not even `overwrite`.
    """
    target = Path(target)
    if not (target.exists() or target.is_symlink()):
        return
    if not target.is_dir():
        raise ConfigError(f"{what} {target} exists and is not a folder; choose another output folder")
    empty = not any(target.iterdir())
    if not empty and not is_ours(target):
        raise ConfigError(
            f"{what} {target} is not empty and was not created by llamaforge (no {MARKER} "
            "file): it is never replaced; choose another output folder"
        )
    if not overwrite and not (empty and empty_ok):
        raise ConfigError(f"{what} {target} exists{hint}")


@contextlib.contextmanager
def building_folder(target: str | Path, kind: str) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success it gets the marker and becomes `target`.

    Call `check_replaceable` first: this swaps whatever is at `target` out. On any error the
    temporary folder is removed and `target` is left as it was.
    """
    target = Path(os.path.abspath(target))  # "." or "x/.." have no name to put a sibling beside
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        write_marker(tmp, kind)
        swap_into_place(tmp, target)
    finally:
        remove_path(tmp)
