"""The training loop's explicit state (train/state.py): what a checkpoint saves is what a resume gets
back, and a progress.json that is not one is refused, naming the file, before anything is loaded."""

from __future__ import annotations

import json
import re

import pytest
import torch

from llamaforge.errors import ConfigError
from llamaforge.train.checkpoint import load_checkpoint, save_checkpoint
from llamaforge.train.monitor import TrainingMonitor
from llamaforge.train.state import TrainState, WatchState


def _moved_state() -> TrainState:
    state = TrainState(step=7, epoch=1, group=3, tokens=1234, target_tokens=567, elapsed=12.5)
    monitor = TrainingMonitor(patience=2, state=state.watch)
    monitor.add_train_loss(2.5)
    monitor.update(5, {"eval_loss": 1.75, "eval_ppl": 5.75})
    monitor.add_train_loss(2.0)
    return state


def test_the_state_survives_progress_json():
    state = _moved_state()
    data = json.loads(json.dumps(state.to_dict()))
    assert data["step"] == 7 and data["monitor"]["best_step"] == 5  # the layout readers know
    back = TrainState.from_dict(data)
    assert back == state and back.watch is not state.watch
    assert back.watch.best_result == {"eval_loss": 1.75, "eval_ppl": 5.75}
    assert back.watch.train_sum == 2.0 and back.watch.train_count == 1  # losses since the last eval


def test_a_progress_json_without_the_watch_starts_it_fresh():
    back = TrainState.from_dict(
        {"step": 3, "epoch": 0, "group": 3, "tokens": 9, "target_tokens": 4, "elapsed": 1.0}
    )
    assert back.step == 3 and back.watch == WatchState()


def test_unknown_or_mistyped_fields_are_refused_with_the_file():
    with pytest.raises(ConfigError, match=r"ckpt/progress.json: unknown field\(s\) \['stepz'\]"):
        TrainState.from_dict({"stepz": 3}, source="ckpt/progress.json")
    with pytest.raises(ConfigError, match="ckpt/progress.json: monitor: unknown field"):
        TrainState.from_dict({"step": 3, "monitor": {"best": 1}}, source="ckpt/progress.json")
    with pytest.raises(ConfigError, match="step must be a number"):
        TrainState.from_dict({"step": "three"}, source="ckpt/progress.json")


def test_a_checkpoint_round_trips_the_state_and_a_bad_one_changes_nothing(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    state = _moved_state()
    path = save_checkpoint(tmp_path, state.step, model, optimizer, scheduler, state, keep=2)
    assert load_checkpoint(path, model, optimizer, scheduler) == state

    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    (path / "progress.json").write_text(json.dumps({**state.to_dict(), "bogus": 1}))
    with pytest.raises(ConfigError, match=re.escape(f"{path / 'progress.json'}: unknown field")):
        load_checkpoint(path, model, optimizer, scheduler)
    assert torch.equal(model.weight, saved + 1.0)  # refused before the weights were loaded
