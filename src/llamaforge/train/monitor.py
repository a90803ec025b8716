"""Watching validation during training: best weights, early stopping, an overfitting warning, and
generation metrics on a fixed validation sample.

The monitor only decides (is this eval the best? stop? warn?); the validator (train/validator.py)
acts on its verdicts. Its state is a `WatchState` stored in each checkpoint's progress.json, so a
resumed run goes on counting where the interrupted one stopped.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from llamaforge.data.types import Conversation, Message
from llamaforge.errors import LlamaforgeError
from llamaforge.registry import METRICS
from llamaforge.train.checkpoint import load_trainable, trainable_state
from llamaforge.train.state import WatchState

log = logging.getLogger(__name__)


class TrainingDiverged(LlamaforgeError):
    """The training loss became NaN or infinite: the run stopped, run.json says "diverged"."""


BEST_DIR = "best"  # under checkpoints/; the rotation only removes step-* folders, never this one


def overfitting(eval_losses: list[float], train_means: list[float], evals: int) -> bool:
    """True when the eval loss rose at each of the last `evals` evals while the training loss fell.

    `train_means[i]` is the mean training loss over the steps between eval i-1 and eval i, so both
    series are smoothed over the same intervals; the training loss "falls" when the latest interval's
    mean is below the mean of the interval `evals` evals earlier (single steps are too noisy to compare).
    """
    if evals <= 0 or len(eval_losses) < evals + 1 or len(train_means) != len(eval_losses):
        return False
    tail = eval_losses[-(evals + 1) :]
    rising = all(b > a for a, b in zip(tail, tail[1:]))
    first, last = train_means[-(evals + 1)], train_means[-1]
    return rising and first is not None and last is not None and last < first


@dataclass
class Verdict:
    best: bool  # the lowest eval loss so far: keep these weights
    stop: bool  # early stopping: `patience` evals in a row without an improvement above min_delta
    warning: str | None = None


class TrainingMonitor:
    """Fed every training loss and each eval loss; says which eval is best, when to stop, when to warn.

    Its counters are a `WatchState` (train/state.py), part of the run's `TrainState`: a checkpoint
    saves them and a resumed run hands them back, so it goes on counting.
    """

    def __init__(
        self,
        *,
        patience: int | None = None,
        min_delta: float = 0.0,
        overfit_evals: int = 3,
        state: WatchState | None = None,
    ):
        self.patience, self.min_delta, self.overfit_evals = patience or 0, min_delta, overfit_evals
        self.state = state if state is not None else WatchState()

    def add_train_loss(self, loss: float) -> None:
        if math.isfinite(loss):
            self.state.train_sum += loss
            self.state.train_count += 1

    def update(self, step: int, result: dict) -> Verdict:
        s, loss = self.state, float(result["eval_loss"])
        previous_mean = s.evals[-1][2] if s.evals else None
        train_mean = s.train_sum / s.train_count if s.train_count else previous_mean
        s.train_sum, s.train_count = 0.0, 0
        s.evals.append([step, loss, train_mean])

        best = math.isfinite(loss) and (s.best_loss is None or loss < s.best_loss)
        improved = math.isfinite(loss) and (s.best_loss is None or s.best_loss - loss > self.min_delta)
        s.bad_evals = 0 if improved else s.bad_evals + 1
        if best:
            s.best_loss, s.best_step, s.best_result = loss, step, dict(result)
        stop = bool(self.patience) and s.bad_evals >= self.patience
        if stop:
            s.stopped_at = step

        warning = None
        eval_losses, train_means = [e[1] for e in s.evals], [e[2] for e in s.evals]
        if overfitting(eval_losses, train_means, self.overfit_evals):
            if not s.warned:  # once per streak of rising eval losses
                k = self.overfit_evals
                warning = (
                    f"possible overfitting at step {step}: eval loss rose {k} evals in a row "
                    f"({eval_losses[-k - 1]:.4f} -> {loss:.4f}) while the training loss fell "
                    f"({train_means[-k - 1]:.4f} -> {train_mean:.4f})"
                )
                s.warnings.append({"type": "overfitting", "step": step, "message": warning})
                s.warned = True
        elif len(eval_losses) < 2 or eval_losses[-1] <= eval_losses[-2]:
            s.warned = False
        return Verdict(best=best, stop=stop, warning=warning)

    def summary(self) -> dict:
        s = self.state
        return {"best_step": s.best_step, "best_eval_loss": s.best_loss, "stopped_early_at": s.stopped_at}


def non_finite(record: dict, precision: str) -> str | None:
    """What diverged in a step's record (the loss, or the gradient norm: the weights are NaN then too),
    or None. fp16's loss scaler sees inf gradients as a matter of course and skips those steps."""
    loss, norm = record["loss"], record.get("grad_norm")
    if not math.isfinite(loss):
        return f"the training loss is {loss}"
    if norm is not None and not math.isfinite(norm) and precision != "fp16":
        return f"the gradient norm is {norm}"
    return None


# ---------------------------------------------------------------- best weights on disk


def save_best(root: Path, model, info: dict, weights: dict | None = None) -> Path:
    """Trainable tensors + best.json, written to a temp folder and renamed into place (as checkpoints).
    `weights`: a sharded run's trainable tensors, gathered whole (train/sharded.py)."""
    from llamaforge.atomic import swap_into_place

    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / BEST_DIR, root / f".tmp-{BEST_DIR}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model) if weights is None else weights, tmp / "trainable.safetensors")
    (tmp / "best.json").write_text(json.dumps(info, indent=2))
    swap_into_place(tmp, final)
    return final


def load_best(root: Path, model) -> dict:
    """Copy the best trainable tensors into `model`; returns best.json."""
    path = root / BEST_DIR
    load_trainable(path, model)
    return json.loads((path / "best.json").read_text())


# ---------------------------------------------------------------- generation metrics on a sample


def validation_sample(val: list[Conversation], size: int) -> list[tuple[list[Message], str]]:
    """(prompt messages, reference) for the first `size` validation records with an assistant answer.

    The prompt is every message before the last assistant turn (which must follow a user turn);
    the same records at every eval, so the scores form a curve. `val`: as prepared (system prompt on).
    """
    sample: list[tuple[list[Message], str]] = []
    for conv in val:
        msgs = conv.messages
        last = max((i for i, m in enumerate(msgs) if m.role == "assistant" and m.content.strip()), default=0)
        if last == 0 or msgs[last - 1].role != "user":
            continue
        sample.append((list(msgs[:last]), msgs[last].content))
        if len(sample) == size:
            break
    return sample


def generation_scores(
    model,
    tokenizer,
    template,
    sample: list[tuple[list[Message], str]],
    *,
    max_new_tokens: int,
    batch_size: int,
    precision: str,
) -> dict[str, float]:
    """Greedy answers for the sample scored with the evaluation metrics (0-100), keys prefixed `eval_`."""
    from llamaforge.evaluate.config import EvalMetricsConfig
    from llamaforge.evaluate.metrics import compute_metrics
    from llamaforge.generation import generate

    if not sample:
        return {}
    outputs = generate(
        model,
        tokenizer,
        template,
        [conv for conv, _ in sample],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        precision=precision,
    )
    curves = [metric for metric in METRICS if metric.curve]  # every registered metric that asks for a curve
    scores = compute_metrics(
        outputs, [ref for _, ref in sample], EvalMetricsConfig(metrics=[m.name for m in curves])
    ).summary()
    return {f"eval_{column}": scores[column] for metric in curves for column in metric.curve}
