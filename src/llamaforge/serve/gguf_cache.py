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
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from llamaforge.atomic import atomic_write_text
from llamaforge.errors import ConfigError

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


# serve.gguf_dtype -> llama-quantize's type name; the K-quants only llama.cpp's quantizer makes
QUANTIZE_TYPES = {
    "q8_0": "Q8_0",
    "q4_0": "Q4_0",
    "q4_1": "Q4_1",
    "q4_k_m": "Q4_K_M",
    "q5_k_m": "Q5_K_M",
    "q6_k": "Q6_K",
}
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")


def base_gguf(
    model_dir: Path, dtype: str, export_base: Callable[..., Path], quantize: Path | None = None
) -> Path:
    """The model as GGUF of `dtype`. With llama-quantize (`quantize`), quantized types are made from the
    f32 GGUF by it (seconds, where numpy takes minutes) and the K-quants become possible."""
    out = cache_dir() / f"base-{folder_sha(model_dir)[:24]}-{dtype}.gguf"
    if out.is_file():
        return out
    if dtype in K_QUANTS and quantize is None:
        raise ConfigError(f"serve.gguf_dtype={dtype} needs llama.cpp's llama-quantize (make serve-cpu)")
    if quantize is None or dtype not in QUANTIZE_TYPES:
        return export_base(Path(model_dir), out, dtype=dtype)
    f32 = base_gguf(model_dir, "f32", export_base)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    proc = subprocess.run(
        [str(quantize), str(f32), str(partial), QUANTIZE_TYPES[dtype]], capture_output=True, text=True
    )
    if proc.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise ConfigError(
            f"llama-quantize {QUANTIZE_TYPES[dtype]} failed:\n{(proc.stdout + proc.stderr)[-800:]}"
        )
    os.replace(partial, out)
    return out


def lora_gguf(adapter_dir: Path, base_dir: Path, export_lora: Callable[..., Path]) -> Path:
    key = hashlib.sha256((folder_sha(adapter_dir) + folder_sha(base_dir)).encode()).hexdigest()
    out = cache_dir() / f"lora-{key[:24]}.gguf"
    if not out.is_file():
        export_lora(Path(adapter_dir), Path(base_dir), out)
    return out
