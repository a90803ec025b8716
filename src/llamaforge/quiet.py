"""Known-harmless third-party noise, filtered narrowly so the first screen shows only llamaforge's lines.

Each filter names one message of one library; anything else still gets through.
"""

from __future__ import annotations

import logging
import warnings

# (logger, level): torchao logs a WARNING for each optional CUDA extension it cannot load on a CPU
# machine and for a missing Triton; torch's pytree logs a deprecation for torchao's enums.
QUIET_LOGGERS = (("torchao", logging.ERROR), ("torch.utils._pytree", logging.ERROR))
# (category, message regex, module regex)
QUIET_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\."),
    (UserWarning, r"TypedStorage is deprecated", r"torch\."),
)


def silence_known_noise() -> None:
    for name, level in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for category, message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
