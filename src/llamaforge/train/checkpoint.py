"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG (torch CPU and CUDA, python,
numpy) and data position.

Written to a temporary folder and renamed into place, so a process killed mid-save leaves the
previous checkpoint intact. Only trainable tensors are stored (a LoRA checkpoint is megabytes,
not the whole base model). Loaded with `weights_only=True`: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def capture_rng() -> dict:
    """Every random state a training step draws from: torch (CPU and each CUDA device), python, numpy."""
    state = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
             "numpy_rng": _numpy_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    random.setstate(_as_python_rng(state["python_rng"]))
    if "numpy_rng" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy_rng"]
        np.random.set_state((kind, keys.numpy(), int(pos), int(has_gauss), float(gauss)))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _numpy_state() -> tuple:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss)  # loadable with weights_only


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, progress: dict, keep: int,
                    *, rng: dict | None = None) -> Path:
    """`rng`: the random state to store (the last step boundary's); default the current one."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **(rng or capture_rng())},
               tmp / "state.pt")
    (tmp / "progress.json").write_text(json.dumps(progress, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "progress.json").is_file())


def load_trainable(path: Path, model) -> None:
    """Copy a folder's trainable.safetensors into `model`, refusing tensors the model does not have."""
    tensors = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    unknown = set(tensors) - set(params)
    if unknown:
        raise ValueError(f"weights in {path} do not match the model: unknown tensors {sorted(unknown)[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    load_trainable(path, model)
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state)
    return json.loads((path / "progress.json").read_text())


def _as_python_rng(value):
    version, internal, gauss = value
    return (version, tuple(internal), gauss)
