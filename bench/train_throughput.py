"""Training throughput: llamaforge (packed) vs HF Trainer + peft (padded to 512) vs TRL SFTTrainer.

Same model (default smollm2-135m-instruct), same data (the 999-example alpaca demo with the model's
own chat template, tokenized once by llamaforge so every variant trains on the same ids and the same
assistant-only labels), LoRA r=8 alpha=16 dropout 0.05 all-linear, bf16 autocast over fp32 weights, the
same batch size (rows per step), steps, lr schedule and clipping; gradient checkpointing off. Each
variant runs in its own subprocess (clean peak RSS); the eval loss is computed afterwards here, in the
parent, by one function on each saved adapter (token-weighted cross-entropy over the assistant tokens
of the same held-out examples, fp32), so the numbers compare.

Tokens are counted from the batches each variant actually trains on: target = label positions that are
predicted (labels shifted by one), real = non-pad positions, all = every position (padding included).
MFU = useful FLOPs / train seconds / peak, with the peak a timed bf16 matmul loop on this machine and,
for a frozen base with LoRA (no weight gradients for the base; activation gradients still flow):
    4 * N_linear * real + 4 * V * d * target + 6 * N_lora * real + 6 * L * d_attn * sum(n * (n + 1))
N_linear = decoder matmul params, V * d the lm_head (needed at target positions only), the last term
causal attention (QK^T and AV, forward 2 * d_attn * (p + 1) FLOPs each at position p, backward twice
that) summed over each example of length n. Padding and cross-example attention are not useful work.

Smoke: `python bench/train_throughput.py --steps 2`. Real run (idle machine): `--steps 30`.
Never a timed assert: it prints a table and writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                  TOKENIZERS_PARALLELISM="false")

IGNORE = -100
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}


# ---------------------------------------------------------------------- counting (in the children)
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
        return {"all_tokens": self.all, "real_tokens": self.real, "target_tokens": self.target,
                "examples": self.examples, "sum_n_n1": self.n_sq}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lora_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def child_llamaforge(a, work: Path, packing: bool = True) -> dict:
    from llamaforge.config import load_config
    from llamaforge.train.recipe import FineTuneRecipe

    cfg = load_config(None, [
        f"model.source={a.model}", f"data.sources=[{{path: {work / 'train_messages.jsonl'}, format: messages}}]",
        "data.val_size=0", f"data.max_length={a.data_max_length}", "data.template=auto",
        "method.name=lora", f"method.rank={LORA['r']}", f"method.alpha={LORA['lora_alpha']}",
        f"method.dropout={LORA['lora_dropout']}", "method.targets=all-linear",
        f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}", f"train.lr={a.lr}",
        "train.scheduler=cosine", "train.warmup_ratio=0.05", "train.weight_decay=0", "train.max_grad_norm=1.0",
        f"train.packing={str(packing).lower()}", f"train.pack_length={a.pack_length}", "train.precision=bf16",
        "eval.before_after=false", "eval.prompts=[]", f"output.dir={work}", "output.name=llamaforge",
        "output.overwrite=true", f"train.seed={a.seed}",
    ])
    recipe = FineTuneRecipe(cfg)
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
    return {**counter.result(), "train_seconds": summary["train_seconds"], "adapter": str(adapter),
            "losses": [r["loss"] for r in rows if "loss" in r], "trainable_params": summary["trainable_params"],
            "config": f"packed rows of {a.pack_length}, batch {a.batch_size} rows" if packing
            else f"length-grouped padding, batch {a.batch_size}"}


def _hf_model(a):
    from peft import LoraConfig, get_peft_model

    from llamaforge.models import load_model

    model, tokenizer = load_model(a.model)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA)), tokenizer


def _run_trainer(trainer, counter: Counter, work: Path, name: str) -> dict:
    compute_loss = trainer.compute_loss

    def counting(model, inputs, *args, **kwargs):
        counter.add(inputs)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting
    out = trainer.train()
    adapter = work / name / "adapter"
    trainer.model.save_pretrained(adapter)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {**counter.result(), "train_seconds": out.metrics["train_runtime"], "adapter": str(adapter),
            "losses": losses, "trainable_params": _lora_params(trainer.model)}


def _common_args(a, work: Path, name: str) -> dict:
    return dict(output_dir=str(work / name), per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
                max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=int(0.05 * a.steps),
                weight_decay=0.0, max_grad_norm=1.0, bf16=True, use_cpu=True, logging_steps=1, save_strategy="no",
                report_to="none", dataloader_num_workers=0, seed=a.seed, gradient_checkpointing=False)


def child_hf(a, work: Path) -> dict:
    """The tutorial way: every example tokenised with padding="max_length", max_length=512."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    model, tokenizer = _hf_model(a)
    pad, n = tokenizer.pad_token_id, a.hf_max_length
    data = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in _rows(work / "train.jsonl"):
        ids, labels = r["input_ids"][:n], r["labels"][:n]
        data["input_ids"].append(ids + [pad] * (n - len(ids)))
        data["attention_mask"].append([1] * len(ids) + [0] * (n - len(ids)))
        data["labels"].append(labels + [IGNORE] * (n - len(ids)))
    args = TrainingArguments(**_common_args(a, work, "hf"))
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(data),
                      data_collator=default_data_collator)
    torch.manual_seed(a.seed)
    return {**_run_trainer(trainer, Counter(pad), work, "hf"),
            "config": f"padding=max_length {n}, batch {a.batch_size}"}


def child_trl(a, work: Path) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _hf_model(a)
    rows = _rows(work / "train.jsonl")
    data = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]})
    packing = a.trl_mode == "packing"
    args = SFTConfig(**_common_args(a, work, "trl"), packing=packing, padding_free=not packing,
                     max_length=a.pack_length if packing else None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    config = f"packing bfd {a.pack_length}" if packing else "padding_free"
    return {**_run_trainer(trainer, Counter(tokenizer.pad_token_id), work, "trl"),
            "config": f"{config}, batch {a.batch_size}"}


def child_main(a) -> None:
    started = time.perf_counter()
    work = Path(a.work)
    fn = {"llamaforge": child_llamaforge, "hf": child_hf, "trl": child_trl,
          "llamaforge_padded": lambda a, work: child_llamaforge(a, work, packing=False)}[a.child]
    result = fn(a, work)
    result.update(wall_seconds=time.perf_counter() - started,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    (work / f"{a.child}-{a.trl_mode}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------- the parent
def prepare(a, work: Path) -> tuple[list[dict], dict]:
    """Tokenize once with llamaforge: train rows for (b)/(c), the same conversations for (a), eval rows."""
    from llamaforge.config import DataConfig, DataSource
    from llamaforge.models import load_tokenizer
    from llamaforge.templates import get_template
    from llamaforge.train.data import _split_conversations, _tokenize

    tokenizer = load_tokenizer(a.model)
    cfg = DataConfig(sources=[DataSource(path="alpaca-demo")], val_size=a.eval_size, template="auto",
                     max_length=a.data_max_length)
    template = get_template("auto", tokenizer)
    train, val = _split_conversations(cfg, [])
    rejects: list = []
    train_rows, val_rows = _tokenize(train, template, cfg, rejects), _tokenize(val, template, cfg, rejects)
    with open(work / "train_messages.jsonl", "w") as fh:
        for conv in train:
            fh.write(json.dumps({"messages": [{"role": m.role, "content": m.content} for m in conv.messages]}) + "\n")
    with open(work / "train.jsonl", "w") as fh:
        for r in train_rows:
            fh.write(json.dumps({"input_ids": r["input_ids"], "labels": r["labels"]}) + "\n")
    return val_rows, {"train_examples": len(train_rows), "eval_examples": len(val_rows), "rejected": len(rejects),
                      "template": template.name}


def matmul_peak_gflops(seconds: float = 3.0, n: int = 2048) -> float:
    import torch

    x, y = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    for _ in range(2):
        x @ y
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x @ y
        iters += 1
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e9


def eval_loss(model_source: str, adapter: str, rows: list[dict], batch_size: int = 8) -> float:
    """The one eval for every variant: token-weighted CE over assistant tokens, fp32, padded batches."""
    import torch
    from peft import PeftModel

    from llamaforge.losses import collate, num_targets, token_loss_sum
    from llamaforge.models import load_model

    base, tokenizer = load_model(model_source)
    model = PeftModel.from_pretrained(base, adapter).eval()
    order = sorted(rows, key=lambda r: len(r["input_ids"]))
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(order), batch_size):
            batch = collate(order[k : k + batch_size], tokenizer.pad_token_id)
            total += float(token_loss_sum(model, batch))
            count += num_targets(batch)
    return total / count


def model_flops(model_source: str, r: dict) -> float:
    from transformers import AutoConfig

    from llamaforge.models import local_path

    c = AutoConfig.from_pretrained(local_path(model_source))
    d, ff, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    head = getattr(c, "head_dim", None) or d // c.num_attention_heads
    dq, dkv = c.num_attention_heads * head, c.num_key_value_heads * head
    n_linear = layers * (d * dq + 2 * d * dkv + dq * d + 3 * d * ff)
    return (4 * n_linear * r["real_tokens"] + 4 * vocab * d * r["target_tokens"]
            + 6 * r["trainable_params"] * r["real_tokens"] + 6 * layers * dq * r["sum_n_n1"])


def run_child(a, name: str, work: Path, steps: int, trl_mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--steps", str(steps),
           "--trl-mode", trl_mode] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                                      if k in ("model", "batch_size", "lr", "pack_length", "hf_max_length",
                                               "data_max_length", "seed")]
    print(f"-- {name} ({trl_mode if name == 'trl' else ''}) {steps} steps", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if a.quiet else None)
    return json.loads((work / f"{name}-{trl_mode}.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step, every variant")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--eval-size", type=int, default=50)
    p.add_argument("--pack-length", type=int, default=512, help="tokens per packed row (llamaforge, TRL packing)")
    p.add_argument("--hf-max-length", type=int, default=512, help="padding=max_length for the HF Trainer baseline")
    p.add_argument("--data-max-length", type=int, default=1024)
    p.add_argument("--variants", default="llamaforge,llamaforge_padded,hf,trl",
                   help="llamaforge (packed), llamaforge_padded (its default), hf, trl")
    p.add_argument("--trl-mode", default="auto", choices=["auto", "packing", "padding_free"])
    p.add_argument("--probe-steps", type=int, default=3, help="steps per TRL mode when --trl-mode auto")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work", default="/tmp/llamaforge-bench-train")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    p.add_argument("--quiet", action="store_true", help="hide the children's progress bars")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child_main(a)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    eval_rows, data_info = prepare(a, work)
    peak = matmul_peak_gflops()
    print(f"data: {data_info}; bf16 matmul peak {peak:.0f} GFLOP/s", flush=True)
    probes = {}
    trl_mode = a.trl_mode
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    if "trl" in names and trl_mode == "auto":  # TRL's two fast paths here; keep the faster
        for mode in ("packing", "padding_free"):
            r = run_child(a, "trl", work, a.probe_steps, mode)
            probes[mode] = r["target_tokens"] / r["train_seconds"]
        trl_mode = max(probes, key=probes.get)
        print(f"TRL probe, target tokens/s: {probes} -> {trl_mode}", flush=True)
    results = {}
    for name in names:
        r = run_child(a, name, work, a.steps, trl_mode)
        r["eval_loss"] = eval_loss(a.model, r["adapter"], eval_rows)
        r["mfu"] = model_flops(a.model, r) / r["train_seconds"] / (peak * 1e9)
        r["final_train_loss"] = sum(r["losses"][-5:]) / len(r["losses"][-5:])
        results[name] = r
    report(a, results, peak, probes, data_info)


def speed_ratios(results: dict) -> dict[str, float]:
    """Target tokens/s of each llamaforge variant over (b) and (c); its eval loss vs (c), in percent.
    llamaforge_padded is the default configuration, llamaforge the packed one."""
    tps = {n: r["target_tokens"] / r["train_seconds"] for n, r in results.items()}
    ratios = {}
    for mine in ("llamaforge_padded", "llamaforge"):
        if mine not in tps:
            continue
        for other in ("hf", "trl"):
            if other in tps:
                ratios[f"{mine}_over_{other}"] = tps[mine] / tps[other]
        if "trl" in results:
            ratios[f"{mine}_eval_loss_vs_trl_pct"] = 100 * (results[mine]["eval_loss"] / results["trl"]["eval_loss"] - 1)
    return ratios


def report(a, results: dict, peak: float, probes: dict, data_info: dict) -> None:
    label = {"llamaforge": "(a) llamaforge packed", "llamaforge_padded": "(a') llamaforge padded",
             "hf": "(b) HF Trainer + peft", "trl": "(c) TRL SFTTrainer"}
    lines = ["| variant | config | target tok/s | all tok/s | examples/step | peak RSS MB | train loss (last 5) "
             "| eval loss | train s | wall s | MFU |", "|" + "---|" * 11]
    for name, r in results.items():
        s = r["train_seconds"]
        lines.append(f"| {label[name]} | {r['config']} | {r['target_tokens'] / s:.0f} | {r['all_tokens'] / s:.0f} "
                     f"| {r['examples'] / a.steps:.1f} | {r['peak_rss_mb']:.0f} | {r['final_train_loss']:.4f} "
                     f"| {r['eval_loss']:.4f} | {s:.1f} | {r['wall_seconds']:.1f} | {100 * r['mfu']:.1f}% |")
    ratios = speed_ratios(results)
    print("\n".join(lines))
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(a).items() if k not in ("child", "quiet")}
    out.write_text(json.dumps({"settings": settings, "data": data_info, "bf16_matmul_peak_gflops": peak,
                               "trl_probe_target_tok_s": probes, "ratios": ratios,
                               "results": {n: {k: v for k, v in r.items() if k != "adapter"}
                                           for n, r in results.items()}}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
