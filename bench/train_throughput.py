"""Training throughput: llamaforge vs HF Trainer + peft vs TRL SFTTrainer, one run, the whole table.

Real run (idle machine, roughly an hour on 2 cores; `make bench-train` installs the `bench` extra and runs it):

    python bench/train_throughput.py --steps 30

Smoke (checks that every variant runs; its numbers mean nothing):

    OMP_NUM_THREADS=1 python bench/train_throughput.py --steps 2 --batch-size 2 --eval-size 4 \
        --data-max-length 256 --pack-length 256 --hf-max-length 256

Variants, same model (default smollm2-135m-instruct), same data (the alpaca demo with the model's own
chat template, tokenized once by llamaforge so every variant trains on the same ids and assistant-only
labels), LoRA r=8 alpha=16 dropout 0.05 all-linear, the same examples per optimizer step (--batch-size),
steps, lr schedule and clipping, gradient checkpointing off (llamaforge: its default, auto):
  llamaforge          its defaults: length-grouped dynamic padding, micro-batch chosen by the planner
                      (batch_size auto), gradient accumulation up to --batch-size examples per step
  llamaforge_packed   train.packing: true, --batch-size packed rows of --pack-length tokens per step
  hf                  the fair HF recipe: dynamic padding (DataCollatorForSeq2Seq), group_by_length
  hf_max_length       the tutorial recipe: padding="max_length" to --hf-max-length, no grouping
  trl_padding_free    TRL SFTTrainer, padding_free=True
  trl_packing         TRL SFTTrainer, packing=True (bfd) to --pack-length
Both TRL modes are published; the headline ratios are against the faster TRL mode and the fair HF row.

Precision: --precision auto (the default) is what this machine resolves (llamaforge.device, as `llamaforge
train` would), plus an fp32 table when that is bf16; a bf16 table on a CPU where bf16 is slow (no bf16
instructions: emulated, ~100x slower) is skipped with the reason. Every table has its machine line (bench/
machine.py: CPU, ISA, bf16 instructions, cores, torch, precision and reason, that dtype's matmul peak as
best of short bursts), and MFU is against that peak.

Eval loss at equal examples seen: one function scores every variant's adapter on the same held-out
examples (token-weighted cross-entropy over the assistant tokens, fp32, in this parent process). Padded
variants see steps x batch examples; a packed row holds several examples, so each packed variant is
trained a second time, for the steps that make the same number of examples (from its first run's
examples per step, complete lr schedule), and that adapter is scored; the table gives the examples each
scored adapter saw.

Tokens are counted from the batches each variant actually trains on: target = label positions that are
predicted (labels shifted by one), real = non-pad positions, all = every position (padding included).
MFU = useful FLOPs / train seconds / peak, for a frozen base with LoRA (no weight gradients for the base;
activation gradients still flow):
    4 * N_linear * real + 4 * V * d * target + 6 * N_lora * real + 6 * L * d_attn * sum(n * (n + 1))
N_linear = decoder matmul params, V * d the lm_head (needed at target positions only), the last term
causal attention (QK^T and AV, forward 2 * d_attn * (p + 1) FLOPs each at position p, backward twice
that) summed over each example of length n. Padding and cross-example attention are not useful work.
Each variant runs in its own subprocess (clean peak RSS): bench/train_children.py. The llamaforge variants
run on the allocator `llamaforge train` chooses (train.allocator auto: jemalloc where installed), the peers
on the system's; each row records its allocator. Never a timed assert: it prints the tables and
writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# The race is on the CPU, every variant: a GPU on the machine is hidden from them all (the GPU's own check is
# bench/gpu_check.sh).
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    TOKENIZERS_PARALLELISM="false",
    CUDA_VISIBLE_DEVICES="",
)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

VARIANTS = ("llamaforge", "llamaforge_packed", "hf", "hf_max_length", "trl_padding_free", "trl_packing")
PACKED = ("llamaforge_packed", "trl_packing")
LABELS = {
    "llamaforge": "llamaforge, default",
    "llamaforge_packed": "llamaforge, packing",
    "hf": "HF Trainer + peft, dynamic padding + group_by_length",
    "hf_max_length": "HF Trainer + peft, padding=max_length",
    "trl_padding_free": "TRL SFTTrainer, padding_free",
    "trl_packing": "TRL SFTTrainer, packing",
}


# ---------------------------------------------------------------------- the parent
def prepare(a, work: Path) -> tuple[list[dict], dict]:
    """Tokenize once with llamaforge: train rows for (b)/(c), the same conversations for (a), eval rows."""
    from llamaforge.config import DataConfig, DataSource
    from llamaforge.models import load_tokenizer
    from llamaforge.templates import get_template
    from llamaforge.train.data import split_conversations, tokenize_conversations

    tokenizer = load_tokenizer(a.model)
    cfg = DataConfig(
        sources=[DataSource(path="alpaca-demo")],
        val_size=a.eval_size,
        template="auto",
        max_length=a.data_max_length,
    )
    template = get_template("auto", tokenizer)
    train, val = split_conversations(cfg, [])
    rejects: list = []
    train_rows, val_rows = (
        tokenize_conversations(train, template, cfg, rejects),
        tokenize_conversations(val, template, cfg, rejects),
    )
    with open(work / "train_messages.jsonl", "w") as fh:
        for conv in train:
            fh.write(
                json.dumps({"messages": [{"role": m.role, "content": m.content} for m in conv.messages]})
                + "\n"
            )
    with open(work / "train.jsonl", "w") as fh:
        for r in train_rows:
            fh.write(json.dumps({"input_ids": r["input_ids"], "labels": r["labels"]}) + "\n")
    return val_rows, {
        "train_examples": len(train_rows),
        "eval_examples": len(val_rows),
        "rejected": len(rejects),
        "template": template.name,
    }


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
    return (
        4 * n_linear * r["real_tokens"]
        + 4 * vocab * d * r["target_tokens"]
        + 6 * r["trainable_params"] * r["real_tokens"]
        + 6 * layers * dq * r["sum_n_n1"]
    )


def run_child(a, name: str, work: Path, steps: int, precision: str, tag: str) -> dict:
    """One variant in its own process; a failure is recorded (and fails the run at the end), not fatal."""
    cmd = [
        sys.executable,
        str(HERE / "train_children.py"),
        "--child",
        name,
        "--tag",
        tag,
        "--work",
        str(work),
        "--steps",
        str(steps),
        "--precision",
        precision,
    ] + [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(a).items()
        if k
        in (
            "model",
            "batch_size",
            "llamaforge_batch_size",
            "lr",
            "pack_length",
            "hf_max_length",
            "data_max_length",
            "seed",
        )
    ]
    print(f"-- {tag}: {steps} steps", flush=True)
    out = work / f"{tag}.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL if a.quiet else None)
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"{tag} exited with status {proc.returncode} (its log is above)"}
    return json.loads(out.read_text())


def run_precision(a, precision: str, names: list[str], work: Path, eval_rows: list[dict]) -> dict:
    from machine import describe

    machine = describe(precision)
    print(machine.line(), flush=True)
    table = {}
    for name in names:
        tag = f"{precision}-{name}"
        r = run_child(a, name, work, a.steps, precision, tag)
        if "error" in r:
            table[name] = r
            continue
        r["mfu"] = model_flops(a.model, r) / r["train_seconds"] / (machine.peak_gflops * 1e9)
        r["final_train_loss"] = sum(r["losses"][-5:]) / max(1, len(r["losses"][-5:]))
        adapter, r["eval_steps"], r["eval_examples"] = r["adapter"], a.steps, r["examples"]
        if name in PACKED:  # the same examples as the padded variants, over a complete lr schedule
            steps = max(1, round(a.steps * a.batch_size / (max(r["examples"], 1) / a.steps)))
            again = run_child(a, name, work, steps, precision, f"{tag}-equal-examples")
            if "error" in again:
                r["error"] = again["error"]
                table[name] = r
                continue
            adapter, r["eval_steps"], r["eval_examples"] = again["adapter"], steps, again["examples"]
        r["eval_loss"] = eval_loss(a.model, adapter, eval_rows)
        table[name] = r
    return {"machine": machine.record(), "variants": table, "ratios": speed_ratios(table)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument(
        "--batch-size", type=int, default=8, help="examples (packed: rows) per optimizer step, every variant"
    )
    p.add_argument(
        "--llamaforge-batch-size",
        default="auto",
        help="llamaforge's micro-batch: auto (its default, planned) or a divisor of --batch-size",
    )
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--eval-size", type=int, default=50)
    p.add_argument(
        "--pack-length", type=int, default=512, help="tokens per packed row (llamaforge, TRL packing)"
    )
    p.add_argument(
        "--hf-max-length", type=int, default=512, help="padding=max_length for the hf_max_length row"
    )
    p.add_argument("--data-max-length", type=int, default=1024)
    p.add_argument("--variants", default=",".join(VARIANTS), help=", ".join(VARIANTS))
    p.add_argument(
        "--precision",
        default="auto",
        help="auto (this machine's resolved precision, and fp32 beside bf16), or a list: bf16,fp32",
    )
    p.add_argument(
        "--allow-slow-bf16", action="store_true", help="run bf16 even where it is emulated and slow"
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work", default="/tmp/llamaforge-bench-train")
    p.add_argument("--out", default=str(HERE / "results" / "train_throughput.json"))
    p.add_argument("--quiet", action="store_true", help="hide the children's progress bars")
    a = p.parse_args()

    if a.llamaforge_batch_size != "auto" and (
        not a.llamaforge_batch_size.isdigit()
        or int(a.llamaforge_batch_size) < 1
        or a.batch_size % int(a.llamaforge_batch_size)
    ):
        raise SystemExit(
            f"--llamaforge-batch-size: {a.llamaforge_batch_size!r} is neither auto nor a divisor of "
            f"--batch-size {a.batch_size}"
        )
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    from machine import plan_precisions

    precisions, skipped = plan_precisions(a.precision, a.allow_slow_bf16)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    eval_rows, data_info = prepare(a, work)
    print(f"data: {data_info}", flush=True)
    for prec, reason in skipped.items():
        print(f"{prec} rows skipped: {reason}", flush=True)
    tables = {prec: run_precision(a, prec, names, work, eval_rows) for prec in precisions}
    report(a, tables, skipped, data_info)
    failed = [f"{prec}/{n}" for prec, t in tables.items() for n, r in t["variants"].items() if "error" in r]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def speed_ratios(table: dict) -> dict[str, float]:
    """Target tokens/s of each llamaforge variant over the fair HF row, the faster TRL mode and the
    max_length HF row; its eval loss (equal examples) vs that TRL mode's in percent; peak RSS over TRL's."""
    ok = {n: r for n, r in table.items() if "error" not in r}
    tps = {n: r["target_tokens"] / r["train_seconds"] for n, r in ok.items()}
    trl = [n for n in ("trl_padding_free", "trl_packing") if n in tps]
    best_trl = max(trl, key=tps.get) if trl else None
    ratios: dict[str, float | str] = {"faster_trl_mode": best_trl} if best_trl else {}
    for mine in ("llamaforge", "llamaforge_packed"):
        if mine not in tps:
            continue
        for other, key in (("hf", "hf"), (best_trl, "trl"), ("hf_max_length", "hf_max_length")):
            if other in tps:
                ratios[f"{mine}_over_{key}"] = round(tps[mine] / tps[other], 3)
        if best_trl:
            ratios[f"{mine}_eval_loss_vs_trl_pct"] = round(
                100 * (ok[mine]["eval_loss"] / ok[best_trl]["eval_loss"] - 1), 3
            )
            ratios[f"{mine}_peak_rss_over_trl"] = round(
                ok[mine]["peak_rss_mb"] / ok[best_trl]["peak_rss_mb"], 3
            )
    return ratios


def report(a, tables: dict, skipped: dict, data_info: dict) -> None:
    for t in tables.values():
        print(f"\n{t['machine']['line']}")
        lines = [
            "| variant | config | target tok/s | all tok/s | examples/step | peak RSS MB | train loss (last 5) "
            "| eval loss | examples seen (eval) | train s | MFU |",
            "|" + "---|" * 11,
        ]
        for name, r in t["variants"].items():
            if "error" in r:
                lines.append(f"| {LABELS[name]} | failed: {r['error']} |" + " |" * 9)
                continue
            s = r["train_seconds"]
            config = r["config"] + (", gradient checkpointing ON" if r.get("gradient_checkpointing") else "")
            config += f", {r['allocator']} malloc" if r.get("allocator") else ""
            lines.append(
                f"| {LABELS[name]} | {config} | {r['target_tokens'] / s:.0f} | {r['all_tokens'] / s:.0f} "
                f"| {r['examples'] / a.steps:.1f} | {r['peak_rss_mb']:.0f} | {r['final_train_loss']:.4f} "
                f"| {r['eval_loss']:.4f} | {r['eval_examples']} ({r['eval_steps']} steps) | {s:.1f} "
                f"| {100 * r['mfu']:.1f}% |"
            )
        print("\n".join(lines))
        for k, v in t["ratios"].items():
            print(f"{k}: {v}")
    for prec, reason in skipped.items():
        print(f"\n{prec} rows skipped: {reason}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(a).items() if k not in ("child", "quiet", "tag")}
    clean = {
        prec: {
            **t,
            "variants": {n: {k: v for k, v in r.items() if k != "adapter"} for n, r in t["variants"].items()},
        }
        for prec, t in tables.items()
    }
    out.write_text(
        json.dumps(
            {
                "settings": settings,
                "data": data_info,
                "eval_loss_at": "equal examples seen",
                "tables": clean,
                "skipped": skipped,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
