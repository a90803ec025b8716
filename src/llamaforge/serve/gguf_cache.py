"""GGUF files for llama-server, made once and cached by content.

A base model folder becomes `$LLAMAFORGE_HOME/gguf/base-<sha256>-<dtype>.gguf` and a LoRA adapter
`lora-<sha256>.gguf` (the adapter's files and the base's, since q/k rows are permuted by the base's
head counts). The sha256 of each file is remembered by (path, size, mtime) so a restart does not
read gigabytes again. The converters are passed in (the serve layer does not import export/):
`export_base(model_dir, out, dtype=...)` and `export_lora(adapter_dir, base_dir, out)`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path

from llamaforge.atomic import atomic_write_text

_lock = threading.Lock()


def cache_dir() -> Path:
    from llamaforge.catalog import home

    return home() / "gguf"


def _file_sha(path: Path, memo: dict) -> str:
    from llamaforge.catalog import sha256_file

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key not in memo:
        memo[key] = sha256_file(path)
    return memo[key]


def folder_sha(folder: Path) -> str:
    """sha256 over the names and contents of a folder's files (not its subfolders)."""
    memo_path = cache_dir() / "sha-memo.json"
    with _lock:
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
        digest = hashlib.sha256()
        for f in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
            digest.update(f.name.encode() + b"\0" + _file_sha(f, memo).encode() + b"\0")
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_path, json.dumps(memo))
    return digest.hexdigest()


def base_gguf(model_dir: Path, dtype: str, export_base: Callable[..., Path]) -> Path:
    out = cache_dir() / f"base-{folder_sha(model_dir)[:24]}-{dtype}.gguf"
    if not out.is_file():
        export_base(Path(model_dir), out, dtype=dtype)
    return out


def lora_gguf(adapter_dir: Path, base_dir: Path, export_lora: Callable[..., Path]) -> Path:
    key = hashlib.sha256((folder_sha(adapter_dir) + folder_sha(base_dir)).encode()).hexdigest()
    out = cache_dir() / f"lora-{key[:24]}.gguf"
    if not out.is_file():
        export_lora(Path(adapter_dir), Path(base_dir), out)
    return out
