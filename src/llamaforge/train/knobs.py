"""Training knobs outside the loop: the optimizers (registered here, registry.OPTIMIZERS) and
deterministic runs."""

from __future__ import annotations

import importlib.util
import logging
import os
import random

import numpy as np
import torch

from llamaforge.errors import ConfigError
from llamaforge.registry import OPTIMIZERS, Optimizer

log = logging.getLogger(__name__)
BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}


def check_optimizer(name: str, device: torch.device) -> None:
    """Fail before the model is loaded when the chosen optimizer cannot run here."""
    check = OPTIMIZERS.get(name, field="train.optimizer").check
    if check is not None:
        check(device)


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norms (1-D tensors): decaying them only hurts."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)  # keep empty groups: resumed checkpoints expect two
    return OPTIMIZERS.get(name, field="train.optimizer").build(groups, lr)


def _adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    params = [p for g in groups for p in g["params"]]
    # The fused kernel updates all tensors in one pass (many small LoRA tensors: far fewer launches);
    # it needs every parameter floating point on one CUDA or CPU device.
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= {"cuda", "cpu"} and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def _sgd(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def _bnb(name: str) -> Optimizer:
    """A bitsandbytes 8-bit optimizer (8-bit states; the paged one pages them through CUDA unified memory)."""

    def build(groups: list[dict], lr: float) -> torch.optim.Optimizer:
        import bitsandbytes as bnb

        return getattr(bnb.optim, BNB_OPTIMIZERS[name])(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)

    def check(device: torch.device) -> None:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"train.optimizer={name} needs bitsandbytes: pip install 'llamaforge[quant]'")
        if name.startswith("paged") and device.type != "cuda":
            # bitsandbytes falls back to the plain 8-bit optimizer on CPU (paging is a CUDA unified-memory feature)
            log.warning("train.optimizer=%s: paging needs CUDA; on CPU this is adamw_8bit", name)

    return Optimizer(name, build, check, description=f"bitsandbytes {BNB_OPTIMIZERS[name]}")


def seed_everything(seed: int, deterministic: bool) -> bool:
    """Seed python, numpy and torch; with `deterministic`, refuse nondeterministic kernels too.

    Returns the previous torch.are_deterministic_algorithms_enabled(), so the caller can restore it
    (the setting is process-wide: a sweep or a test suite runs several recipes in one process).
    """
    previous = torch.are_deterministic_algorithms_enabled()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
            # cuBLAS needs a fixed workspace to be deterministic; read when cuBLAS first starts
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
    return previous


OPTIMIZERS.register(Optimizer("adamw", _adamw, description="torch AdamW, fused kernel where it applies"))
for _name in BNB_OPTIMIZERS:
    OPTIMIZERS.register(_bnb(_name))
OPTIMIZERS.register(Optimizer("sgd", _sgd, description="torch SGD, momentum 0.9"))
