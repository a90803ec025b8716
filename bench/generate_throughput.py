"""Generation throughput for evaluation: output tokens/s at batch 1 vs batched, on the default model.

Runs the exact path `llamaforge eval` uses (`llamaforge.evaluate.runner.generate_outputs`: prompts
sorted by length, left-padded batches, greedy, the template's stop tokens) on the first N instructions
of the alpaca demo set (catalog `alpaca-demo`), once per batch size, with the same prompts each time.
Output tokens are the generated answers re-tokenized (stop tokens excluded): rows of a batch that stop
early cost time but add no tokens, so the batched numbers are honest. The target on the 2-core CPU is
>= 3x from batching. Writes bench/results/generate_throughput.json. Never asserts on time; the load
average is recorded because the CPU may be shared.

    python bench/generate_throughput.py [--prompts 16] [--max-new-tokens 64] [--batch-sizes 1 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--out", default=str(HERE / "results" / "generate_throughput.json"))
    args = parser.parse_args()

    import torch

    from llamaforge.catalog import resolve
    from llamaforge.data.formats import read_source
    from llamaforge.data.types import Conversation
    from llamaforge.evaluate.runner import GenerationSettings, generate_outputs
    from llamaforge.models import load_model
    from llamaforge.templates import get_template
    from machine import describe

    machine = describe(args.precision)
    print(machine.line(), flush=True)
    convs = [c for c in read_source(resolve("alpaca-demo"), "alpaca") if isinstance(c, Conversation)]
    prompts = [c.messages[:-1] for c in convs[: args.prompts]]
    model, tokenizer = load_model(args.model)
    template = get_template("auto", tokenizer)
    warm = GenerationSettings(max_new_tokens=4, batch_size=2, precision=args.precision)
    generate_outputs(model, tokenizer, template, prompts[:2], warm, desc="warm-up")

    rows = []
    for bs in args.batch_sizes:
        settings = GenerationSettings(
            max_new_tokens=args.max_new_tokens, batch_size=bs, precision=args.precision
        )
        load_before = os.getloadavg()[0]
        outputs, stats = generate_outputs(model, tokenizer, template, prompts, settings, desc=f"batch {bs}")
        tokens = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
        rows.append(
            {
                "batch_size": bs,
                "output_tokens": tokens,
                **stats,
                "load_avg_1m_before": round(load_before, 2),
                "load_avg_1m_after": round(os.getloadavg()[0], 2),
            }
        )
    base = rows[0]["output_tokens_per_s"] if rows[0]["batch_size"] == 1 else None
    for row in rows:
        row["speedup_vs_batch1"] = round(row["output_tokens_per_s"] / base, 2) if base else None

    print(f"\n{machine.line()}")
    print(
        f"{args.model}: {len(prompts)} prompts, max_new_tokens={args.max_new_tokens}, greedy, "
        f"precision={machine.precision}, torch threads={torch.get_num_threads()}"
    )
    print(
        f"{'batch':>5} {'out tokens':>10} {'seconds':>8} {'tok/s':>8} {'ex/s':>7} {'speedup':>8} {'load':>5}"
    )
    for r in rows:
        print(
            f"{r['batch_size']:>5} {r['output_tokens']:>10} {r['generate_seconds']:>8.1f} "
            f"{r['output_tokens_per_s']:>8.1f} {r['examples_per_s']:>7.2f} {r['speedup_vs_batch1'] or '-':>8} "
            f"{r['load_avg_1m_after']:>5}"
        )
    best = max(rows, key=lambda r: r["output_tokens_per_s"])
    result = {
        "benchmark": "generate_throughput",
        "model": args.model,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "precision": machine.precision,
        "decoding": "greedy",
        "rows": rows,
        "best_batch_size": best["batch_size"],
        "best_speedup_vs_batch1": best["speedup_vs_batch1"],
        "target_speedup": 3.0,
        "machine": {**machine.record(), "cuda": torch.cuda.is_available(), "platform": platform.platform()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        f"\nbest: batch {best['batch_size']} at {best['speedup_vs_batch1']}x batch 1 (target >= 3x); wrote {out}"
    )


if __name__ == "__main__":
    main()
