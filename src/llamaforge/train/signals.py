"""Stopping a training run on Ctrl-C / SIGTERM without making the user wait for a long step.

The first signal asks the loop to stop at the next step boundary (a checkpoint is written there).
A second signal, or a first one while a step that is expected to take over `patience_s` is running,
stops at once: the checkpoint then holds the state of the last step boundary (weights and optimizer
only change in the optimizer update, which is never interrupted; progress and RNG come from the
snapshot taken at the boundary), so resuming from it replays the interrupted step exactly.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from llamaforge.console import say

LONG_STEP_S = 30.0


class StopSignals:
    def __init__(self, patience_s: float = LONG_STEP_S):
        self.patience_s = patience_s
        self.count = 0
        self.expected_step_s = 0.0  # the last step's duration: what the running one will probably take
        self._in_update = False
        self._interrupt_after_update = False

    @property
    def stop_requested(self) -> bool:
        return self.count > 0

    def handle(self, signum, frame) -> None:
        self.count += 1
        now = self.count >= 2 or self.expected_step_s > self.patience_s
        if not now:
            say("stopping at the end of this step (a checkpoint is saved); press Ctrl-C again to stop now")
            return
        if self._in_update:  # weights half-updated: finish the update, then stop
            self._interrupt_after_update = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def update(self):
        """The optimizer update: never interrupted halfway (the weights would be half-stepped)."""
        self._in_update = True
        try:
            yield
        finally:
            self._in_update = False
        if self._interrupt_after_update:
            self._interrupt_after_update = False
            raise KeyboardInterrupt

    @contextmanager
    def installed(self):
        """Route SIGINT and SIGTERM (a scheduler's preemption, `kill`) to `handle` while training."""
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
