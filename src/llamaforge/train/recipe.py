"""The fine-tuning recipe: setup -> train -> save -> cleanup, on accelerate.

A lean loop rather than HF Trainer so that loss normalisation (summed token loss over the target
tokens of the whole optimizer step), chunked loss and exact resume stay in our hands.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch

from llamaforge.atomic import (
    check_not_input,
    check_replaceable,
    remove_path,
    swap_into_place,
    tmp_sibling,
    write_marker,
)
from llamaforge.config import JobConfig, to_yaml
from llamaforge.data.types import Message
from llamaforge.device import default_device, resolve_precision
from llamaforge.dtypes import torch_dtype
from llamaforge.errors import ConfigError, LlamaforgeError
from llamaforge.hardware import release_free_memory
from llamaforge.losses import held_out_loss, num_targets
from llamaforge.runs import Run, weights_kind, write_val_conversations
from llamaforge.train.adapters import attach_method, count_parameters
from llamaforge.train.batching import collate_micro, length_grouped_batches
from llamaforge.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_rank_rng,
)
from llamaforge.train.knobs import build_optimizer, check_optimizer, seed_everything
from llamaforge.train.monitor import TrainingDiverged, ValidationWatch  # noqa: F401 - re-exported
from llamaforge.train.packing import packed_batches, verify_packing
from llamaforge.train.signals import StopSignals
from llamaforge.train.tracking import MetricsLog, check_trackers, open_trackers, plot_losses

log = logging.getLogger(__name__)


class TrainingInterrupted(LlamaforgeError):
    pass


def run_name(cfg: JobConfig) -> str:
    if cfg.output.name:
        return cfg.output.name
    stem = Path(cfg.model.source.rstrip("/")).name.removesuffix(".gguf")
    return f"{stem}-{cfg.method.name}-{datetime.now():%Y%m%d-%H%M%S}"


def run_inputs(cfg: JobConfig) -> list[str]:
    """What a run reads from disk (data, a local model): its folder may be none of them, nor hold one."""
    sources = [*cfg.data.sources, *cfg.data.val_sources]
    return [s.path for s in sources] + [cfg.model.source]


def check_launch(accelerator) -> None:
    """Refuse a multi-process launch that accelerate did not join: each process would train alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes != world:
        raise ConfigError(
            f"launched with WORLD_SIZE={world} but accelerate joined {accelerator.num_processes} process(es): "
            "the processes would train unsynchronised copies. On CPU launch with "
            "`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m llamaforge.cli train ...`."
        )


class FineTuneRecipe(ValidationWatch):
    def __init__(self, cfg: JobConfig, *, run_dir: Path | None = None, resume: bool = False):
        # A copy: auto batch sizing writes the resolved micro-batch into it, never into the caller's.
        self.cfg, self.resume = cfg.model_copy(deep=True), resume
        self.run_dir = run_dir or Path(cfg.output.dir) / run_name(cfg)
        self.summary: dict = {}
        self.signals = StopSignals()
        self._boundary: tuple[dict, dict] | None = None  # (progress, RNG) at the last step boundary

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        from llamaforge.hardware import configure_allocator, configure_threads
        from llamaforge.models import load_model, warn_if_chat_tokens_untrained
        from llamaforge.templates import get_template
        from llamaforge.train.data import prepare_data, write_rejects

        cfg = self.cfg
        device = default_device()
        threads = configure_threads() if device.type == "cpu" else None
        allocator = configure_allocator(cfg.train.release_memory)
        check_optimizer(cfg.train.optimizer, device)
        check_trackers(cfg.train.trackers)
        self._was_deterministic = seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.precision = resolve_precision(cfg.train.precision, device)
        # accelerate keeps one process-wide state; a second recipe in the same process (tests, sweeps)
        # with another precision must start from a clean one. The distributed state is kept.
        AcceleratorState._reset_state()
        self.accelerator = Accelerator(
            mixed_precision={"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[self.precision],
            cpu=device.type == "cpu",
        )
        check_launch(self.accelerator)
        self._prepare_run_dir_once()
        dtype = torch_dtype(cfg.model.dtype)
        model, self.tokenizer = load_model(
            cfg.model.source,
            dtype=dtype,
            quantization=cfg.quantization,
            quantization_backend=cfg.model.quantization_backend,
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
        )
        self.template = get_template(cfg.data.template, self.tokenizer)
        warn_if_chat_tokens_untrained(model, self.tokenizer, self.template)
        from llamaforge.train.objective import objective_for

        self.objective = objective_for(cfg, self.tokenizer.pad_token_id)  # None: plain SFT
        self.data = (
            self.objective.prepare(cfg.data, self.template)
            if self.objective
            else prepare_data(cfg.data, self.template)
        )
        write_rejects(self.run_dir / "rejects.jsonl", self.data.rejects)
        write_val_conversations(self.run_dir, self.data.val_conversations)
        (self.run_dir / "data_card.json").write_text(json.dumps(self.data.card, indent=2))
        self._log(
            f"data: {self.data.card['train_records']} train / {self.data.card['val_records']} val records, "
            f"{self.data.card['rejected']} rejected, {self.data.card['train_target_tokens']} target tokens"
        )

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
        self.summary.update(
            trainable_params=trainable,
            total_params=total,
            precision=self.precision,
            threads=threads,
            micro_batch=cfg.train.batch_size,
            grad_accum=cfg.train.grad_accum,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
        )

        world = self.accelerator.num_processes
        batches = len(self._epoch_batches(0)) // world or 1
        self.steps_per_epoch = max(1, math.ceil(batches / cfg.train.grad_accum))
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * self.steps_per_epoch))
        self.optimizer = self._optimizer()
        from transformers import get_scheduler

        warmup = int(cfg.train.warmup_ratio * self.total_steps)
        self.scheduler = get_scheduler(
            {"constant": "constant_with_warmup"}.get(cfg.train.scheduler, cfg.train.scheduler),
            self.optimizer,
            num_warmup_steps=warmup,
            num_training_steps=self.total_steps,
        )
        from llamaforge.train.distributed import TokenLoss

        # DDP syncs (FSDP/ZeRO-3 gather) only inside the forward of what it wraps, and our chunked loss
        # bypasses the model's forward: the wrapped module is the loss; self.model stays the plain model.
        self.train_loss, self.optimizer = self.accelerator.prepare(
            TokenLoss(self.model, cfg.train.loss_chunk_size), self.optimizer
        )
        self.progress = {"step": 0, "epoch": 0, "group": 0, "tokens": 0, "target_tokens": 0, "elapsed": 0.0}
        if self.resume:
            self._restore()
        self._write_run_json("running")

    def _resolve_batch(self, model, device) -> None:
        """`batch_size: auto` / `gradient_checkpointing: auto`: the planner's choice for this data on this
        machine (planning/autobatch.py), written into the run's config.yaml so a resume replays it."""
        t, world = self.cfg.train, self.accelerator.num_processes
        if (
            self.resume
            and (self.run_dir / "config.yaml").is_file()
            and "auto" in (t.batch_size, t.gradient_checkpointing)
        ):
            from llamaforge.config import load_config

            saved = load_config(str(self.run_dir / "config.yaml")).train
            t.batch_size, t.grad_accum = saved.batch_size, saved.grad_accum
            t.gradient_checkpointing = saved.gradient_checkpointing
        if t.batch_size != "auto":
            if t.gradient_checkpointing == "auto":
                t.gradient_checkpointing = False
            return
        from llamaforge.planning.autobatch import choose_batch
        from llamaforge.planning.dry_run import batch_planning_inputs

        effective = t.target_effective_batch()
        if effective % world:
            raise ConfigError(f"train.effective_batch_size={effective} does not split over {world} processes")
        arch, setup, budget, resident, mean_tokens = batch_planning_inputs(
            self.cfg, model, device, self.precision, self.data.train["length"]
        )
        choice = choose_batch(
            arch,
            setup,
            per_device_batch=effective // world,
            budget_bytes=budget,
            mean_tokens=mean_tokens,
            already_resident=resident,
            checkpointing=None if t.gradient_checkpointing == "auto" else t.gradient_checkpointing,
        )
        t.batch_size, t.grad_accum = choice.micro_batch, choice.grad_accum
        t.gradient_checkpointing = choice.checkpointing
        t.effective_batch_size = effective
        self._log(choice.line())
        if not choice.fits:
            log.warning("batch: %s", choice.reason)
        self.summary["batch_choice"] = {
            "micro_batch": choice.micro_batch,
            "grad_accum": choice.grad_accum,
            "gradient_checkpointing": choice.checkpointing,
            "planned_peak_gib": round(choice.peak_bytes / 2**30, 2),
            "budget_gib": round(choice.budget_bytes / 2**30, 2),
            "reason": choice.reason,
        }
        if self.accelerator.is_main_process:
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))

    def _prepare_run_dir_once(self) -> None:
        """Every process of a launch uses the main one's run directory, made (or wiped) once, before
        any of them writes into it."""
        acc = self.accelerator
        if acc.num_processes > 1 and not self.cfg.output.name:  # timestamped names may differ by a second
            from accelerate.utils import broadcast_object_list

            self.run_dir = Path(broadcast_object_list([str(self.run_dir)])[0])
        if acc.is_main_process:
            self._prepare_run_dir()
        acc.wait_for_everyone()

    def _prepare_run_dir(self) -> None:
        run = self.run_dir
        if run.exists() and not self.resume:
            check_not_input(run, run_inputs(self.cfg), "run directory")
            check_replaceable(
                run,
                overwrite=self.cfg.output.overwrite,
                what="run directory",
                hint=": use --resume, output.overwrite=true or another output.name",
            )
            shutil.rmtree(run)  # a run folder llamaforge made (it carries the marker)
        run.mkdir(parents=True, exist_ok=True)
        write_marker(run, "run")
        (run / "config.yaml").write_text(to_yaml(self.cfg))

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        return build_optimizer(self.model, t.optimizer, t.lr, t.weight_decay)

    def _restore(self) -> None:
        checkpoints = list_checkpoints(self.run_dir / "checkpoints")
        if not checkpoints:
            raise ConfigError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        self.progress = load_checkpoint(
            checkpoints[-1],
            self.accelerator.unwrap_model(self.model),
            self.optimizer,
            self.scheduler,
            rank=self.accelerator.process_index,
        )
        self._log(f"resumed from {checkpoints[-1].name} (step {self.progress['step']})")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Token-weighted loss over the validation set, with the training masks."""
        if self.objective:
            return (
                self.objective.evaluate(
                    self.model, self.data.val, self.cfg.train.batch_size * 2, self.accelerator.autocast
                )
                if self.data.val
                else None
            )
        if self.data.val is None:
            return None
        self.model.eval()
        held = held_out_loss(
            self.model,
            self.data.val,
            self.tokenizer.pad_token_id,
            batch_size=self.cfg.train.batch_size * 2,
            chunk_size=self.cfg.train.loss_chunk_size,
            autocast=self.accelerator.autocast,
        )
        release_free_memory()
        self.model.train()
        return {
            "eval_loss": held.loss,
            "eval_ppl": held.perplexity,
            "eval_tokens": held.tokens,
            **self._generation_metrics(),
        }

    def sample_answers(self) -> dict[str, str]:
        from llamaforge.generation import generate

        prompts = self.cfg.eval.prompts
        if not prompts:
            return {}
        system = self.cfg.data.system_prompt
        convs = [([Message("system", system)] if system else []) + [Message("user", p)] for p in prompts]
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        answers = generate(
            model,
            self.tokenizer,
            self.template,
            convs,
            max_new_tokens=self.cfg.eval.max_new_tokens,
            precision=self.precision,
        )
        release_free_memory()
        model.train()
        return dict(zip(prompts, answers))

    # ------------------------------------------------------------------ training
    def train(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        if cfg.eval.before_after and self.progress["step"] == 0:
            before = self.evaluate()
            self.summary["before"] = {**(before or {}), "answers": self.sample_answers()}
            if before:
                ppl = f" (ppl {before['eval_ppl']:.2f})" if "eval_ppl" in before else ""
                self._log(f"eval loss before training: {before['eval_loss']:.4f}{ppl}")
        trackers = open_trackers(cfg, self.run_dir, resume=self.resume) if acc.is_main_process else []
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", append=self.resume, trackers=trackers)
        self.monitor = self._new_monitor()
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.total_steps,
            initial=self.progress["step"],
            desc="train",
            unit="step",
            disable=not acc.is_main_process,
            dynamic_ncols=True,
        )
        self.model.train()
        if self._packed():  # fail before training if this model lets packed examples see each other
            verify_packing(
                acc.unwrap_model(self.model), flatten=cfg.model.attn_implementation == "flash_attention_2"
            )
        started = time.perf_counter() - self.progress["elapsed"]
        self._mark_boundary()
        try:
            while self.progress["step"] < self.total_steps and self.monitor.stopped_at is None:
                epoch = self.progress["epoch"]
                batches = self._epoch_batches(epoch)
                usable = len(batches) // acc.num_processes * acc.num_processes or len(batches)
                mine = batches[acc.process_index : usable : acc.num_processes]
                groups = [
                    mine[k : k + cfg.train.grad_accum] for k in range(0, len(mine), cfg.train.grad_accum)
                ]
                if not groups:
                    raise ConfigError(f"too few training batches for {acc.num_processes} processes")
                for g in range(self.progress["group"], len(groups)):
                    step_started = time.perf_counter()
                    record = self._step(groups[g], g)
                    self.progress.update(elapsed=time.perf_counter() - started)
                    self.signals.expected_step_s = time.perf_counter() - step_started
                    step = self.progress["step"]
                    record.update(
                        step=step,
                        epoch=epoch + (g + 1) / len(groups),
                        tokens_per_s=self.progress["tokens"] / self.progress["elapsed"],
                    )
                    self._check_finite(record, metrics, bar)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    if step % cfg.train.log_every == 0 and acc.is_main_process:
                        metrics.write(record)
                    if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                        self._eval_and_log(metrics, step)
                    if cfg.train.save_every and step % cfg.train.save_every == 0:
                        self._checkpoint()
                    if self.signals.stop_requested:
                        raise KeyboardInterrupt
                    if step >= self.total_steps or self.monitor.stopped_at is not None:
                        break
                else:
                    self.progress.update(epoch=epoch + 1, group=0)
                    if not cfg.train.eval_every and self.progress["step"] < self.total_steps:
                        self._eval_and_log(metrics, self.progress["step"])
        except KeyboardInterrupt:
            bar.close()
            path = self._checkpoint(at_boundary=True)
            self._write_run_json("interrupted")
            metrics.close("interrupted")
            raise TrainingInterrupted(
                f"interrupted at step {self.progress['step']}; checkpoint saved to {path}. "
                f"Resume with: llamaforge train {self.run_dir / 'config.yaml'} --resume {self.run_dir}"
            ) from None
        except Exception:
            metrics.close("failed")  # trackers record the failure (a no-op after a divergence closed them)
            raise
        bar.close()
        elapsed = time.perf_counter() - started
        final = self.evaluate()
        if final:
            metrics.write({"step": self.progress["step"], **final})
        final = self._finish_best(final)
        metrics.close()
        self.summary.update(
            steps=self.progress["step"],
            train_seconds=round(elapsed, 1),
            tokens_per_s=round(self.progress["tokens"] / max(elapsed, 1e-9), 1),
            target_tokens_per_s=round(self.progress["target_tokens"] / max(elapsed, 1e-9), 1),
            after={**(final or {}), "answers": self.sample_answers()},
        )
        if final:
            ppl = f" (ppl {final['eval_ppl']:.2f})" if "eval_ppl" in final else ""
            self._log(f"eval loss after training: {final['eval_loss']:.4f}{ppl}")
        return self.summary

    def _step(self, group: list[list[int]], index: int) -> dict:
        loss_total, global_targets = self.accumulate(group)
        cfg, acc = self.cfg, self.accelerator
        grad_norm = None
        if cfg.train.max_grad_norm > 0:
            grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm))
        with self.signals.update():  # a signal now waits for the weights to be whole
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.progress["step"] += 1
            self.progress["group"] = index + 1
            self._mark_boundary()
        release_free_memory()  # train.release_memory: the step's freed activations go back
        loss = acc.reduce(torch.tensor(loss_total, device=acc.device), reduction="sum").item() / max(
            global_targets, 1
        )
        return {
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "target_tokens": global_targets,
            **(self.objective.last_metrics if self.objective else {}),
        }

    def _packed(self) -> bool:
        if self.cfg.train.packing and self.cfg.method.name == "prefix":
            raise ConfigError(
                "train.packing does not work with method prefix: its virtual tokens come through "
                "the cache, which turns off the per-example attention of packed rows"
            )
        return self.cfg.train.packing

    def _epoch_batches(self, epoch: int) -> list[list]:
        """This epoch's micro-batches, deterministic in (seed, epoch) so a resumed run replays them.

        Padded: lists of example indices (length-grouped). Packed: lists of bins of example indices.
        """
        t, first = self.cfg.train, not hasattr(self, "_lengths")
        if first:
            self._lengths = list(self.data.train["length"])
        if not self._packed():
            return length_grouped_batches(self._lengths, t.batch_size, seed=t.seed, epoch=epoch)
        capacity = t.pack_length or self.cfg.data.max_length
        micro = packed_batches(self._lengths, t.batch_size, capacity, seed=t.seed, epoch=epoch)
        if first:
            rows = sum(len(m) for m in micro)
            self._log(
                f"packing: {len(self._lengths)} examples into {rows} rows of <= {capacity} tokens "
                f"({sum(self._lengths) / (rows * capacity):.0%} full), {len(micro)} micro-batches an epoch"
            )
        return micro

    def _collate(self, idx: list) -> tuple[dict[str, torch.Tensor], int]:
        flat = self.cfg.model.attn_implementation == "flash_attention_2"  # varlen needs one flat row
        return collate_micro(self.data.train, idx, self.tokenizer.pad_token_id, flatten=flat)

    def accumulate(self, group: list[list]) -> tuple[float, int]:
        """Forward/backward over the micro-batches of one optimizer step; returns (summed loss, target count).

        Each micro-batch's summed token loss is divided by the target count of the whole step (all
        micro-batches, all processes), so the gradient is that of the mean over every target token.
        A micro-batch is a list of example indices (padded rows) or of bins of them (packed rows).
        """
        acc = self.accelerator
        if (
            self.objective
        ):  # a preference step: (summed example loss, example count), rewards kept for the log
            return self.objective.accumulate(self.model, acc, self.data.train, group, self.progress)
        micro = [self._collate(idx) for idx in group]
        local_targets = sum(num_targets(b) for b, _ in micro)
        global_targets = int(
            acc.reduce(torch.tensor(local_targets, device=acc.device), reduction="sum").item()
        )
        loss_total = 0.0
        for j, (batch, real_tokens) in enumerate(micro):
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            sync = j == len(micro) - 1
            with nullcontext() if sync else acc.no_sync(self.train_loss), acc.autocast():
                loss_sum = self.train_loss(batch)  # through the DDP/FSDP wrapper (train/distributed.py)
                # DDP averages gradients over processes; scaling by world size makes the result the
                # sum over all target tokens divided by their global count.
                acc.backward(loss_sum * acc.num_processes / max(global_targets, 1))
            loss_total += loss_sum.item()
            self.progress["tokens"] += real_tokens
        self.progress["target_tokens"] += local_targets
        return loss_total, global_targets

    def _mark_boundary(self) -> None:
        """Remember progress and RNG at a step boundary: an interrupt mid-step saves these, so a resume
        replays the interrupted step exactly (weights and optimizer only change at the boundary)."""
        self._boundary = (copy.deepcopy(self.progress), rng_state())

    def _checkpoint(self, *, at_boundary: bool = False) -> Path | None:
        """Every process saves its RNG (rank 0 in the checkpoint, the others beside it); rank 0 the rest.
        `at_boundary`: the progress and RNG of the last step boundary (after an interrupt mid-step)."""
        acc, root = self.accelerator, self.run_dir / "checkpoints"
        progress, rng = self._boundary if at_boundary and self._boundary else (self.progress, None)
        progress = copy.deepcopy(progress)
        if not acc.is_main_process:
            save_rank_rng(root, progress["step"], acc.process_index, rng)
            return None
        if self.monitor is not None:
            progress["monitor"] = self.monitor.state_dict()
        return save_checkpoint(
            root,
            progress["step"],
            acc.unwrap_model(self.model),
            self.optimizer,
            self.scheduler,
            progress,
            self.cfg.train.keep_checkpoints,
            rng=rng,
        )

    # ------------------------------------------------------------------ save / cleanup
    def save(self) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        weights = self.run_dir / weights_kind(self.cfg.method.name)
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)
            self.tokenizer.chat_template = self.template.jinja  # plain transformers then renders the same way
            tmp = tmp_sibling(weights)  # written beside, renamed into place: never half an adapter
            try:
                model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                self.template.save(tmp)
                swap_into_place(tmp, weights)
            finally:
                remove_path(tmp)
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
            (self.run_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
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
            step=self.progress["step"],
            total_steps=self.total_steps,
        ).write_status(status)

    def cleanup(self) -> None:
        self.accelerator.end_training()
        if hasattr(
            self, "_was_deterministic"
        ):  # process-wide: give the next recipe (sweep, tests) the old one
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
