"""Training knobs outside the loop: the optimizer choice and deterministic runs."""

from __future__ import annotations

import importlib.util
import logging
import os
import random

import numpy as np
import torch

from llamaforge.errors import ConfigError

log = logging.getLogger(__name__)
BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}


def check_optimizer(name: str, device: torch.device) -> None:
    """Fail before the model is loaded when the chosen optimizer cannot run here."""
    if name not in BNB_OPTIMIZERS:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"train.optimizer={name} needs bitsandbytes: pip install 'llamaforge[quant]'")
    if name.startswith("paged") and device.type != "cuda":
        # bitsandbytes falls back to the plain 8-bit optimizer on CPU (paging is a CUDA unified-memory feature)
        log.warning("train.optimizer=%s: paging needs CUDA; on CPU this is adamw_8bit", name)


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norms (1-D tensors): decaying them only hurts."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)  # keep empty groups: resumed checkpoints expect two
    if name in BNB_OPTIMIZERS:
        import bitsandbytes as bnb

        return getattr(bnb.optim, BNB_OPTIMIZERS[name])(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    params = [p for g in groups for p in g["params"]]
    # The fused kernel updates all tensors in one pass (many small LoRA tensors: far fewer launches);
    # it needs every parameter floating point on one CUDA or CPU device.
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= {"cuda", "cpu"} and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


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
