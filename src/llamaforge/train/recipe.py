"""The fine-tuning recipe: setup -> train -> save -> cleanup, on accelerate.

A lean loop rather than HF Trainer so that loss normalisation (summed token loss over the target
tokens of the whole optimizer step), chunked loss and exact resume stay in our hands.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from llamaforge.atomic import remove_path, swap_into_place, tmp_sibling
from llamaforge.config import JobConfig, to_yaml
from llamaforge.device import default_device, resolve_precision
from llamaforge.dtypes import torch_dtype
from llamaforge.errors import ConfigError, LlamaforgeError
from llamaforge.hardware import release_free_memory
from llamaforge.losses import held_out_loss
from llamaforge.runs import Run, weights_kind
from llamaforge.train.adapters import attach_method, count_parameters
from llamaforge.train.batching import (
    EpochBatches,
    collate_micro,
    pack_capacity,
    resolve_auto_batch,
    resolve_micro_tokens,
    split_by_tokens,
)
from llamaforge.train.knobs import build_optimizer, check_optimizer, seed_everything
from llamaforge.train.launch import check_launch, start_accelerator  # noqa: F401 - re-exported
from llamaforge.train.monitor import TrainingDiverged
from llamaforge.train.packing import verify_packing
from llamaforge.train.resume import Checkpointer
from llamaforge.train.rundir import prepare_run_dir_once, run_name
from llamaforge.train.sharded import (
    deepspeed_requested,
    fsdp_requested,
    gather_model_state,
    gathered,
    is_fsdp,
    prepare_training,
)
from llamaforge.train.signals import StopSignals
from llamaforge.train.state import TrainState, TrainSummary
from llamaforge.train.step import accumulate_tokens
from llamaforge.train.tracking import MetricsLog, check_trackers, open_trackers, plot_losses, step_bar
from llamaforge.train.validator import Validator

log = logging.getLogger(__name__)


class TrainingInterrupted(LlamaforgeError):
    pass


class FineTuneRecipe:
    """One run: `setup()` (data, model, method, optimizer, the loop's state), `train()` (epochs of
    optimizer steps, each followed by its cadence), `save()`, `cleanup()`.

    Its state is explicit: `self.state` (a `TrainState`: what a checkpoint saves and a resume
    restores) and `self.validator` (validation during training, handed what it uses).
    """

    def __init__(self, cfg: JobConfig, *, run_dir: Path | None = None, resume: bool = False):
        # A copy: auto batch sizing writes the resolved micro-batch into it, never into the caller's.
        self.cfg, self.resume = cfg.model_copy(deep=True), resume
        self.run_dir = run_dir or Path(cfg.output.dir) / run_name(cfg)
        self.summary = TrainSummary()  # summary.json: facts gathered from setup to the end
        self.signals = StopSignals()
        self.state = TrainState()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from llamaforge.hardware import configure_allocator, configure_threads
        from llamaforge.models import load_model, warn_if_chat_tokens_untrained
        from llamaforge.templates import get_template
        from llamaforge.train.data import prepare_data, write_run_data
        from llamaforge.train.objective import objective_for

        cfg = self.cfg
        device = default_device()
        threads = configure_threads() if device.type == "cpu" else None
        allocator = configure_allocator(cfg.train.release_memory)
        check_optimizer(cfg.train.optimizer, device)
        check_trackers(cfg.train.trackers)
        self._was_deterministic = seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.precision = resolve_precision(cfg.train.precision, device)
        self.accelerator, self.amp = start_accelerator(self.precision, device)
        self.run_dir = prepare_run_dir_once(self.run_dir, cfg, self.accelerator, resume=self.resume)
        model, self.tokenizer = load_model(
            cfg.model.source,
            dtype=torch_dtype(cfg.model.dtype),
            quantization=cfg.quantization,
            quantization_backend=cfg.model.quantization_backend,
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
        )
        self.template = get_template(cfg.data.template, self.tokenizer)
        warn_if_chat_tokens_untrained(model, self.tokenizer, self.template)
        self.objective = objective_for(cfg, self.tokenizer.pad_token_id)  # None: plain SFT
        self.data = (
            self.objective.prepare(cfg.data, self.template)
            if self.objective
            else prepare_data(cfg.data, self.template)
        )
        self._log(write_run_data(self.run_dir, self.data))

        self._resolve_batch(model, device)
        self.model = attach_method(model, cfg.method, gradient_checkpointing=cfg.train.gradient_checkpointing)
        if self.objective:
            self.objective.start(self.model, self.data, self.accelerator, self.run_dir, self.resume)
        trainable, total = count_parameters(self.model)
        self._log(
            f"{cfg.method.name}: {trainable:,} trainable of {total:,} parameters "
            f"({100 * trainable / total:.2f}%), precision {self.precision}"
            + (f", {threads} CPU threads" if threads else "")
        )
        log.info(allocator)
        self.summary.record(
            dict(
                trainable_params=trainable,
                total_params=total,
                precision=self.precision,
                threads=threads,
                micro_batch=cfg.train.batch_size,
                grad_accum=cfg.train.grad_accum,
                gradient_checkpointing=cfg.train.gradient_checkpointing,
                micro_batch_tokens=cfg.train.micro_batch_tokens,
            )
        )
        self._schedule()
        self.checkpoints = Checkpointer(
            self.run_dir / "checkpoints", self.accelerator, cfg.train.keep_checkpoints
        )
        if self.resume:
            self._restore()
        self.validator = Validator(
            cfg,
            self.run_dir,
            self.accelerator,
            model=self.model,
            tokenizer=self.tokenizer,
            template=self.template,
            val_conversations=self.data.val_conversations,
            precision=self.precision,
            watch=self.state.watch,
            say=self._log,
            wrapped=self.train_loss,
        )
        self._write_run_json("running")

    def _resolve_batch(self, model, device) -> None:
        """The micro-batch (`auto`: the planner's, written into the run's config.yaml so a resume replays
        it) and the epochs' batches it makes."""
        acc, t = self.accelerator, self.cfg.train
        split_auto = t.micro_batch_tokens == "auto"
        micro_tokens = resolve_micro_tokens(
            self.cfg, device.type, sharded=fsdp_requested() or deepspeed_requested()
        )
        choice = resolve_auto_batch(
            self.cfg,
            model,
            device,
            self.precision,
            self.data.train["length"],
            world=acc.num_processes,
            saved=self.run_dir / "config.yaml" if self.resume else None,
            say=self._log,
            micro_tokens=micro_tokens,
        )
        if choice:
            self.summary.batch_choice = choice
        elif micro_tokens:
            self._log(f"batch: micro-batches past {micro_tokens} padded tokens split within their step")
        if (choice or split_auto) and acc.is_main_process:  # the resolved values, for a resume
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        capacity = pack_capacity(self.cfg)
        self.batches = EpochBatches(
            self.data.train["length"], t.batch_size, seed=t.seed, pack_capacity=capacity
        )
        if capacity:
            self._log(self.batches.packing_line())

    def _schedule(self) -> None:
        """Steps per epoch and in all, the optimizer and its schedule, the loss wrapped for the launch."""
        from transformers import get_scheduler

        from llamaforge.train.distributed import TokenLoss

        cfg, world = self.cfg, self.accelerator.num_processes
        batches = len(self.batches(0)) // world or 1
        self.steps_per_epoch = max(1, math.ceil(batches / cfg.train.grad_accum))
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * self.steps_per_epoch))
        t = cfg.train
        self.optimizer = build_optimizer(self.model, t.optimizer, t.lr, t.weight_decay)
        self.scheduler = get_scheduler(
            {"constant": "constant_with_warmup"}.get(t.scheduler, t.scheduler),
            self.optimizer,
            num_warmup_steps=int(t.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        # DDP syncs (FSDP/ZeRO-3 gather) only inside the forward of what it wraps, and our chunked loss
        # bypasses the model's forward: the wrapped module is the loss; self.model stays the plain model.
        self.train_loss, self.optimizer = prepare_training(  # FSDP on CPU too: train/sharded.py
            self.accelerator,
            TokenLoss(self.model, t.loss_chunk_size),
            self.optimizer,
            t,
            precision=self.precision,
            resume=self.resume,
        )

    def _restore(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        sharded = is_fsdp(self.train_loss)
        self.state, path = self.checkpoints.restore(model, self.optimizer, self.scheduler, sharded=sharded)
        self._log(f"resumed from {path.name} (step {self.state.step})")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    @gathered
    def evaluate(self) -> dict | None:
        """Token-weighted loss over the validation set, with the training masks."""
        if self.data.val is None or len(self.data.val) == 0:
            return None
        if self.objective:
            batch = self.cfg.train.batch_size * 2
            return self.objective.evaluate(self.model, self.data.val, batch, self.amp.autocast)
        self.model.eval()
        held = held_out_loss(
            self.model,
            self.data.val,
            self.tokenizer.pad_token_id,
            batch_size=self.cfg.train.batch_size * 2,
            chunk_size=self.cfg.train.loss_chunk_size,
            autocast=self.amp.autocast,
        )
        release_free_memory()
        self.model.train()
        return {
            "eval_loss": held.loss,
            "eval_ppl": held.perplexity,
            "eval_tokens": held.tokens,
            **self.validator.generation_metrics(),
        }

    def _eval_and_log(self, metrics) -> None:
        result = self.evaluate()
        if result:
            self.validator.after_eval(self.state.step, result, metrics)

    # ------------------------------------------------------------------ training
    def train(self) -> dict:
        """Epochs of optimizer steps until the last step or an early stop; an interrupt checkpoints the
        last step boundary, a failure closes the logs as failed."""
        acc = self.accelerator
        if self.cfg.eval.before_after and self.state.step == 0:
            self._eval_before()
        trackers = open_trackers(self.cfg, self.run_dir, resume=self.resume) if acc.is_main_process else []
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", append=self.resume, trackers=trackers)
        bar = step_bar(self.total_steps, self.state.step, enabled=acc.is_main_process)
        self.model.train()
        # fail before training if this model lets packed examples see each other
        if self.batches.pack_capacity:
            flat = self.cfg.model.attn_implementation == "flash_attention_2"
            verify_packing(acc.unwrap_model(self.model), flatten=flat)
        started = time.perf_counter() - self.state.elapsed
        self.checkpoints.mark(self.state)
        try:
            while not self._done():
                self._epoch(metrics, bar, started)
        except KeyboardInterrupt:
            bar.close()
            path = self._checkpoint(at_boundary=True)
            self._write_run_json("interrupted")
            metrics.close("interrupted")
            raise TrainingInterrupted(
                f"interrupted at step {self.state.step}; checkpoint saved to {path}. "
                f"Resume with: llamaforge train {self.run_dir / 'config.yaml'} --resume {self.run_dir}"
            ) from None
        except Exception:
            metrics.close("failed")  # trackers record the failure (a no-op after a divergence closed them)
            raise
        bar.close()
        return self._finish(metrics, time.perf_counter() - started)

    def _done(self) -> bool:
        return self.state.step >= self.total_steps or self.validator.stopped

    def _epoch(self, metrics, bar, started: float) -> None:
        """The current epoch's optimizer steps from its saved position; a finished epoch moves the
        position to the next one (and, with no `train.eval_every`, evaluates)."""
        acc, state, accum = self.accelerator, self.state, self.cfg.train.grad_accum
        batches = self.batches(state.epoch)
        usable = len(batches) // acc.num_processes * acc.num_processes or len(batches)
        mine = batches[acc.process_index : usable : acc.num_processes]
        groups = [mine[k : k + accum] for k in range(0, len(mine), accum)]
        if not groups:
            raise ConfigError(f"too few training batches for {acc.num_processes} processes")
        for g in range(state.group, len(groups)):
            step_started = time.perf_counter()
            record = self._step(groups[g], g)
            state.elapsed = time.perf_counter() - started
            self.signals.expected_step_s = time.perf_counter() - step_started
            record.update(
                step=state.step,
                epoch=state.epoch + (g + 1) / len(groups),
                tokens_per_s=state.tokens / state.elapsed,
            )
            self._after_step(record, metrics, bar)
            if self._done():
                return
        state.epoch, state.group = state.epoch + 1, 0
        if not self.cfg.train.eval_every and state.step < self.total_steps:
            self._eval_and_log(metrics)

    def _after_step(self, record: dict, metrics, bar) -> None:
        """The cadence after an optimizer step: divergence check, log, eval, checkpoint, stop request."""
        t, step = self.cfg.train, record["step"]
        diverged = self.validator.check(record)
        if diverged:
            bar.close()
            self._diverged(record, diverged, metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if step % t.log_every == 0 and self.accelerator.is_main_process:
            metrics.write(record)
        if t.eval_every and step % t.eval_every == 0:
            self._eval_and_log(metrics)
        if t.save_every and step % t.save_every == 0:
            self._checkpoint()
        if self.signals.stop_requested:
            raise KeyboardInterrupt

    def _eval_before(self) -> None:
        before = self.evaluate()
        self.summary.before = {**(before or {}), "answers": self.validator.sample_answers()}
        self._say_eval("before", before)

    def _finish(self, metrics, elapsed: float) -> dict:
        """The final eval, the weights to keep (the last or the best eval's), the summary."""
        final = self.evaluate()
        if final and self.accelerator.is_main_process:  # every process evaluates; one writes
            metrics.write({"step": self.state.step, **final})
        final, facts = self.validator.finish(final, self.state.step)
        self.summary.record(facts)
        metrics.close()
        self.summary.record(
            dict(
                steps=self.state.step,
                train_seconds=round(elapsed, 1),
                tokens_per_s=round(self.state.tokens / max(elapsed, 1e-9), 1),
                target_tokens_per_s=round(self.state.target_tokens / max(elapsed, 1e-9), 1),
                after={**(final or {}), "answers": self.validator.sample_answers()},
            )
        )
        self._say_eval("after", final)
        return self.summary.to_dict()

    def _say_eval(self, when: str, result: dict | None) -> None:
        if result:
            ppl = f" (ppl {result['eval_ppl']:.2f})" if "eval_ppl" in result else ""
            self._log(f"eval loss {when} training: {result['eval_loss']:.4f}{ppl}")

    def _diverged(self, record: dict, what: str, metrics) -> None:
        """Stop at the first non-finite step, leaving run.json "diverged" and the metrics so far."""
        step = record["step"]
        message = (
            f"training diverged at step {step}: {what} (lr {record['lr']:.3g}). "
            "Lower train.lr, keep train.max_grad_norm > 0 or raise train.warmup_ratio."
        )
        if self.accelerator.is_main_process:
            metrics.write({"step": step, "diverged": what, "lr": record["lr"]})
            warnings = list(self.state.watch.warnings)
            self.summary.record(dict(status="diverged", error=message, steps=step, warnings=warnings))
            (self.run_dir / "summary.json").write_text(json.dumps(self.summary.to_dict(), indent=2))
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
            self._write_run_json("diverged")
        metrics.close("diverged")
        raise TrainingDiverged(message)

    def _step(self, group: list[list[int]], index: int) -> dict:
        loss_total, global_targets = self.accumulate(group)
        cfg, acc = self.cfg, self.accelerator
        grad_norm = None
        if cfg.train.max_grad_norm > 0:  # DeepSpeed clips in its step: no norm yet
            grad_norm = self.amp.unscale_and_clip(
                self.optimizer, self.model.parameters(), cfg.train.max_grad_norm
            )
        with self.signals.update():  # a signal now waits for the weights to be whole
            self.amp.step(self.optimizer)  # fp16: skipped on an inf/nan gradient, the schedule goes on
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            self.state.group = index + 1
            self.checkpoints.mark(self.state)
        release_free_memory()  # train.release_memory: the step's freed activations go back
        summed = acc.reduce(torch.tensor(loss_total, device=acc.device), reduction="sum").item()
        return {
            "loss": summed / max(global_targets, 1),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "target_tokens": global_targets,
            **(self.objective.last_metrics if self.objective else {}),
        }

    def accumulate(self, group: list[list]) -> tuple[float, int]:
        """Forward/backward over the micro-batches of one optimizer step; returns (summed loss, target count).
        A micro-batch is a list of example indices (padded rows) or of bins of them (packed rows)."""
        # a preference step: (summed example loss, example count), rewards kept for the log
        if self.objective:
            return self.objective.accumulate(self.model, self.amp, self.data.train, group, self.state)
        micro = [self._collate(part) for part in self.micro_parts(group)]
        return accumulate_tokens(self.train_loss, self.amp, micro, self.state)

    def micro_parts(self, group: list[list]) -> list[list]:
        """What one optimizer step's micro-batches run as: each split past train.micro_batch_tokens."""
        cap = self.cfg.train.micro_batch_tokens
        return [part for idx in group for part in split_by_tokens(idx, self.batches.lengths, cap)]

    def _collate(self, idx: list) -> tuple[dict[str, torch.Tensor], int]:
        flat = self.cfg.model.attn_implementation == "flash_attention_2"  # varlen needs one flat row
        return collate_micro(self.data.train, idx, self.tokenizer.pad_token_id, flatten=flat)

    def _checkpoint(self, *, at_boundary: bool = False) -> Path | None:
        model = self.accelerator.unwrap_model(self.model)
        return self.checkpoints.save(
            self.state,
            model,
            self.optimizer,
            self.scheduler,
            wrapped=self.train_loss,
            at_boundary=at_boundary,
        )

    # ------------------------------------------------------------------ save / cleanup
    def save(self) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        weights = self.run_dir / weights_kind(self.cfg.method.name)
        state = gather_model_state(acc, self.train_loss, self.model)  # sharded weights whole on rank 0
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)
            self.tokenizer.chat_template = self.template.jinja  # plain transformers then renders the same way
            tmp = tmp_sibling(weights)  # written beside, renamed into place: never half an adapter
            try:
                model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
                self.tokenizer.save_pretrained(tmp)
                self.template.save(tmp)
                swap_into_place(tmp, weights)
            finally:
                remove_path(tmp)
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
            (self.run_dir / "summary.json").write_text(json.dumps(self.summary.to_dict(), indent=2))
            self._write_run_json("completed")
        return weights

    def _write_run_json(self, status: str) -> None:
        method = self.cfg.method.name
        Run(
            self.run_dir,
            self.cfg.model.source,
            method,
            weights_kind(method),
            template_name=self.template.name,
            dataset_sha256=self.data.card["sha256"],
            step=self.state.step,
            total_steps=self.total_steps,
        ).write_status(status)

    def cleanup(self) -> None:
        self.accelerator.end_training()
        # process-wide: give the next recipe (sweep, tests) the old one
        if hasattr(self, "_was_deterministic"):
            torch.use_deterministic_algorithms(self._was_deterministic)

    def _log(self, message: str) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(message)

    accelerator = None


def run_training(cfg: JobConfig, *, run_dir: Path | None = None, resume: bool = False) -> tuple[Path, dict]:
    recipe = FineTuneRecipe(cfg, run_dir=run_dir, resume=resume)
    recipe.setup()
    try:
        with recipe.signals.installed():
            summary = recipe.train()
        recipe.save()
    finally:
        recipe.cleanup()
    if cfg.eval.general and recipe.accelerator.is_main_process:  # what the tune cost: base vs tuned
        from llamaforge.evaluate.with_suites import after_training

        summary["general"] = after_training(cfg, recipe.run_dir)
    return recipe.run_dir, summary
