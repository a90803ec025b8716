"""What a hot-loaded adapter must be before it touches the model: a PEFT LoRA folder under an allowed
directory (symlinks resolved: no traversal) with safetensors weights (pickles are never loaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llamaforge.errors import ConfigError


@dataclass
class Adapter:
    name: str
    path: str
    template: object
    rank: int


def check_adapter_path(path: str, adapter_dirs: list[str], *, check_dirs: bool = True) -> Path:
    """A folder under one of `adapter_dirs`, with adapter_config.json and adapter_model.safetensors."""
    real = Path(path).expanduser().resolve()
    if check_dirs:
        allowed = [Path(d).expanduser().resolve() for d in adapter_dirs]
        if not any(real == d or real.is_relative_to(d) for d in allowed):
            raise ConfigError(
                f"adapter path {path} is outside the allowed adapter directories "
                f"({', '.join(str(d) for d in allowed) or 'none configured'}); set serve.adapter_dirs"
            )
    if not (real / "adapter_config.json").is_file():
        raise ConfigError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    if not (real / "adapter_model.safetensors").is_file():
        pickles = [p.name for p in real.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        raise ConfigError(
            f"{path} has no adapter_model.safetensors"
            + (f" (only {', '.join(pickles)}: pickled weights are never loaded)" if pickles else "")
        )
    return real


def lora_config(real: Path, path: str) -> dict:
    """The adapter's config; only LoRA can be hot-swapped (peft's mixed batches and unload need it)."""
    config = json.loads((real / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") not in ("LORA",):
        raise ConfigError(f"{path}: only LoRA adapters can be hot-swapped (got {config.get('peft_type')})")
    return config
