"""What the data-parallel wrapper (DDP, FSDP, DeepSpeed) wraps: the training loss, not the model.

Those wrappers do their work inside the forward of the module they wrap: DDP arms its gradient
all-reduce there (a backward through a forward that bypassed it syncs nothing, silently), FSDP and
ZeRO-3 gather the sharded weights there. Our chunked loss runs the decoder and lm_head itself
rather than the model's forward (which would build full-vocabulary logits), so the recipe prepares
a `TokenLoss` around the model and calls that, and keeps the plain model for eval, generation and
saving.
"""

from __future__ import annotations

import torch
from torch import nn

from llamaforge.losses import token_loss_sum


class TokenLoss(nn.Module):
    """forward(batch) -> the summed token cross-entropy of the batch (see losses.token_loss_sum)."""

    def __init__(self, model: nn.Module, chunk_size: int):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_loss_sum(self.model, batch, self.chunk_size)
