"""Weight dtypes by the names a job file uses ("float32", "bfloat16", "float16"): one map for every loader."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llamaforge.errors import ConfigError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """`torch.float32` for "float32" (a torch.dtype passes through); a ConfigError names the valid ones."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)
