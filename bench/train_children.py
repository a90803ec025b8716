"""The variants of bench/train_throughput.py, each run by it in a process of its own (clean peak RSS):
llamaforge's recipe, HF Trainer + peft and TRL's SFTTrainer on the same tokenized data, every batch
they train on counted (all, real and target tokens, examples, the attention term of the FLOPs).

Not meant to be run by hand: the parent passes the variant, its work folder and the shared settings,
and reads back `<work>/<tag>.json`.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

IGNORE = -100
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}


# ---------------------------------------------------------------------- counting
class Counter:
    """Totals over the batches a variant trains on; lengths of the examples from masks or position ids."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.all = self.real = self.target = self.examples = self.n_sq = 0

    def add(self, batch: dict) -> None:
        ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
        self.all += ids.numel()
        self.target += int((labels[:, 1:] != IGNORE).sum())
        if batch.get("attention_mask") is not None:  # padded: one example per row
            lengths = batch["attention_mask"].sum(1).tolist()
        else:  # packed / padding-free: an example starts wherever the position id does not grow by 1
            lengths = []
            for row_ids, pos in zip(ids, batch["position_ids"].cpu()):
                starts = [0] + [k for k in range(1, len(pos)) if pos[k] != pos[k - 1] + 1] + [len(pos)]
                for a, b in zip(starts, starts[1:]):
                    if not bool((row_ids[a:b] == self.pad_id).all()):  # our padding is a block of its own
                        lengths.append(b - a)
        self.real += int(sum(lengths))
        self.examples += len(lengths)
        self.n_sq += int(sum(n * (n + 1) for n in lengths))

    def result(self) -> dict:
        return {
            "all_tokens": self.all,
            "real_tokens": self.real,
            "target_tokens": self.target,
            "examples": self.examples,
            "sum_n_n1": self.n_sq,
        }


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lora_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def llamaforge_config(a, work: Path, tag: str, packing: bool, extra: tuple[str, ...] = ()):
    """The llamaforge variant's job: its defaults plus the shared settings, then `extra` overrides
    (bench/step_ceiling.py and bench/profile_step.py read the same job)."""
    from llamaforge.config import load_config

    if a.llamaforge_batch_size == "auto":  # its default: the planner picks the micro-batch
        batching = ["train.batch_size=auto", f"train.effective_batch_size={a.batch_size}"]
    else:
        micro = int(a.llamaforge_batch_size)
        batching = [f"train.batch_size={micro}", f"train.grad_accum={a.batch_size // micro}"]
    return load_config(
        None,
        batching
        + [
            f"model.source={a.model}",
            f"data.sources=[{{path: {work / 'train_messages.jsonl'}, format: messages}}]",
            "data.val_size=0",
            f"data.max_length={a.data_max_length}",
            "data.template=auto",
            "method.name=lora",
            f"method.rank={LORA['r']}",
            f"method.alpha={LORA['lora_alpha']}",
            f"method.dropout={LORA['lora_dropout']}",
            "method.targets=all-linear",
            f"train.max_steps={a.steps}",
            f"train.lr={a.lr}",
            "train.scheduler=cosine",
            "train.warmup_ratio=0.05",
            "train.weight_decay=0",
            "train.max_grad_norm=1.0",
            f"train.packing={str(packing).lower()}",
            f"train.pack_length={a.pack_length}",
            f"train.precision={a.precision}",
            "eval.before_after=false",
            "eval.prompts=[]",
            f"output.dir={work}",
            f"output.name={tag}",
            "output.overwrite=true",
            f"train.seed={a.seed}",
            *extra,
        ],
    )


def child_llamaforge(a, work: Path, tag: str, packing: bool) -> dict:
    from llamaforge.train.recipe import FineTuneRecipe

    recipe = FineTuneRecipe(llamaforge_config(a, work, tag, packing))
    recipe.setup()
    counter = Counter(recipe.tokenizer.pad_token_id)
    collate = recipe._collate

    def counting(idx):
        batch, real = collate(idx)
        counter.add(batch)
        return batch, real

    recipe._collate = counting
    summary = recipe.train()
    adapter = recipe.save()
    recipe.cleanup()
    rows = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    micro, accum = recipe.summary.micro_batch, recipe.summary.grad_accum
    shape = f"{a.batch_size} packed rows of {a.pack_length}" if packing else "length-grouped padding"
    return {
        **counter.result(),
        "train_seconds": summary["train_seconds"],
        "adapter": str(adapter),
        "losses": [r["loss"] for r in rows if "loss" in r],
        "trainable_params": summary["trainable_params"],
        "gradient_checkpointing": bool(recipe.summary.gradient_checkpointing),
        "config": f"{shape}, micro-batch {micro} x {accum} accumulated",
    }


def _hf_model(a):
    from peft import LoraConfig, get_peft_model

    from llamaforge.models import load_model

    model, tokenizer = load_model(a.model)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA)), tokenizer


def _run_trainer(trainer, counter: Counter, work: Path, tag: str) -> dict:
    compute_loss = trainer.compute_loss

    def counting(model, inputs, *args, **kwargs):
        counter.add(inputs)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting
    out = trainer.train()
    adapter = work / tag / "adapter"
    trainer.model.save_pretrained(adapter)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    checkpointing = bool(
        getattr(trainer.args, "activation_checkpointing", None) or trainer.args.gradient_checkpointing
    )
    return {
        **counter.result(),
        "train_seconds": out.metrics["train_runtime"],
        "adapter": str(adapter),
        "losses": losses,
        "trainable_params": _lora_params(trainer.model),
        "gradient_checkpointing": checkpointing,
    }


def _common_args(a, work: Path, tag: str, group_by_length: bool = False) -> dict:
    import inspect

    from transformers import TrainingArguments

    args = dict(
        output_dir=str(work / tag),
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        warmup_steps=int(0.05 * a.steps),
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=a.precision == "bf16",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=a.seed,
    )
    # checkpointing off for the peers, said explicitly: TRL's SFTConfig defaults it to on (llamaforge: its auto)
    params = inspect.signature(TrainingArguments).parameters
    args["activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing"] = (
        False
    )
    if group_by_length:  # transformers 5 renamed the flag
        if "group_by_length" in params:
            args["group_by_length"] = True
        else:
            args["train_sampling_strategy"] = "group_by_length"
    return args


def child_hf(a, work: Path, tag: str, max_length_padding: bool) -> dict:
    """max_length_padding: the tutorial way, every example padded to --hf-max-length, no grouping.
    Else the fair way: examples as they are, padded per batch, batches grouped by length."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, default_data_collator

    model, tokenizer = _hf_model(a)
    pad, n = tokenizer.pad_token_id, a.hf_max_length
    data = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in _rows(work / "train.jsonl"):
        ids, labels = r["input_ids"], r["labels"]
        if max_length_padding:
            ids, labels = ids[:n], labels[:n]
            data["input_ids"].append(ids + [pad] * (n - len(ids)))
            data["attention_mask"].append([1] * len(ids) + [0] * (n - len(ids)))
            data["labels"].append(labels + [IGNORE] * (n - len(ids)))
        else:
            data["input_ids"].append(ids)
            data["attention_mask"].append([1] * len(ids))
            data["labels"].append(labels)
    if max_length_padding:
        collator, config = default_data_collator, f"padding=max_length {n}, batch {a.batch_size}"
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
        config = f"DataCollatorForSeq2Seq, group_by_length, batch {a.batch_size}"
    args = TrainingArguments(**_common_args(a, work, tag, group_by_length=not max_length_padding))
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(data), data_collator=collator)
    torch.manual_seed(a.seed)
    return {**_run_trainer(trainer, Counter(pad), work, tag), "config": config}


def child_trl(a, work: Path, tag: str, packing: bool) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _hf_model(a)
    rows = _rows(work / "train.jsonl")
    data = Dataset.from_dict(
        {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}
    )
    args = SFTConfig(
        **_common_args(a, work, tag),
        packing=packing,
        padding_free=not packing,
        max_length=a.pack_length if packing else None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    config = f"packing bfd {a.pack_length}" if packing else "padding_free"
    return {
        **_run_trainer(trainer, Counter(tokenizer.pad_token_id), work, tag),
        "config": f"{config}, batch {a.batch_size}",
    }


CHILDREN = {
    "llamaforge": lambda a, w, t: child_llamaforge(a, w, t, packing=False),
    "llamaforge_packed": lambda a, w, t: child_llamaforge(a, w, t, packing=True),
    "hf": lambda a, w, t: child_hf(a, w, t, max_length_padding=False),
    "hf_max_length": lambda a, w, t: child_hf(a, w, t, max_length_padding=True),
    "trl_padding_free": lambda a, w, t: child_trl(a, w, t, packing=False),
    "trl_packing": lambda a, w, t: child_trl(a, w, t, packing=True),
}


def preload_like_the_cli(a, work: Path) -> None:
    """A llamaforge variant runs on the allocator `llamaforge train` would choose for its job
    (train.allocator, default auto: jemalloc where installed): the CLI's own preload_allocator, which
    re-executes this child once with the library preloaded. The peers keep the system allocator, their
    documented configuration."""
    if a.child.startswith("llamaforge"):
        from llamaforge.hardware import preload_allocator

        cfg = llamaforge_config(a, work, a.tag, packing=a.child == "llamaforge_packed")
        print(preload_allocator(cfg.train.allocator), flush=True)


def child_main(a) -> None:
    from llamaforge.hardware import running_allocator

    work = Path(a.work)
    preload_like_the_cli(a, work)
    started = time.perf_counter()
    result = CHILDREN[a.child](a, work, a.tag)
    result.update(
        wall_seconds=time.perf_counter() - started,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        allocator=running_allocator(),
    )
    (work / f"{a.tag}.json").write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description="one variant of bench/train_throughput.py (run by it)")
    p.add_argument("--child", required=True, choices=sorted(CHILDREN))
    p.add_argument("--tag", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--precision", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--llamaforge-batch-size", required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--pack-length", type=int, required=True)
    p.add_argument("--hf-max-length", type=int, required=True)
    p.add_argument("--data-max-length", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    child_main(p.parse_args())


if __name__ == "__main__":
    main()
