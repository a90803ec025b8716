"""The launch: one `Accelerator` with the same process-level settings for every run, and the processes it joined.

accelerate keeps one process-wide state and refuses a second `Accelerator` whose `mixed_precision`
differs ("AcceleratorState has already been initialized and cannot be changed"). The recipe therefore
owns its precision (train/amp.py) and the `Accelerator` always gets mixed_precision "no", unless a
DeepSpeed launch lets the DeepSpeed config's "auto" fp16/bf16 entries take the run's precision (one run
per process there). An FSDP launch on GPUs gets the run's precision as its sharding policy (the
weights gathered and the gradients reduced in it), as accelerate would have set it.
"""

from __future__ import annotations

import os

from llamaforge.errors import ConfigError
from llamaforge.train.amp import MixedPrecision
from llamaforge.train.sharded import deepspeed_requested, fsdp_requested

ACCELERATE_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


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
    """The `Accelerator` for a run on `device` and its `MixedPrecision` for `precision` ("bf16", "fp16",
    "fp32", resolved), checked against the launch."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    kwargs = {}
    if fsdp_requested() and device.type != "cpu" and precision != "fp32":
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(mixed_precision_policy=precision)
    accelerator = Accelerator(
        mixed_precision=ACCELERATE_PRECISION[precision] if deepspeed_requested() else "no",
        cpu=device.type == "cpu",
        **kwargs,
    )
    check_launch(accelerator)
    delegated = accelerator.distributed_type == DistributedType.DEEPSPEED  # its engine casts and scales
    return accelerator, MixedPrecision(precision, device, accelerator, delegated=delegated)
