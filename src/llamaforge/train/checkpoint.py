"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG and the loop's
state (train/state.py: step, data position, tokens, the validation watch).

Written to a temporary folder and renamed into place, so a process killed mid-save leaves the
previous checkpoint intact. Only trainable tensors are stored (a LoRA checkpoint is megabytes,
not the whole base model). Loaded with `weights_only=True`: nothing is unpickled.

Every random generator a step draws from is saved (Python, NumPy, torch CPU and, where present,
every CUDA device), for every process: rank 0's in the checkpoint folder (`rng-rank0.pt`), each
other rank's beside it (`rng-rank<r>-step-<n>.pt`, written by that rank, so no process waits for
another when a launch is interrupted). The recipe passes the state of the last step boundary, so
a checkpoint taken on an interrupt mid-step resumes exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llamaforge.errors import ConfigError
from llamaforge.train.state import TrainState

PREFIX = "step-"
log = logging.getLogger(__name__)


def rng_state() -> dict:
    """Every generator a training step may draw from, as tensors and plain values (weights_only-safe)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`'s generators (CUDA ones only where the same devices are present)."""
    random.setstate(_as_python_rng(state["python"]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(
            ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
        )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        log.warning(
            "the checkpoint holds the RNG of %d CUDA device(s), this machine has %d: CUDA draws "
            "(dropout on GPU) will not repeat exactly",
            len(cuda),
            torch.cuda.device_count() if torch.cuda.is_available() else 0,
        )


def rank_rng_path(root: Path, step: int, rank: int) -> Path:
    return root / f"rng-rank{rank}-{PREFIX}{step:08d}.pt"


def save_rank_rng(root: Path, step: int, rank: int, rng: dict | None = None) -> Path:
    """A process other than rank 0 saves its own RNG beside the checkpoint of `step` (atomically)."""
    root.mkdir(parents=True, exist_ok=True)
    path = rank_rng_path(root, step, rank)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(rng if rng is not None else rng_state(), tmp)
    os.replace(tmp, path)
    return path


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    root: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    state: TrainState,
    keep: int,
    rng: dict | None = None,
    *,
    weights: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Rank 0's checkpoint of `step`: the loop's `state` as progress.json; `rng` is the generators' state
    at that step (default: now).

    A sharded run passes `weights` and `optimizer_state` gathered whole (train/sharded.py): the
    optimizer state is then keyed by parameter name, and only a sharded run can load it back."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model) if weights is None else weights, tmp / "trainable.safetensors")
    saved = {"optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state}
    saved.update(scheduler=scheduler.state_dict(), sharded=optimizer_state is not None)
    torch.save(saved, tmp / "state.pt")
    torch.save(rng if rng is not None else rng_state(), tmp / "rng-rank0.pt")
    (tmp / "progress.json").write_text(json.dumps(state.to_dict(), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        for other in root.glob(f"rng-rank*-{old.name}.pt"):
            other.unlink(missing_ok=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "progress.json").is_file()
    )


def load_trainable(path: Path, model) -> None:
    """Copy a folder's trainable.safetensors into `model`, refusing tensors the model does not have."""
    tensors = load_file(path / "trainable.safetensors")
    if any(_is_sharded(p) for p in model.parameters()):  # FSDP shards: each process takes its own
        from llamaforge.train.sharded import load_full_weights

        load_full_weights(model, tensors)
        return
    params = dict(model.named_parameters())
    unknown = set(tensors) - set(params)
    if unknown:
        raise ValueError(f"weights in {path} do not match the model: unknown tensors {sorted(unknown)[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def load_checkpoint(
    path: Path, model, optimizer, scheduler, rank: int = 0, *, sharded: bool = False
) -> TrainState:
    """Restore a checkpoint into this process: weights, optimizer, scheduler and this rank's RNG;
    returns the loop's state (read first: a bad progress.json changes nothing).
    `sharded`: this run's weights are FSDP shards (every process loads the full state into its own)."""
    progress = path / "progress.json"
    loop = TrainState.from_dict(json.loads(progress.read_text()), source=str(progress))
    state = torch.load(path / "state.pt", weights_only=True)
    if bool(state.get("sharded")) != sharded:
        made, now = ("an FSDP", "without FSDP") if state.get("sharded") else ("a non-FSDP", "with FSDP")
        raise ConfigError(
            f"{path} was written by {made} run and this run is launched {now}: "
            "resume with the launch that wrote it"
        )
    if sharded:
        from llamaforge.train.sharded import load_full_state

        load_trainable(path, model)
        load_full_state(model, optimizer, state["optimizer"])
    else:
        load_trainable(path, model)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_path = path / "rng-rank0.pt" if rank == 0 else path.parent / f"rng-rank{rank}-{path.name}.pt"
    if rng_path.is_file():
        set_rng_state(torch.load(rng_path, weights_only=True))
    elif "torch_rng" in state:  # a checkpoint from before per-rank RNG files: rank 0's state only
        set_rng_state({"torch": state["torch_rng"], "python": state["python_rng"]})
    else:
        log.warning("no RNG state for process %d in %s: its random draws will not repeat exactly", rank, path)
    return loop


def _is_sharded(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def _as_python_rng(value):
    version, internal, gauss = value
    return (version, tuple(internal), gauss)
