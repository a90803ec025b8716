"""One optimizer step's forward/backward over its micro-batches, the loss normalised over the step.

Each micro-batch's summed token loss is divided by the target count of the whole step (all
micro-batches, all processes), so the gradient is that of the mean over every target token,
whatever the micro-batch size, the accumulation or the number of processes.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from llamaforge.losses import num_targets
from llamaforge.train.amp import MixedPrecision
from llamaforge.train.state import TrainState


def accumulate_tokens(
    train_loss,
    amp: MixedPrecision,
    micro: list[tuple[dict[str, torch.Tensor], int]],
    state: TrainState,
) -> tuple[float, int]:
    """Forward/backward over collated micro-batches (batch, real token count) through `train_loss`
    (the DDP/FSDP-wrapped loss, train/distributed.py) in the run's precision (`amp`); returns
    (summed loss, global target count) and counts the tokens into `state`."""
    acc = amp.accelerator
    local_targets = sum(num_targets(b) for b, _ in micro)
    global_targets = int(acc.reduce(torch.tensor(local_targets, device=acc.device), reduction="sum").item())
    loss_total = 0.0
    for j, (batch, real_tokens) in enumerate(micro):
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        sync = j == len(micro) - 1
        with nullcontext() if sync else acc.no_sync(train_loss), amp.autocast():
            loss_sum = train_loss(batch)
            # DDP averages gradients over processes; scaling by world size makes the result the
            # sum over all target tokens divided by their global count.
            amp.backward(loss_sum * acc.num_processes / max(global_targets, 1))
        loss_total += loss_sum.item()
        state.tokens += real_tokens
    state.target_tokens += local_targets
    return loss_total, global_targets
