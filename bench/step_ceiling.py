"""The matmul-only ceiling of llamaforge's default LoRA training run: how fast could it be at best?

Why: a throughput target (e.g. 3x TRL or 2x the fair HF row of bench/train_throughput.py) is only worth
chasing if a step that did nothing but its matrix products and attention could reach it. This script
takes the micro-batches the bench's llamaforge row trains on (the same tokenized alpaca demo, the same
job, its planner's micro-batch, the first --steps optimizer steps), lists every GEMM of a LoRA all-linear
step of the model for them, times each distinct shape alone (fp32, best of --repeats, torch threads =
the cores in use) and sums them over the run:

  frozen forward      x @ W.T of q, k, v, o, gate, up, down in every layer
  frozen input grad   g @ W of each (no weight gradient: the base is frozen)
  LoRA                x @ A.T, h @ B.T, and backward g @ B, g.T @ h, gh @ A, gh.T @ x per projection
  attention           scaled_dot_product_attention, causal, forward and backward
  lm_head             h @ E.T and g @ E at target positions only, in loss_chunk_size chunks

Two ceilings: "as trained" on the padded micro-batches llamaforge runs (rows x padded length), and
"padding-free" on the real tokens alone (every example its own causal attention), the best any trainer
of this model and data could do with these kernels. Norms, RoPE, SiLU, dropout, softmax cross-entropy,
the optimizer and every copy count as free, so both are upper bounds on target tokens/s; MFU is the
bench's useful-FLOP formula (bench/train_throughput.py) over the ceiling's time, against the same peak.

Run on an idle machine with every core (a few minutes; --steps 30 is the bench's run):

    python bench/step_ceiling.py

It prints a table with the machine line, compares with the rows of bench/results/train_throughput.json
when that file holds them, and writes bench/results/step_ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from train_throughput import HERE, model_flops, prepare  # also sets the offline environment

PARTS = ("frozen forward", "frozen input grad", "LoRA", "attention forward", "attention backward", "lm_head")
_cache: dict[tuple, float] = {}


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch pages, kernel choice
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def timed(key: tuple, repeats: int) -> float:
    """Seconds of one op, measured once per distinct shape."""
    if key not in _cache:
        kind, *dims = key
        _cache[key] = MAKERS[kind](*dims, repeats)
    return _cache[key]


def _linear(m: int, k: int, n: int, repeats: int) -> float:  # x[m,k] @ W[n,k].T, as nn.Linear
    x, w = torch.randn(m, k), torch.randn(n, k)
    return best_of(lambda: F.linear(x, w), repeats)


def _mm(m: int, k: int, n: int, repeats: int) -> float:  # g[m,k] @ W[k,n], an input gradient
    a, b = torch.randn(m, k), torch.randn(k, n)
    return best_of(lambda: a @ b, repeats)


def _mm_tn(rows: int, m: int, cols: int, repeats: int) -> float:  # g[m,rows].T @ h[m,cols], a weight grad
    a, b = torch.randn(m, rows), torch.randn(m, cols)
    return best_of(lambda: a.t() @ b, repeats)


def _sdpa(rows: int, heads: int, n: int, head_dim: int, backward: bool, repeats: int) -> float:
    """Causal attention forward, or forward + backward when `backward` (the caller subtracts)."""
    q, k, v = (torch.randn(rows, heads, n, head_dim, requires_grad=backward) for _ in range(3))
    grad = torch.randn(rows, heads, n, head_dim)

    def run():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if backward:
            torch.autograd.grad(out, (q, k, v), grad)

    return best_of(run, repeats)


MAKERS = {"linear": _linear, "mm": _mm, "mm_tn": _mm_tn, "sdpa": _sdpa}


def step_parts(m: int, attention: list[tuple[int, int]], targets: int, arch: dict, repeats: int):
    """Seconds and FLOPs per part of one micro-batch: `m` token rows through the linears, causal
    attention over (rows, length) blocks, `targets` positions through lm_head."""
    d, r, layers, heads, hd = arch["hidden"], arch["rank"], arch["layers"], arch["heads"], arch["head_dim"]
    seconds, flops = dict.fromkeys(PARTS, 0.0), dict.fromkeys(PARTS, 0.0)

    def add(part: str, key: tuple, times: int = 1) -> None:
        seconds[part] += times * timed(key, repeats)
        flops[part] += times * 2 * math.prod(key[1:4])

    for fan_in, fan_out in arch["projections"]:
        add("frozen forward", ("linear", m, fan_in, fan_out), layers)
        add("frozen input grad", ("mm", m, fan_out, fan_in), layers)
        add("LoRA", ("linear", m, fan_in, r), layers)  # A
        add("LoRA", ("linear", m, r, fan_out), layers)  # B
        add("LoRA", ("mm", m, fan_out, r), layers)  # grad of B's input
        add("LoRA", ("mm_tn", fan_out, m, r), layers)  # grad of B
        add("LoRA", ("mm", m, r, fan_in), layers)  # grad of A's input
        add("LoRA", ("mm_tn", r, m, fan_in), layers)  # grad of A
    for rows, n in attention:  # QK^T and AV, causal: forward 2 * heads * hd * n(n+1), backward twice that
        forward = timed(("sdpa", rows, heads, n, hd, False), repeats)
        both = timed(("sdpa", rows, heads, n, hd, True), repeats)
        seconds["attention forward"] += layers * forward
        seconds["attention backward"] += layers * max(0.0, both - forward)
        flops["attention forward"] += layers * 2 * rows * heads * hd * n * (n + 1)
        flops["attention backward"] += layers * 4 * rows * heads * hd * n * (n + 1)
    for start in range(0, targets, arch["chunk"]):
        c = min(arch["chunk"], targets - start)
        add("lm_head", ("linear", c, d, arch["vocab"]))
        add("lm_head", ("mm", c, arch["vocab"], d))
    return seconds, flops


def arch_of(c, rank: int, chunk: int) -> dict:
    """The shapes step_parts needs from a Llama config: the seven adapted projections (fan in, fan out)
    of a layer, attention heads, lm_head, the LoRA rank and the loss chunk."""
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    d, dq, dkv, ff = (
        c.hidden_size,
        c.num_attention_heads * head,
        c.num_key_value_heads * head,
        c.intermediate_size,
    )
    return {
        "hidden": d,
        "layers": c.num_hidden_layers,
        "heads": c.num_attention_heads,
        "head_dim": head,
        "vocab": c.vocab_size,
        "rank": rank,
        "chunk": chunk,
        "projections": [(d, dq), (d, dkv), (d, dkv), (dq, d), (d, ff), (d, ff), (ff, d)],
    }


def llamaforge_micro_batches(a, work: Path) -> tuple[list[dict], dict, int]:
    """The micro-batches of the bench's llamaforge row for a.steps optimizer steps (its job, its planner),
    as (rows, padded length, example lengths, targets); the model's shapes; its trainable parameters."""
    from llamaforge.train.recipe import FineTuneRecipe
    from train_children import llamaforge_config

    recipe = FineTuneRecipe(llamaforge_config(a, work, "step-ceiling", packing=False))
    recipe.setup()
    t = recipe.cfg.train
    micro: list[dict] = []
    epoch, steps = 0, 0
    while steps < a.steps:
        batches = recipe.batches(epoch)
        for k in range(0, len(batches), t.grad_accum):
            for idx in recipe.micro_parts(batches[k : k + t.grad_accum]):  # as trained: split too
                batch, _ = recipe._collate(idx)
                labels = batch["labels"]
                micro.append(
                    {
                        "rows": labels.shape[0],
                        "padded_length": labels.shape[1],
                        "lengths": batch["attention_mask"].sum(1).tolist(),
                        "targets": int((labels[:, 1:] != -100).sum()),
                    }
                )
            steps += 1
            if steps == a.steps:
                break
        epoch += 1
    arch = {
        **arch_of(recipe.model.config, recipe.cfg.method.rank, t.loss_chunk_size),
        "micro_batch": t.batch_size,
        "grad_accum": t.grad_accum,
    }
    trainable = sum(p.numel() for p in recipe.model.parameters() if p.requires_grad)
    recipe.cleanup()
    del recipe
    return micro, arch, trainable


def measured_rows(path: Path) -> dict[str, dict]:
    """Target tokens/s and MFU of the fp32 rows of a train_throughput.json (empty when it holds none)."""
    if not path.is_file():
        return {}
    variants = json.loads(path.read_text()).get("tables", {}).get("fp32", {}).get("variants", {})
    return {
        n: {"tok_s": r["target_tokens"] / r["train_seconds"], "mfu": r.get("mfu")}
        for n, r in variants.items()
        if "error" not in r
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step, as the bench")
    p.add_argument("--llamaforge-batch-size", default="auto")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--eval-size", type=int, default=50, help="held out as the bench does (same train split)")
    p.add_argument("--data-max-length", type=int, default=1024)
    p.add_argument("--pack-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=3, help="timings of each shape after a warm-up; best kept")
    p.add_argument("--throughput", default=str(HERE / "results" / "train_throughput.json"))
    p.add_argument("--out", default=str(HERE / "results" / "step_ceiling.json"))
    a = p.parse_args()
    a.precision = "fp32"
    from llamaforge.hardware import preload_allocator
    from machine import describe
    from train_children import llamaforge_config

    # the allocator the bench's llamaforge child runs on (the CLI's choice), so the planner sees the same
    job = llamaforge_config(a, Path(tempfile.gettempdir()), "step-ceiling", packing=False)
    print(preload_allocator(job.train.allocator), flush=True)
    with tempfile.TemporaryDirectory(prefix="llamaforge-ceiling-") as tmp:
        work = Path(tmp)
        prepare(a, work)
        micro, arch, trainable = llamaforge_micro_batches(a, work)
    machine = describe("fp32")
    print(machine.line(), flush=True)
    torch.manual_seed(0)
    totals = {name: (defaultdict(float), defaultdict(float)) for name in ("as_trained", "padding_free")}
    for mb in micro:  # no autograd graph is built but attention's backward, run on purpose
        rows, length, lengths = mb["rows"], mb["padded_length"], mb["lengths"]
        runs = {
            "as_trained": step_parts(rows * length, [(rows, length)], mb["targets"], arch, a.repeats),
            "padding_free": step_parts(
                sum(lengths), [(1, n) for n in lengths], mb["targets"], arch, a.repeats
            ),
        }
        for name, (seconds, flops) in runs.items():
            for k in PARTS:
                totals[name][0][k] += seconds[k]
                totals[name][1][k] += flops[k]
    counts = {
        "real_tokens": sum(sum(mb["lengths"]) for mb in micro),
        "all_tokens": sum(mb["rows"] * mb["padded_length"] for mb in micro),
        "target_tokens": sum(mb["targets"] for mb in micro),
        "sum_n_n1": sum(n * (n + 1) for mb in micro for n in mb["lengths"]),
        "trainable_params": trainable,
    }
    useful = model_flops(a.model, counts)
    peak = machine.peak_gflops * 1e9
    ceilings = {}
    for name, (seconds, flops) in totals.items():
        total = sum(seconds.values())
        ceilings[name] = {
            "seconds": total,
            "parts_seconds": dict(seconds),
            "parts_gflop": {k: v / 1e9 for k, v in flops.items()},
            "parts_pct_of_peak": {k: 100 * flops[k] / seconds[k] / peak for k in PARTS if seconds[k]},
            "target_tokens_per_s": counts["target_tokens"] / total,
            "mfu": useful / total / peak,
        }
    measured = measured_rows(Path(a.throughput))
    report(a, machine, arch, micro, counts, ceilings, measured)


def compare(measured: dict, shaped: dict, free: dict) -> dict:
    """The issue's goals (3x the faster TRL mode, 2x the fair HF row) against the ceilings, in target tok/s
    and, peak-independent, as the MFU llamaforge's measured run would have at the goal rate (its MFU scaled
    by goal / its tok/s) next to the ceilings' MFU."""
    tok = {n: r["tok_s"] for n, r in measured.items()}
    best_trl = max((n for n in ("trl_padding_free", "trl_packing") if n in tok), key=tok.get, default=None)
    mine = measured.get("llamaforge")
    out: dict = {}
    if mine:
        out["llamaforge"] = {"tok_s": mine["tok_s"], "mfu": mine["mfu"]}
        print(
            f"llamaforge measured {mine['tok_s']:.0f} target tok/s, MFU {100 * mine['mfu']:.1f}%: "
            f"{100 * mine['mfu'] / shaped['mfu']:.0f}% of the as-trained ceiling's MFU, "
            f"{100 * mine['mfu'] / free['mfu']:.0f}% of the padding-free one's"
        )
    for label, row, times in (("3x the faster TRL mode", best_trl, 3), ("2x the fair HF row", "hf", 2)):
        if row is None or row not in tok:
            continue
        goal = times * tok[row]
        entry = {"row": row, "row_tok_s": tok[row], "goal_tok_s": goal}
        line = f"{label}: {times} x {tok[row]:.0f} ({row}) = {goal:.0f} target tok/s"
        if mine and mine["mfu"]:
            entry["goal_mfu"] = needed = mine["mfu"] * goal / mine["tok_s"]
            verdict = "within" if needed <= max(shaped["mfu"], free["mfu"]) else "BEYOND"
            line += (
                f" = MFU {100 * needed:.1f}% for llamaforge's run, {verdict} the ceilings' MFU "
                f"{100 * shaped['mfu']:.1f}% (as trained) / {100 * free['mfu']:.1f}% (padding-free)"
            )
        else:
            best = max(shaped["target_tokens_per_s"], free["target_tokens_per_s"])
            verdict = "within" if goal <= best else "BEYOND"
            line += f", {verdict} the ceiling {best:.0f}"
        out[label] = entry
        print(line)
    return out


def report(a, machine, arch: dict, micro: list[dict], counts: dict, ceilings: dict, measured: dict) -> None:
    shaped, free = ceilings["as_trained"], ceilings["padding_free"]
    print(
        f"\n{a.steps} steps of micro-batch {arch['micro_batch']} x {arch['grad_accum']} accumulated: "
        f"{len(micro)} micro-batches, {counts['all_tokens']} positions, {counts['real_tokens']} real, "
        f"{counts['target_tokens']} target tokens; {len(_cache)} distinct shapes timed"
    )
    lines = [
        "| part | as trained (padded) s | share | padding-free s | share | padding-free: GFLOP | % of peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in PARTS:
        s, f = shaped["parts_seconds"][k], free["parts_seconds"][k]
        lines.append(
            f"| {k} | {s:.1f} | {100 * s / shaped['seconds']:.1f}% | {f:.1f} | {100 * f / free['seconds']:.1f}% "
            f"| {free['parts_gflop'][k]:,.0f} | {free['parts_pct_of_peak'].get(k, 0):.0f}% |"
        )
    lines.append(
        f"| **matmul-only total** | {shaped['seconds']:.1f} | | {free['seconds']:.1f} | "
        f"| {sum(free['parts_gflop'].values()):,.0f} | |"
    )
    lines.append(
        f"| **ceiling target tok/s** | {shaped['target_tokens_per_s']:.0f} | MFU {100 * shaped['mfu']:.1f}% "
        f"| {free['target_tokens_per_s']:.0f} | MFU {100 * free['mfu']:.1f}% | | |"
    )
    print("\n".join(lines))
    comparison: dict = {}
    if measured:
        comparison = compare(measured, shaped, free)
    else:
        print(f"no fp32 rows in {a.throughput}: run bench/train_throughput.py for the comparison")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(a).items() if k not in ("out",)}
    out.write_text(
        json.dumps(
            {
                "settings": settings,
                "machine": machine.record(),
                "arch": arch,
                "counts": counts,
                "ceilings": ceilings,
                "compared_with": comparison,
                "micro_batches": [{k: v for k, v in mb.items() if k != "lengths"} for mb in micro],
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
