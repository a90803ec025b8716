"""The house stays as built: the import-linter contracts of .importlinter (layers, config-only
schema sections, no cycles inside a package) hold, and a broken layering is really caught."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="pip install import-linter (in the dev extra)")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def lint(src: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package under `src` with the repository's contracts (static: nothing is imported)."""
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(ROOT / '.importlinter')!r}, no_cache=True))"
    )
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_contracts_hold():
    result = lint(SRC)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def test_an_upward_import_and_a_cycle_break_the_contracts(tmp_path):
    """The schema importing a command, and a package module cycle, are each reported by name."""
    copy = tmp_path / "src"
    shutil.copytree(SRC / "llamaforge", copy / "llamaforge", ignore=shutil.ignore_patterns("__pycache__"))
    schema = copy / "llamaforge" / "schema.py"
    schema.write_text(schema.read_text() + "\nimport llamaforge.commands.train  # noqa\n")
    scores = copy / "llamaforge" / "evaluate" / "scores.py"
    scores.write_text(scores.read_text() + "\nimport llamaforge.evaluate.compare  # noqa\n")
    result = lint(copy)
    assert result.returncode != 0
    assert "llamaforge.schema -> llamaforge.commands.train" in result.stdout
    assert "No import cycles between the modules of a package BROKEN" in result.stdout
