"""Watching validation during training: best weights, early stopping, an overfitting warning, and
generation metrics on a fixed validation sample.

The monitor only decides (is this eval the best? stop? warn?); the recipe acts on its verdicts.
Its state is a small JSON dict stored in each checkpoint's progress, so a resumed run goes on
counting where the interrupted one stopped.
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
    """Fed every training loss and each eval loss; says which eval is best, when to stop, when to warn."""

    def __init__(self, *, patience: int | None = None, min_delta: float = 0.0, overfit_evals: int = 3):
        self.patience, self.min_delta, self.overfit_evals = patience or 0, min_delta, overfit_evals
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.best_result: dict | None = None
        self.bad_evals = 0
        self.stopped_at: int | None = None
        self.evals: list[list] = []  # [step, eval_loss, train_mean]
        self.warnings: list[dict] = []
        self._train_sum, self._train_count, self._warned = 0.0, 0, False

    def add_train_loss(self, loss: float) -> None:
        if math.isfinite(loss):
            self._train_sum += loss
            self._train_count += 1

    def update(self, step: int, result: dict) -> Verdict:
        loss = float(result["eval_loss"])
        previous_mean = self.evals[-1][2] if self.evals else None
        train_mean = self._train_sum / self._train_count if self._train_count else previous_mean
        self._train_sum, self._train_count = 0.0, 0
        self.evals.append([step, loss, train_mean])

        best = math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss)
        improved = math.isfinite(loss) and (self.best_loss is None or self.best_loss - loss > self.min_delta)
        self.bad_evals = 0 if improved else self.bad_evals + 1
        if best:
            self.best_loss, self.best_step, self.best_result = loss, step, dict(result)
        stop = bool(self.patience) and self.bad_evals >= self.patience
        if stop:
            self.stopped_at = step

        warning = None
        eval_losses, train_means = [e[1] for e in self.evals], [e[2] for e in self.evals]
        if overfitting(eval_losses, train_means, self.overfit_evals):
            if not self._warned:  # once per streak of rising eval losses
                k = self.overfit_evals
                warning = (
                    f"possible overfitting at step {step}: eval loss rose {k} evals in a row "
                    f"({eval_losses[-k - 1]:.4f} -> {loss:.4f}) while the training loss fell "
                    f"({train_means[-k - 1]:.4f} -> {train_mean:.4f})"
                )
                self.warnings.append({"type": "overfitting", "step": step, "message": warning})
                self._warned = True
        elif len(eval_losses) < 2 or eval_losses[-1] <= eval_losses[-2]:
            self._warned = False
        return Verdict(best=best, stop=stop, warning=warning)

    def summary(self) -> dict:
        return {
            "best_step": self.best_step,
            "best_eval_loss": self.best_loss,
            "stopped_early_at": self.stopped_at,
        }

    def state_dict(self) -> dict:
        return {
            "best_loss": self.best_loss,
            "best_step": self.best_step,
            "best_result": self.best_result,
            "bad_evals": self.bad_evals,
            "stopped_at": self.stopped_at,
            "evals": self.evals,
            "warnings": self.warnings,
            "train_sum": self._train_sum,
            "train_count": self._train_count,
            "warned": self._warned,
        }

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        self.best_loss, self.best_step = state["best_loss"], state["best_step"]
        self.best_result, self.bad_evals = state["best_result"], state["bad_evals"]
        self.stopped_at, self.evals, self.warnings = state["stopped_at"], state["evals"], state["warnings"]
        self._train_sum, self._train_count = state["train_sum"], state["train_count"]
        self._warned = state["warned"]


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


# ---------------------------------------------------------------- the recipe's side


class ValidationWatch:
    """The recipe's validation-time duties (mixed into FineTuneRecipe, whose state it uses): log each
    eval, keep the best weights, stop early, warn, stop on divergence, pick the weights to save."""

    monitor: TrainingMonitor | None = None

    def _new_monitor(self) -> TrainingMonitor:
        t = self.cfg.train
        monitor = TrainingMonitor(
            patience=t.early_stopping_patience,
            min_delta=t.early_stopping_min_delta,
            overfit_evals=t.overfit_warning_evals,
        )
        monitor.load_state_dict(self.progress.get("monitor"))  # a resumed run goes on counting
        return monitor

    def _generation_metrics(self) -> dict[str, float]:
        """BLEU/ROUGE/exact match of greedy answers on a fixed validation sample (eval.sample_size)."""
        if not self.cfg.eval.sample_size or not self.accelerator.is_main_process:
            return {}
        if not hasattr(self, "_val_sample"):
            self._val_sample = validation_sample(self.data.val_conversations, self.cfg.eval.sample_size)
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        scores = generation_scores(
            model,
            self.tokenizer,
            self.template,
            self._val_sample,
            max_new_tokens=self.cfg.eval.max_new_tokens,
            batch_size=self.cfg.train.batch_size * 2,
            precision=self.precision,
        )
        model.train()
        return scores

    def _eval_and_log(self, metrics, step: int) -> None:
        result = self.evaluate()
        if not result:
            return
        verdict = self.monitor.update(step, result)
        self.progress["monitor"] = self.monitor.state_dict()
        if verdict.best:
            self._save_best(step, result)
        if self.accelerator.is_main_process:
            metrics.write({"step": step, **result})
            self._log(
                f"step {step}: eval loss {result['eval_loss']:.4f}" + (" (best)" if verdict.best else "")
            )
            if verdict.warning:
                log.warning(verdict.warning)
        if verdict.stop:
            m = self.monitor
            self._log(
                f"early stopping at step {step}: no eval-loss improvement above {m.min_delta} in "
                f"{m.patience} evals (best {m.best_loss:.4f} at step {m.best_step})"
            )

    def _save_best(self, step: int, result: dict) -> None:
        from llamaforge.train.sharded import gather_trainable

        weights = gather_trainable(self.accelerator, self.train_loss, self.model)  # every process
        if self.accelerator.is_main_process:
            save_best(
                self.run_dir / "checkpoints",
                self.accelerator.unwrap_model(self.model),
                {"step": step, **result},
                weights,
            )

    def _finish_best(self, final: dict | None) -> dict | None:
        """Which weights get saved: the last ones, or (train.load_best_at_end) the best eval's.

        Returns the eval result of the weights that will be saved.
        """
        m, acc, step, t = self.monitor, self.accelerator, self.progress["step"], self.cfg.train
        self.summary.update(warnings=list(m.warnings), **m.summary())
        if m.best_step is None or not final:
            return final
        load_best_weights = t.load_best_at_end if t.load_best_at_end is not None else bool(t.eval_every)
        weights_step = step
        if final["eval_loss"] < m.best_loss:  # the last step was not an eval step and beats them all
            m.best_loss, m.best_step, m.best_result = final["eval_loss"], step, dict(final)
            self._save_best(step, final)
        elif load_best_weights and m.best_step != step:
            acc.wait_for_everyone()
            load_best(self.run_dir / "checkpoints", acc.unwrap_model(self.model))
            final, weights_step = dict(m.best_result), m.best_step
        self.summary.update(best_step=m.best_step, best_eval_loss=m.best_loss, weights_step=weights_step)
        self._log(
            f"best eval loss {m.best_loss:.4f} at step {m.best_step}; "
            f"the saved weights are from step {weights_step}"
        )
        return final

    def _check_finite(self, record: dict, metrics, bar) -> None:
        """Stop at the first non-finite training loss (or gradient norm: the weights are now NaN too),
        leaving run.json "diverged" and the metrics so far."""
        from llamaforge.train.tracking import plot_losses

        loss, step, norm = record["loss"], record["step"], record.get("grad_norm")
        # fp16's loss scaler sees inf gradients as a matter of course and skips those steps
        bad_norm = norm is not None and not math.isfinite(norm) and self.precision != "fp16"
        if math.isfinite(loss) and not bad_norm:
            self.monitor.add_train_loss(loss)
            return
        bar.close()
        what = f"the training loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"
        message = (
            f"training diverged at step {step}: {what} (lr {record['lr']:.3g}). "
            "Lower train.lr, keep train.max_grad_norm > 0 or raise train.warmup_ratio."
        )
        if self.accelerator.is_main_process:
            metrics.write({"step": step, "diverged": what, "lr": record["lr"]})
            self.summary.update(
                status="diverged", error=message, steps=step, warnings=list(self.monitor.warnings)
            )
            (self.run_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
            self._write_run_json("diverged")
        metrics.close("diverged")
        raise TrainingDiverged(message)
