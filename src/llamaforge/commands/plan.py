"""`llamaforge plan [job.yaml] --gpu 24GB`: full, LoRA or QLoRA on this hardware, with numbers."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="estimate memory, time and cost of full / LoRA / QLoRA fine-tuning and recommend one",
        description="Estimate per-device memory (weights, gradients, optimizer, activations with and without "
        "gradient checkpointing, logits) under DDP, FSDP and ZeRO-3, the largest batch and sequence "
        "that fit, time per epoch and cost, for full fine-tuning, LoRA and QLoRA.",
        epilog="Examples: llamaforge plan --model llama3-8b --gpu 24GB\n"
        "          llamaforge plan job.yaml --gpu A100-80GB --gpus 8 --model llama3-70b --price-per-gpu-hour 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job", nargs="?", help="job file (its model, batch, sequence length, LoRA settings, data)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the job")
    p.add_argument(
        "--gpu",
        help="memory per GPU (24GB) or a GPU name (A100-80GB, H100, RTX4090, L4...); "
        "default: this machine's CPU and RAM",
    )
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (data parallel / sharded)")
    p.add_argument(
        "--model",
        help="llama3-8b, llama3-70b, llama3-405b, llama3.2-1b, llama3.2-3b, smollm2-135m, "
        "a config.json or a model folder (default: the job's model)",
    )
    p.add_argument("--batch-size", type=int, help="micro-batch per device (default: train.batch_size)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: data.max_length)")
    p.add_argument(
        "--tokens", type=float, help="training tokens per epoch (default: estimated from the job's data)"
    )
    p.add_argument("--epochs", type=float, help="default: train.epochs")
    p.add_argument("--price-per-gpu-hour", type=float, help="price of one GPU (or of this machine) per hour")
    p.add_argument(
        "--gpu-tflops", type=float, help="bf16 dense TFLOP/s of one GPU (default: from --gpu's name)"
    )
    p.add_argument("--mfu", type=float, help="assumed model FLOPs utilisation (default 0.40 GPU, 0.30 CPU)")
    p.add_argument(
        "--tokens-per-second",
        type=float,
        help="a measured training throughput (tokens/s, for every method) instead of the FLOPs model",
    )
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    p.add_argument(
        "--weights-dtype",
        choices=["float32", "bfloat16"],
        help="dtype of the base weights (default: bf16 on GPU for LoRA/QLoRA, fp32 master for full)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from llamaforge.config import load_config
    from llamaforge.errors import ConfigError
    from llamaforge.planning.arch import load_arch
    from llamaforge.planning.data_tokens import job_tokens
    from llamaforge.planning.plan import (
        base_setup,
        cpu_hardware,
        gpu_hardware,
        job_overrides,
        make_plan,
        weights_dtypes,
    )
    from llamaforge.planning.render import render

    if args.gpus < 1:
        raise ConfigError("--gpus must be at least 1")
    job, overrides = args.job, list(args.overrides)
    if job and "=" in job and not job.endswith((".yaml", ".yml")):
        job, overrides = None, [job, *overrides]  # `llamaforge plan train.batch_size=8`
    config = load_config(job, overrides)
    arch = load_arch(args.model or _arch_spec(config.model.source))
    hw = (
        gpu_hardware(args.gpu, args.gpus, args.gpu_tflops)
        if args.gpu
        else cpu_hardware(config.train.precision)
    )
    base = base_setup(
        config,
        device=hw.device,
        batch=args.batch_size,
        seq=args.seq_len,
        optimizer=args.optimizer,
        precision=hw.precision if hw.device == "cpu" else None,
    )
    if args.tokens:
        tokens, note = args.tokens, "given"
    else:
        tokens, note = job_tokens(config)
    plan = make_plan(
        arch,
        base,
        hw,
        dtypes=weights_dtypes(config, hw.device, args.weights_dtype),
        tokens=tokens,
        tokens_note=note,
        epochs=args.epochs or config.train.epochs,
        price=args.price_per_gpu_hour,
        mfu=args.mfu,
        tokens_per_second=args.tokens_per_second,
    )
    plan["recommendation"]["overrides"] = job_overrides(plan, config)
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return 0


def _arch_spec(source: str) -> str:
    """The job's model source as an architecture: a shipped name, or a local folder's config.json."""
    from llamaforge.planning.arch import alias, shipped_archs

    if alias(source) or source in shipped_archs():
        return alias(source) or source
    from llamaforge import catalog

    if source in catalog.CATALOG:
        folder = catalog.entry_dir(source) / "hf"
        if (folder / "config.json").is_file():
            return str(folder)
    return source  # a folder or config.json; load_arch explains what else it accepts
