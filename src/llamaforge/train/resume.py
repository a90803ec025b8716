"""Checkpoints as the training loop takes them: the last step boundary remembered, a save from every
process, and the restore of `--resume`.

An interrupt can come mid-step, when the micro-batches' forward/backward has drawn random numbers
and moved the data position but the weights have not changed yet: such a checkpoint stores the
state and RNG of the last step boundary instead, so the resumed run replays the interrupted step
exactly. The validation watch is saved as it is now (evals since the boundary are not repeated).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from llamaforge.errors import ConfigError
from llamaforge.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_rank_rng,
)
from llamaforge.train.sharded import save_gathered
from llamaforge.train.state import TrainState


class Checkpointer:
    def __init__(self, root: Path, accelerator, keep: int):
        self.root, self.accelerator, self.keep = root, accelerator, keep
        self.boundary: tuple[TrainState, dict] | None = None  # (state, RNG) at the last step boundary

    def mark(self, state: TrainState) -> None:
        """Remember the state and RNG at a step boundary (weights and optimizer only change there)."""
        self.boundary = (state.snapshot(), rng_state())

    def save(
        self,
        state: TrainState,
        model,
        optimizer,
        scheduler,
        *,
        wrapped=None,
        at_boundary: bool = False,
    ) -> Path | None:
        """Every process saves its RNG (rank 0 in the checkpoint, the others beside it); rank 0 the rest.
        `at_boundary`: the position and RNG of the last step boundary (after an interrupt mid-step).
        `wrapped`: the launch-wrapped loss module; a sharded run's weights and optimizer state are
        gathered whole through it (train/sharded.py). Returns the checkpoint folder (None on the other ranks)."""
        acc = self.accelerator
        saved, rng = self.boundary if at_boundary and self.boundary else (state, None)
        saved = replace(saved, watch=state.watch).snapshot()
        # every process takes part in gathering a sharded run's state
        gathered = save_gathered(acc, wrapped, model, optimizer) if wrapped is not None else {}
        if not acc.is_main_process:
            save_rank_rng(self.root, saved.step, acc.process_index, rng)
            return None
        return save_checkpoint(
            self.root, saved.step, model, optimizer, scheduler, saved, self.keep, rng=rng, **gathered
        )

    def restore(self, model, optimizer, scheduler, *, sharded: bool = False) -> tuple[TrainState, Path]:
        """The latest checkpoint loaded into this process; (its state, its folder)."""
        checkpoints = list_checkpoints(self.root)
        if not checkpoints:
            raise ConfigError(f"--resume: no checkpoint in {self.root}")
        state = load_checkpoint(
            checkpoints[-1], model, optimizer, scheduler, rank=self.accelerator.process_index, sharded=sharded
        )
        return state, checkpoints[-1]
