"""Validation during training, as an object the recipe composes: it is handed what it uses.

The recipe measures (`FineTuneRecipe.evaluate`: the held-out loss); the validator acts on the
measures: generation metrics on a fixed validation sample, the monitor's verdicts (best weights kept
on disk, early stopping, the overfitting warning), the divergence check on every step, the sample
answers to `eval.prompts`, and at the end which weights get saved (the last or the best eval's).
Its counters are the `WatchState` inside the run's `TrainState`, so checkpoints carry them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from llamaforge.config import JobConfig
from llamaforge.data.types import Conversation, Message
from llamaforge.hardware import release_free_memory
from llamaforge.train.monitor import (
    TrainingMonitor,
    generation_scores,
    load_best,
    non_finite,
    save_best,
    validation_sample,
)
from llamaforge.train.sharded import full_weights, gather_trainable
from llamaforge.train.state import WatchState

log = logging.getLogger(__name__)


class Validator:
    def __init__(
        self,
        cfg: JobConfig,
        run_dir: Path,
        accelerator,
        *,
        model,
        tokenizer,
        template,
        val_conversations: list[Conversation],
        precision: str,
        watch: WatchState,
        say: Callable[[str], None],
        wrapped=None,
    ):
        """`wrapped`: the launch-wrapped loss module, through which a sharded (FSDP) run's weights are
        gathered whole for generation and the best weights (train/sharded.py)."""
        t = cfg.train
        self.train_cfg, self.eval_cfg, self.system_prompt = t, cfg.eval, cfg.data.system_prompt
        self.checkpoints, self.accelerator, self.say = run_dir / "checkpoints", accelerator, say
        self.model, self.tokenizer, self.template, self.precision = model, tokenizer, template, precision
        self.wrapped = wrapped
        self.monitor = TrainingMonitor(
            patience=t.early_stopping_patience,
            min_delta=t.early_stopping_min_delta,
            overfit_evals=t.overfit_warning_evals,
            state=watch,  # a resumed run goes on counting
        )
        size = cfg.eval.sample_size  # the same records at every eval, so the scores form a curve
        self.sample = validation_sample(val_conversations, size) if size else []

    @property
    def stopped(self) -> bool:
        """Early stopping has ended the run."""
        return self.monitor.state.stopped_at is not None

    def check(self, record: dict) -> str | None:
        """What diverged in this step (the recipe stops the run), or None: the loss joins the watch."""
        what = non_finite(record, self.precision)
        if what is None:
            self.monitor.add_train_loss(record["loss"])
        return what

    def generation_metrics(self) -> dict[str, float]:
        """BLEU/ROUGE/exact match of greedy answers on a fixed validation sample (eval.sample_size)."""
        if not self.sample or not self.accelerator.is_main_process:
            return {}
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        scores = generation_scores(
            model,
            self.tokenizer,
            self.template,
            self.sample,
            max_new_tokens=self.eval_cfg.max_new_tokens,
            batch_size=self.train_cfg.batch_size * 2,
            precision=self.precision,
        )
        model.train()
        return scores

    def sample_answers(self) -> dict[str, str]:
        """Greedy answers to `eval.prompts` (summary.json's before/after)."""
        from llamaforge.generation import generate

        prompts = self.eval_cfg.prompts
        if not prompts:
            return {}
        system = [Message("system", self.system_prompt)] if self.system_prompt else []
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        with full_weights(self.wrapped) if self.wrapped is not None else nullcontext():
            answers = generate(
                model,
                self.tokenizer,
                self.template,
                [system + [Message("user", p)] for p in prompts],
                max_new_tokens=self.eval_cfg.max_new_tokens,
                precision=self.precision,
            )
        release_free_memory()
        model.train()
        return dict(zip(prompts, answers))

    def after_eval(self, step: int, result: dict, metrics) -> None:
        """Log an eval, keep the best weights, say when early stopping ends the run."""
        verdict = self.monitor.update(step, result)
        if verdict.best:
            self.save_best(step, result)
        if self.accelerator.is_main_process:
            metrics.write({"step": step, **result})
            self.say(
                f"step {step}: eval loss {result['eval_loss']:.4f}" + (" (best)" if verdict.best else "")
            )
            if verdict.warning:
                log.warning(verdict.warning)
        if verdict.stop:
            m, s = self.monitor, self.monitor.state
            self.say(
                f"early stopping at step {step}: no eval-loss improvement above {m.min_delta} in "
                f"{m.patience} evals (best {s.best_loss:.4f} at step {s.best_step})"
            )

    def save_best(self, step: int, result: dict) -> None:
        """Every process calls it (a sharded run gathers its weights); the main process writes."""
        acc = self.accelerator
        weights = gather_trainable(acc, self.wrapped, self.model) if self.wrapped is not None else None
        if acc.is_main_process:
            save_best(self.checkpoints, acc.unwrap_model(self.model), {"step": step, **result}, weights)

    def finish(self, final: dict | None, step: int) -> tuple[dict | None, dict]:
        """Which weights get saved: the last ones, or (train.load_best_at_end) the best eval's.

        Returns the eval result of the weights that will be saved, and the summary's facts about it.
        """
        s, t, acc = self.monitor.state, self.train_cfg, self.accelerator
        facts = {"warnings": list(s.warnings), **self.monitor.summary()}
        if s.best_step is None or not final:
            return final, facts
        load_best_weights = t.load_best_at_end if t.load_best_at_end is not None else bool(t.eval_every)
        weights_step = step
        if final["eval_loss"] < s.best_loss:  # the last step was not an eval step and beats them all
            s.best_loss, s.best_step, s.best_result = final["eval_loss"], step, dict(final)
            self.save_best(step, final)
        elif load_best_weights and s.best_step != step:
            acc.wait_for_everyone()
            load_best(self.checkpoints, acc.unwrap_model(self.model))
            final, weights_step = dict(s.best_result), s.best_step
        facts.update(best_step=s.best_step, best_eval_loss=s.best_loss, weights_step=weights_step)
        self.say(
            f"best eval loss {s.best_loss:.4f} at step {s.best_step}; the saved weights are from step {weights_step}"
        )
        return final, facts
