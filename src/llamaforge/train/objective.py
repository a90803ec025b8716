"""The recipe's hook for `method.objective: dpo | kto | orpo`: the data, the reference, each optimizer
step's loss and rewards, and the validation measure, so the SFT loop runs preference training unchanged
(same batching, optimizer, schedule, checkpoints, signals and monitor).

The step's loss is the mean over its examples (pairs for DPO/ORPO, completions for KTO), as in TRL;
`accumulate` returns (summed loss, example count) so the recipe's division gives that mean across
micro-batches. The reward columns of metrics.jsonl are means over the step's examples.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamaforge.data.types import Conversation
from llamaforge.errors import ConfigError
from llamaforge.templates import IGNORE_INDEX
from llamaforge.train import preference as pref
from llamaforge.train.amp import MixedPrecision
from llamaforge.train.preference_data import answer_conversation, prepare_preferences
from llamaforge.train.state import TrainState

REFERENCE_FILE = "reference_logps.pt"


@dataclass
class PreferenceData:
    """What the recipe reads of PreparedData: train rows with a `length` column, val rows, card, rejects."""

    train: Any  # datasets.Dataset
    val: list[dict]
    card: dict
    rejects: list = field(default_factory=list)
    val_conversations: list[Conversation] = field(default_factory=list)


class PreferenceObjective:
    def __init__(self, method_cfg, train_cfg, pad_id: int):
        self.objective, self.beta = method_cfg.objective, method_cfg.beta
        self.precompute = method_cfg.precompute_reference
        self.weights = (method_cfg.desirable_weight, method_cfg.undesirable_weight)
        self.chunk_size, self.pad_id = train_cfg.loss_chunk_size, pad_id
        if train_cfg.packing:
            raise ConfigError(
                "train.packing does not apply to preference objectives: a pair's two answers "
                "are scored as separate sequences (set train.packing: false)"
            )
        self.last_metrics: dict[str, float] = {}

    @property
    def kind(self) -> str:
        return "binary" if self.objective == "kto" else "pairs"

    # ------------------------------------------------------------------ data
    def prepare(self, data_cfg, template) -> PreferenceData:
        from datasets import Dataset

        prepared = prepare_preferences(data_cfg, self.kind, template)
        for row in prepared.train:  # tokens a step processes per example, for length grouping and planning
            row["length"] = sum(len(row[k]) for k in row if k.endswith("input_ids"))
        convs = [answer_conversation(e) for e in prepared.val_examples]
        labelled = sum(
            t != IGNORE_INDEX for r in prepared.train for k in r if k.endswith("labels") for t in r[k]
        )
        card = {**prepared.card, "train_target_tokens": labelled}
        return PreferenceData(Dataset.from_list(prepared.train), prepared.val, card, prepared.rejects, convs)

    # ------------------------------------------------------------------ reference
    def start(self, model, data: PreferenceData, accelerator, run_dir: Path, resume: bool) -> None:
        """Before the first step: refuse what cannot work, and compute (or reload) the reference log-probs."""
        if accelerator.num_processes > 1:
            raise ConfigError(
                "preference objectives run on one process for now: their loss calls the model "
                "outside the DDP/FSDP wrapper, which would leave gradients unsynchronised"
            )
        if self.objective == "orpo":
            return
        if not self.precompute:
            if not hasattr(model, "disable_adapter"):
                raise ConfigError(
                    f"method.objective={self.objective} with a method that trains the base weights "
                    "needs method.precompute_reference: true (there is no adapter to disable)"
                )
            return
        path = run_dir / REFERENCE_FILE
        splits = {"train": [dict(r) for r in data.train], "val": data.val}
        if resume and path.is_file():  # the values of the first start, not recomputed
            saved = torch.load(path)
            for split, rows in splits.items():
                for key, values in saved[split].items():
                    for row, value in zip(rows, values):
                        row[key] = value
        else:  # before any step (and before a resume restores the weights), the model is the base
            for rows in splits.values():
                if rows:
                    pref.attach_reference(
                        model, rows, self.objective, self.pad_id, chunk_size=self.chunk_size
                    )
            torch.save(
                {
                    split: {k: [r[k] for r in rows] for k in (rows[0] if rows else {}) if k.startswith("ref")}
                    for split, rows in splits.items()
                },
                path,
            )
        from datasets import Dataset

        data.train = Dataset.from_list(splits["train"])

    # ------------------------------------------------------------------ training and validation
    def _loss(self, model, rows: list[dict]) -> pref.PreferenceLoss:
        return pref.objective_loss(
            model,
            rows,
            self.objective,
            self.pad_id,
            beta=self.beta,
            desirable_weight=self.weights[0],
            undesirable_weight=self.weights[1],
            chunk_size=self.chunk_size,
        )

    def accumulate(
        self, model, amp: MixedPrecision, dataset, group: list[list[int]], state: TrainState
    ) -> tuple[float, int]:
        """Forward/backward over the micro-batches of one step; (summed example loss, example count)."""
        micro = [[dataset[i] for i in idx] for idx in group]
        total = sum(len(rows) for rows in micro)
        loss_total, chosen, rejected = 0.0, [], []
        for rows in micro:
            with amp.autocast():
                result = self._loss(model, rows)
                amp.backward(result.loss * len(rows) / total)
            loss_total += float(result.loss.detach()) * len(rows)
            chosen.append(result.chosen_rewards)
            rejected.append(result.rejected_rewards)
            state.tokens += sum(r["length"] for r in rows)
        self.last_metrics = pref.preference_metrics(
            pref.PreferenceLoss(torch.zeros(()), torch.cat(chosen), torch.cat(rejected))
        )
        return loss_total, total

    @torch.no_grad()
    def evaluate(self, model, val: list[dict], batch_size: int, autocast=nullcontext) -> dict[str, float]:
        """The objective's loss on the validation examples (same measure as the training loss, so the
        monitor's overfitting check compares like with like) and their rewards, prefixed eval_."""
        model.eval()
        loss, chosen, rejected = 0.0, [], []
        for start in range(0, len(val), batch_size):
            rows = val[start : start + batch_size]
            with autocast():
                result = self._loss(model, rows)
            loss += float(result.loss) * len(rows)
            chosen.append(result.chosen_rewards)
            rejected.append(result.rejected_rewards)
        model.train()
        metrics = pref.preference_metrics(
            pref.PreferenceLoss(torch.zeros(()), torch.cat(chosen), torch.cat(rejected))
        )
        return {"eval_loss": loss / len(val), **{f"eval_{k}": v for k, v in metrics.items()}}


def objective_for(cfg, pad_id: int) -> PreferenceObjective | None:
    """None for plain SFT; the preference hook otherwise."""
    if cfg.method.objective == "sft":
        return None
    return PreferenceObjective(cfg.method, cfg.train, pad_id)
