"""Known-harmless third-party noise, filtered narrowly so the first screen shows only llamaforge's lines.

Each filter names one message of one library; anything else still gets through.
"""

from __future__ import annotations

import logging
import warnings

# (logger, level): torchao logs a WARNING for each optional CUDA extension it cannot load on a CPU
# machine and for a missing Triton; torch's pytree logs a deprecation for torchao's enums.
QUIET_LOGGERS = (("torchao", logging.ERROR), ("torch.utils._pytree", logging.ERROR))
# (logger, message start): DeepSpeed (the `distributed` extra), imported by accelerate, warns on every CPU
# machine that it found no GPU.
QUIET_MESSAGES = (("DeepSpeed", "Setting accelerator to CPU."),)
# (category, message regex, module regex)
QUIET_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\."),
    (UserWarning, r"TypedStorage is deprecated", r"torch\."),
)


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def silence_known_noise() -> None:
    for name, level in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name, start in QUIET_MESSAGES:
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in target.filters):
            target.addFilter(_DropMessage(start))
    for category, message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
