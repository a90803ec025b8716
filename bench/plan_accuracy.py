"""How close is `llamaforge plan` to the real peak memory of a training step? (CPU here)

For each configuration a fresh subprocess builds the model, runs a tiny first step (it allocates
the AdamW state) and then one steady-state step at full size: forward under autocast in the machine's
precision (`--precision auto`: what `llamaforge train` resolves here; bf16 only where it is fast), chunked
cross-entropy, backward, gradient clipping, AdamW step, zero_grad. The method is attached and the
loss computed by the training recipe's own code (llamaforge.train.adapters / losses: peft LoRA,
prepare_model_for_kbit_training for QLoRA, each loss chunk recomputed in backward), with a plain
peft + checkpointed-chunk fallback when that package is absent. The parent compares the step's
peak with the planner's estimate for the same setup.

What is measured, and why it is accurate: peak resident memory (VmHWM in /proc/self/status) minus
the resident memory just before the model was built. The child first runs a throw-away step on a
tiny model, so that the libraries' one-off allocations (oneDNN kernels, thread pools) are in the
baseline, and resets the high-water mark (`echo 5 > /proc/self/clear_refs`) after the first step,
so neither loading nor the first step's transients count. It runs with MALLOC_MMAP_THRESHOLD_=65536:
every tensor above 64 KiB is its own mmap, returned to the system when freed, so RSS follows the
live tensors (glibc's adaptive threshold would keep freed blocks in the heap and inflate RSS).
A torch.profiler memory trace of one configuration put the tensor-level peak at the same moment
(log-softmax backward of the first loss chunk) and ~30 MiB below RSS, the malloc arenas and
oneDNN buffers that RSS adds. RSS is what we measure, not time: the CPU is shared with other jobs.

    python bench/plan_accuracy.py            # 11 configurations (~5-10 min on 2 cores)
    python bench/plan_accuracy.py --quick    # the two random models only
    python bench/plan_accuracy.py --fsdp     # FSDP over 2 processes: the larger per-process peak
Writes bench/results/plan_accuracy.json (with the machine record) and prints a table below the machine
line. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

TINY_A = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=32000,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
)
TINY_B = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=32000,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
)
MODELS = {"random-19M": TINY_A, "random-55M": TINY_B, "smollm2-135m": None}

# model, method, gradient checkpointing, base dtype, batch, seq, loss chunk
CONFIGS = [
    ("random-19M", "full", False, "float32", 4, 256, 1024),
    ("random-19M", "full", False, "float32", 4, 256, 256),
    ("random-19M", "lora", False, "float32", 4, 256, 1024),
    ("random-19M", "qlora", False, "float32", 4, 256, 1024),
    ("random-55M", "full", True, "float32", 4, 256, 1024),
    ("random-55M", "lora", True, "float32", 4, 256, 1024),
    ("random-55M", "lora", False, "bfloat16", 4, 256, 256),
    ("random-55M", "qlora", True, "float32", 4, 256, 1024),
    ("smollm2-135m", "full", False, "float32", 4, 256, 1024),
    ("smollm2-135m", "lora", False, "float32", 4, 256, 1024),
    ("smollm2-135m", "qlora", False, "float32", 4, 256, 1024),
]
# FSDP (`--fsdp`): two processes (gloo) shard each model with llamaforge.train.sharded, as
# `ACCELERATE_USE_FSDP=true torchrun --nproc_per_node 2 ... llamaforge train` does; the per-process
# peak (the larger of the two) against the planner's `strategy="fsdp", gpus=2` estimate.
FSDP_CONFIGS = [
    ("random-55M", "full", False, "float32", 4, 256, 1024),
    ("random-55M", "lora", False, "float32", 4, 256, 1024),
]
RANK, TARGETS, DROPOUT = 16, "all-linear", 0.05  # the job defaults


# ------------------------------------------------------------------------------------------ child


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def chunked_cross_entropy(hidden, labels, weight, chunk: int):
    """Fallback when llamaforge.train is absent: sum of token losses, `chunk` tokens at a time, each
    chunk recomputed in backward (labels pre-shifted, -100 = ignored)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def one(h, y, w):
        return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100, reduction="sum")

    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    total = torch.zeros((), dtype=torch.float32)
    for start in range(0, flat_y.numel(), chunk):
        total = total + checkpoint(
            one, flat_h[start : start + chunk], flat_y[start : start + chunk], weight, use_reentrant=False
        )
    return total


def loss_sum(model, ids, chunk: int):
    """The recipe's chunked loss (llamaforge.losses) when it is there, else the fallback above."""
    try:
        from llamaforge.losses import token_loss_sum
    except ImportError:
        import torch

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        hidden = base.model(input_ids=ids, use_cache=False).last_hidden_state
        return chunked_cross_entropy(hidden, labels, base.lm_head.weight, chunk)
    return token_loss_sum(model, {"input_ids": ids, "labels": ids}, chunk_size=chunk)


def attach(model, method: str, ckpt: bool):
    """The recipe's method attachment (llamaforge.train.adapters) when it is there, else plain peft."""
    try:
        from llamaforge.config import MethodConfig
        from llamaforge.train.adapters import attach_method
    except ImportError:
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method == "full":
            return model
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)
        return get_peft_model(
            model,
            LoraConfig(
                r=RANK,
                lora_alpha=2 * RANK,
                lora_dropout=DROPOUT,
                target_modules=TARGETS,
                task_type="CAUSAL_LM",
            ),
        )
    return attach_method(
        model,
        MethodConfig(name=method, rank=RANK, alpha=2 * RANK, dropout=DROPOUT, targets=TARGETS),
        gradient_checkpointing=ckpt,
    )


def build(model_name: str, method: str, dtype_name: str, ckpt: bool, tmp: Path, precision: str):
    import torch
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, dtype_name)
    if MODELS[model_name] is None:
        source = Path(os.environ["PLAN_BENCH_SMOL"])
    else:
        source = tmp / model_name
        if not (source / "config.json").is_file():
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**MODELS[model_name])).save_pretrained(source)
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        )
    model = LlamaForCausalLM.from_pretrained(source, **kwargs)
    # Own every tensor (no views of the mmapped file), as after any real load-and-train.
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            p.data = p.data.clone()
    if method == "qlora":
        from llamaforge.models import keep_4bit_gradients_exact

        keep_4bit_gradients_exact(model)
    model = attach(model, method, ckpt)
    model.train()
    return model


def make_optimizer(model):
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def train_steps(
    model, opt, batch: int, seq: int, chunk: int, steps: int, vocab: int, precision: str, wrapped=None
):
    """`wrapped`: the FSDP-sharded loss module (train/distributed.TokenLoss) to run the loss through."""
    import contextlib

    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            if wrapped is None:
                loss = loss_sum(model, ids, chunk) / (batch * (seq - 1))
            else:
                loss = wrapped({"input_ids": ids, "labels": ids}) / (batch * (seq - 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss


def child(spec: dict) -> dict:
    import gc
    import tempfile

    import torch

    torch.manual_seed(0)
    tmp = Path(spec["tmp"])
    # Warm-up: one step of a tiny model through the same code path, so that library one-offs
    # (oneDNN kernels, thread pools, bitsandbytes) are in the baseline.
    with tempfile.TemporaryDirectory() as wt:
        MODELS["warmup"] = dict(TINY_A, num_hidden_layers=1, vocab_size=512)
        warm = build("warmup", spec["method"], spec["dtype"], spec["ckpt"], Path(wt), spec["precision"])
        train_steps(warm, make_optimizer(warm), 1, 32, 16, 1, 512, spec["precision"])
        del warm
    gc.collect()
    base_rss = _status("VmRSS")
    t0 = time.time()
    model = build(spec["model"], spec["method"], spec["dtype"], spec["ckpt"], tmp, spec["precision"])
    gc.collect()
    loaded = _status("VmRSS") - base_rss
    vocab = model.config.vocab_size
    opt = make_optimizer(model)
    wrapped = None
    if spec.get("world", 1) > 1:  # under torchrun: shard as the recipe does on CPU
        import torch.distributed as dist

        from llamaforge.train.distributed import TokenLoss
        from llamaforge.train.sharded import shard_on_cpu

        dist.init_process_group("gloo")
        wrapped = shard_on_cpu(spec["world"], TokenLoss(model, spec["chunk"]), opt)
        gc.collect()
    train_steps(
        model, opt, 1, 16, spec["chunk"], 1, vocab, spec["precision"], wrapped
    )  # a tiny first step allocates the AdamW state
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    train_steps(
        model, opt, spec["batch"], spec["seq"], spec["chunk"], 1, vocab, spec["precision"], wrapped
    )  # a steady-state step
    peak = _status("VmHWM") - base_rss
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        import llamaforge.losses  # noqa: F401
        import llamaforge.train.adapters  # noqa: F401

        code = "recipe"
    except ImportError:
        code = "fallback"
    return {
        "peak": peak,
        "loaded": loaded,
        "trainable": trainable,
        "seconds": round(time.time() - t0, 1),
        "code": code,
    }


# ----------------------------------------------------------------------------------------- parent


def estimate_for(spec: dict):
    from llamaforge.planning.arch import Arch, load_arch
    from llamaforge.planning.memory import Setup, estimate

    cfg = MODELS[spec["model"]]
    arch = load_arch("smollm2-135m") if cfg is None else Arch.from_config(cfg, spec["model"])
    setup = Setup(
        method=spec["method"],
        batch=spec["batch"],
        seq=spec["seq"],
        checkpointing=spec["ckpt"],
        loss_chunk=spec["chunk"],
        weights_dtype=spec["dtype"],
        precision=spec["precision"],
        rank=RANK,
        targets=TARGETS,
        dropout=DROPOUT,
        device="cpu",
    )
    world = spec.get("world", 1)
    return estimate(arch, setup, strategy="fsdp" if world > 1 else "ddp", gpus=world)


def resolve_default_model() -> str | None:
    """The default model's safetensors folder (fetched and converted once, outside any measurement)."""
    code = "from llamaforge import catalog; print(catalog.resolve('smollm2-135m-instruct'))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=1800,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
    )
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if proc.returncode == 0 and lines else None


def run_one(spec: dict, smol: str | None) -> dict:
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="0",
        PLAN_BENCH_SMOL=smol or "",
        PYTHONWARNINGS="ignore",
        TRANSFORMERS_VERBOSITY="error",
    )
    launcher = [sys.executable]
    if spec.get("world", 1) > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(spec["world"])]
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [*launcher, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    ranks = [json.loads(line) for line in lines]
    return max(ranks, key=lambda r: r["peak"]) | {"ranks_peak": [r["peak"] for r in ranks]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="skip SmolLM2-135M (needs the catalog download)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="autocast of the measured steps; auto: what training resolves on this machine",
    )
    parser.add_argument("--fsdp", action="store_true", help="FSDP over 2 processes (FSDP_CONFIGS)")
    parser.add_argument("--out", default=None, help="default: bench/results/plan_accuracy[_fsdp].json")
    args = parser.parse_args()
    args.out = args.out or str(
        ROOT / "bench" / "results" / f"plan_accuracy{'_fsdp' if args.fsdp else ''}.json"
    )
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    import tempfile

    from machine import describe

    machine = describe(args.precision, peak=False)  # memory, not speed: no peak needed
    print(machine.line(), flush=True)
    smol = None if args.quick or args.fsdp else resolve_default_model()
    rows = []
    MiB = 1024**2
    header = (
        f"{'model':14} {'method':6} {'ckpt':4} {'base':8} {'b x s':8} {'chunk':5} "
        f"{'measured MiB':>12} {'estimate MiB':>12} {'error':>7}  peak phase (est.)"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for model, method, ckpt, dtype, batch, seq, chunk in FSDP_CONFIGS if args.fsdp else CONFIGS:
            if args.quick and MODELS[model] is None:
                continue
            spec = dict(
                model=model,
                method=method,
                ckpt=ckpt,
                dtype=dtype,
                batch=batch,
                seq=seq,
                chunk=chunk,
                tmp=tmp,
                precision=machine.precision,
                world=2 if args.fsdp else 1,
            )
            est = estimate_for(spec)
            if MODELS[model] is None and smol is None:
                print(f"{model:14} {method:6} skipped: the default model could not be fetched (offline?)")
                continue
            got = run_one(spec, smol)
            row = {k: v for k, v in spec.items() if k != "tmp"}
            row.update(
                estimate=est.peak,
                estimate_phase=est.peak_phase,
                estimate_phases={k: round(v) for k, v in est.phases.items()},
                **got,
            )
            if "peak" in got:
                row["error"] = (est.peak - got["peak"]) / got["peak"]
                print(
                    f"{model:14} {method:6} {'yes' if ckpt else 'no':4} {dtype:8} {f'{batch}x{seq}':8} {chunk:5} "
                    f"{got['peak'] / MiB:12.0f} {est.peak / MiB:12.0f} {row['error']:+7.1%}  {est.peak_phase}",
                    flush=True,
                )
            else:
                print(f"{model:14} {method:6} failed: {got.get('error')}", flush=True)
            rows.append(row)
    ok = [r for r in rows if isinstance(r.get("error"), float)]
    if ok:
        worst = max(abs(r["error"]) for r in ok)
        within = sum(abs(r["error"]) <= 0.15 for r in ok)
        print(
            f"\n{within}/{len(ok)} within 15% of the measured peak; worst {worst:.1%}; "
            f"mean |error| {sum(abs(r['error']) for r in ok) / len(ok):.1%}"
        )
        codes = sorted({r.get("code", "?") for r in ok})
        print(
            "training step code: "
            + ", ".join(
                "the recipe's (llamaforge.train.adapters, losses)"
                if c == "recipe"
                else "the bench's fallback"
                for c in codes
            )
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"device": "cpu", "machine": machine.record(), "measure": "VmHWM - baseline RSS", "rows": rows},
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
