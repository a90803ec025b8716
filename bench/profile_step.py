"""Where a llamaforge training step spends its time: torch.profiler over real optimizer steps.

Why: bench/step_ceiling.py says how fast the run's matrix products alone could go; this says how much of
a real step they are and what the rest is (norms, RoPE, SiLU, dropout, attention, loss, optimizer,
copies), so a non-matmul cost worth removing shows up with its share.

The job is the bench's llamaforge row (bench/train_children.py: default model, alpaca demo, LoRA r8
all-linear, effective batch 8, its planner's micro-batch, fp32, on the allocator `llamaforge train`
would choose); --warmup optimizer steps run first, then --steps are profiled (CPU activity, self time
per op). Run on an idle machine with every core (a minute or two):

    python bench/profile_step.py

Prints the machine line, the step's wall time, the top ops by self CPU time and the share per kind, and
writes bench/results/profile_step.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from train_throughput import HERE, prepare  # also sets the offline environment

# Op name (lower case) -> kind: the first kind with a substring of the name wins.
KINDS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("attention", ("scaled_dot_product", "flash_attention", "attention")),
    ("cross-entropy", ("softmax", "logsumexp", "nll_loss", "cross_entropy", "gather", "aten::sub", "exp")),
    ("dropout", ("random_", "bernoulli", "dropout", "bitwise_and", "aten::ge", "_scalekept")),
    ("optimizer", ("_foreach", "addcdiv", "lerp", "adamw", "optimizer", "norm", "clamp")),
    (
        "elementwise: norm, rope, silu, add",
        ("pow", "mean", "rsqrt", "silu", "aten::mul", "aten::add", "neg", "cat", "cos", "sin"),
    ),
    (
        "copies / layout",
        ("copy_", "clone", "contiguous", "aten::to", "empty", "fill_", "zero_", "index", "view"),
    ),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps before the profile")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps profiled")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--llamaforge-batch-size", default="auto")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--eval-size", type=int, default=50)
    p.add_argument("--data-max-length", type=int, default=1024)
    p.add_argument("--pack-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override after the bench's job, e.g. method.dropout=0 (repeatable)",
    )
    p.add_argument("--out", default=str(HERE / "results" / "profile_step.json"))
    a = p.parse_args()
    a.precision = "fp32"
    from llamaforge.hardware import preload_allocator, running_allocator
    from train_children import llamaforge_config

    work = Path(tempfile.mkdtemp(prefix="llamaforge-profile-"))
    a.steps_total = a.warmup + a.steps
    job = argparse.Namespace(**{**vars(a), "steps": a.steps_total})
    print(
        preload_allocator(llamaforge_config(job, work, "profile", False, tuple(a.override)).train.allocator),
        flush=True,
    )
    prepare(a, work)
    profile(a, job, work, running_allocator())


def profile(a, job, work: Path, allocator: str) -> None:
    import torch

    from llamaforge.train.recipe import FineTuneRecipe
    from machine import describe
    from train_children import llamaforge_config

    recipe = FineTuneRecipe(llamaforge_config(job, work, "profile", False, tuple(a.override)))
    recipe.setup()
    accum = recipe.cfg.train.grad_accum
    batches = recipe.batches(0)
    groups = [batches[k : k + accum] for k in range(0, len(batches), accum)][: a.steps_total]
    for g in range(a.warmup):
        recipe._step(groups[g], g)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for g in range(a.warmup, a.steps_total):
            recipe._step(groups[g], g)
        wall = time.perf_counter() - started
    recipe.cleanup()
    machine = describe("fp32", peak=False)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    kinds: dict[str, float] = {}
    for e in events:
        kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0.0) + e.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: a.top]
    print(machine.line())
    t = recipe.cfg.train
    print(
        f"{a.steps} optimizer steps profiled after {a.warmup} (micro-batch {t.batch_size} x {accum}, "
        f"allocator {allocator}{', ' + ' '.join(a.override) if a.override else ''}): {wall:.1f} s wall, {wall / a.steps:.2f} s a step, "
        f"{total / 1e6:.1f} s of self CPU time in ops"
    )
    print("| op | kind | calls | self CPU s | share |\n|---|---|---|---|---|")
    for e in top:
        print(
            f"| {e.key} | {kind_of(e.key)} | {e.count} | {e.self_cpu_time_total / 1e6:.2f} "
            f"| {100 * e.self_cpu_time_total / total:.1f}% |"
        )
    print("\n| kind | self CPU s | share |\n|---|---|---|")
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {us / 1e6:.2f} | {100 * us / total:.1f}% |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "settings": {k: v for k, v in vars(a).items() if k != "out"},
                "machine": machine.record(),
                "micro_batch": t.batch_size,
                "grad_accum": accum,
                "allocator": allocator,
                "wall_seconds": wall,
                "self_cpu_seconds": total / 1e6,
                "kinds": {k: v / 1e6 for k, v in kinds.items()},
                "top": [
                    {
                        "op": e.key,
                        "kind": kind_of(e.key),
                        "calls": e.count,
                        "self_cpu_s": e.self_cpu_time_total / 1e6,
                    }
                    for e in top
                ],
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
