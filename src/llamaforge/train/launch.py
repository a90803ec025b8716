"""The launch: accelerate's process-wide state for this run's precision, and the processes it joined."""

from __future__ import annotations

import os

from llamaforge.errors import ConfigError


def check_launch(accelerator) -> None:
    """Refuse a multi-process launch that accelerate did not join: each process would train alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes != world:
        raise ConfigError(
            f"launched with WORLD_SIZE={world} but accelerate joined {accelerator.num_processes} process(es): "
            "the processes would train unsynchronised copies. On CPU launch with "
            "`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m llamaforge.cli train ...`."
        )


def start_accelerator(precision: str, device):
    """A fresh `Accelerator` for `precision` ("bf16", "fp16", "fp32") on `device`, checked against the launch."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state; a second recipe in the same process (tests, sweeps)
    # with another precision must start from a clean one. The distributed state is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision={"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision],
        cpu=device.type == "cpu",
    )
    check_launch(accelerator)
    return accelerator
