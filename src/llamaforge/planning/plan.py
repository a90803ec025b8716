"""Full fine-tuning, LoRA or QLoRA on this hardware? Memory, time and cost, with a recommendation.

The pieces live beside it in `llamaforge.planning`: `arch` (shapes, parameter counts), `activations` (what
autograd keeps per layer), `memory` (peak per device, DDP / FSDP / ZeRO-3), `throughput` (FLOPs,
GPU rates, time), `data_tokens` (a job's token count). This module puts them together for one
model, one job and one machine, and returns the answer as a dict (`render.py` draws the table).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from llamaforge.errors import ConfigError
from llamaforge.planning.arch import Arch
from llamaforge.planning.memory import METHODS, GiB, Setup, estimate, largest_fitting
from llamaforge.planning.throughput import (
    DEFAULT_MFU,
    QLORA_SLOWDOWN,
    find_gpu,
    flops_per_token,
    representative_gpu,
)

FULL_TOKENS = 100e6  # below this, adapters are the better bet even when full fine-tuning fits


@dataclass
class Hardware:
    device: str  # "cuda" | "cpu"
    memory_gib: float  # per device
    gpus: int
    name: str
    tflops: float  # dense matmul rate per device in `precision` (bf16 on GPUs)
    note: str = ""
    precision: str = "bf16"

    @property
    def capacity(self) -> float:
        return self.memory_gib * GiB


def parse_memory(text: str) -> float | None:
    """'24GB', '24GiB', '24G', '24' -> 24.0 (GPU 'GB' are GiB: a 24GB card has 24 GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(g|gb|gib)?\s*", text, re.IGNORECASE)
    return float(match.group(1)) if match else None


def available_ram_gib() -> float:
    """Memory this process can still take (MemAvailable, capped by a cgroup limit), in GiB: the same
    reading `batch_size: auto` plans with."""
    from llamaforge.hardware import available_memory_bytes

    return available_memory_bytes() / GiB


def cpu_hardware(precision: str = "auto") -> Hardware:
    """This CPU, at the precision the job would resolve to here (bf16 is ~100x slower than fp32 on
    CPUs without bf16 instructions), with that dtype's measured matmul peak."""
    import torch

    from llamaforge.device import choose_precision
    from llamaforge.hardware import peak_flops, usable_cores

    available = available_ram_gib()
    choice = choose_precision(precision, torch.device("cpu"))
    rate = peak_flops(choice.precision, seconds=0.5)
    note = (
        f"{choice.line()}; measured {choice.precision} matmul peak {rate / 1e9:.0f} GFLOP/s (best of bursts)"
    )
    load, cores = os.getloadavg()[0], usable_cores()
    if load > cores:
        note += f"; the CPU is busy now (load {load:.1f} on {cores} cores), so this rate is low"
    return Hardware(
        "cpu", available or 8.0, 1, f"this CPU ({cores} cores)", rate / 1e12, note, precision=choice.precision
    )


def gpu_hardware(gpu: str, gpus: int = 1, tflops: float | None = None) -> Hardware:
    """From '24GB' (memory only) or a GPU name ('A100-80GB', 'H100', 'RTX4090', 'L4')."""
    known = find_gpu(gpu)
    memory = known.memory_gib if known else parse_memory(gpu)
    if memory is None:
        raise ConfigError(f"--gpu '{gpu}': give a memory size like 24GB or a GPU name ({_gpu_names()})")
    if known:
        return Hardware(
            "cuda",
            memory,
            gpus,
            known.name,
            tflops or known.bf16_tflops,
            "" if tflops else f"{known.name} data-sheet bf16 rate",
        )
    if tflops:
        return Hardware("cuda", memory, gpus, f"{memory:g} GiB GPU", tflops, "given bf16 rate")
    rep = representative_gpu(memory)
    return Hardware(
        "cuda",
        memory,
        gpus,
        f"{memory:g} GiB GPU",
        rep.bf16_tflops,
        f"time assumes {rep.name}'s {rep.bf16_tflops:g} TFLOP/s; set --gpu NAME or --gpu-tflops",
    )


def _gpu_names() -> str:
    from llamaforge.planning.throughput import GPUS

    return ", ".join(g.name for g in GPUS.values())


def base_setup(
    config,
    *,
    device: str,
    batch: int | None = None,
    seq: int | None = None,
    optimizer: str = "adamw",
    precision: str | None = None,
) -> Setup:
    """The job's training settings (batch, sequence, LoRA rank/targets/dropout, loss chunk)."""
    targets = config.method.targets
    return Setup(
        method="lora",
        batch=batch or fixed_batch_size(config.train),
        seq=seq or config.data.max_length,
        checkpointing=config.train.gradient_checkpointing is True,
        loss_chunk=config.train.loss_chunk_size,
        precision=precision or {"auto": "bf16"}.get(config.train.precision, config.train.precision),
        rank=config.method.rank,
        targets=tuple(targets) if isinstance(targets, list) else targets,
        dropout=config.method.dropout,
        optimizer=optimizer,
        device=device,
        modules_to_save=tuple(config.method.modules_to_save),
        objective=config.method.objective,
        precompute_reference=config.method.precompute_reference,
    )


def fixed_batch_size(train) -> int:
    """The job's micro-batch; with `batch_size: auto` the whole effective batch (the recipe then picks
    the micro-batch that fits, see planning/autobatch.py)."""
    return train.target_effective_batch() if train.batch_size == "auto" else train.batch_size


def weights_dtypes(config, device: str, override: str | None = None) -> dict[str, str]:
    """Base-weight dtype per method. Full keeps fp32 master weights (mixed precision) unless bf16 is
    asked for. LoRA's base is bf16 on a GPU unless the job sets model.dtype (on CPU: the job's).
    QLoRA: peft's prepare_model_for_kbit_training (our recipe) upcasts every non-4-bit weight to fp32."""
    explicit = override or (config.model.dtype if "dtype" in config.model.model_fields_set else None)
    lora = explicit or ("bfloat16" if device == "cuda" else config.model.dtype)
    return {"full": "bfloat16" if explicit == "bfloat16" else "float32", "lora": lora, "qlora": "float32"}


def job_overrides(plan: dict, config) -> list[str]:
    """The job changes that make `llamaforge train` run what the plan recommends."""
    rec = plan["recommendation"]
    if not rec["method"]:
        return []
    out = []
    if config.method.name != rec["method"]:
        out.append(f"method.name={rec['method']}")
    dtype = plan["methods"][rec["method"]]["weights_dtype"]
    if rec["method"] == "lora" and config.model.dtype != dtype:
        out.append(f"model.dtype={dtype}")
    if rec["checkpointing"] != (config.train.gradient_checkpointing is True):
        out.append(f"train.gradient_checkpointing={str(rec['checkpointing']).lower()}")
    if plan["settings"]["batch_size"] != config.train.batch_size:
        out.append(f"train.batch_size={plan['settings']['batch_size']}")
    if plan["settings"]["seq_len"] != config.data.max_length:
        out.append(f"data.max_length={plan['settings']['seq_len']}")
    return out


def _min_gpus(arch: Arch, setup: Setup, capacity: float) -> int | None:
    """Fewest GPUs for which FSDP full-shard fits, None if more than 4096 would be needed."""
    if estimate(arch, setup, strategy="fsdp", gpus=1).peak <= capacity:
        return 1
    lo, hi = 1, 2
    while estimate(arch, setup, strategy="fsdp", gpus=hi).peak > capacity:
        lo, hi = hi, hi * 2
        if hi > 4096:
            return None
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if estimate(arch, setup, strategy="fsdp", gpus=mid).peak <= capacity:
            hi = mid
        else:
            lo = mid
    return hi


def _g(x: float) -> float:
    return round(x / GiB, 2)


def make_plan(
    arch: Arch,
    base: Setup,
    hw: Hardware,
    *,
    dtypes: dict[str, str],
    tokens: float | None = None,
    tokens_note: str = "",
    epochs: float = 1.0,
    price: float | None = None,
    mfu: float | None = None,
    tokens_per_second: float | None = None,
) -> dict:
    strategies = ["ddp"] if hw.gpus == 1 or hw.device == "cpu" else ["ddp", "fsdp", "zero3"]
    mfu = mfu or DEFAULT_MFU[hw.device]
    methods: dict[str, dict] = {}
    for method in METHODS:
        rows = []
        for ckpt in (False, True):
            setup = base.with_(method=method, checkpointing=ckpt, weights_dtype=dtypes[method])
            ests = {s: estimate(arch, setup, strategy=s, gpus=hw.gpus) for s in strategies}
            fitting = [s for s in strategies if ests[s].peak <= hw.capacity]
            best = min(strategies, key=lambda s: ests[s].peak)
            e = ests["ddp"]
            row = {
                "checkpointing": ckpt,
                "weights_gib": _g(e.weights),
                "gradients_gib": _g(e.gradients),
                "optimizer_gib": _g(e.optimizer),
                "weight_copies_gib": _g(e.weight_copies),
                "activations_gib": _g(e.activations),
                "logits_gib": _g(e.logits),
                "optimizer_temp_gib": _g(e.optimizer_temp),
                "overhead_gib": _g(e.overhead),
                "peak_phase": e.peak_phase,
                "peak_gib": {s: _g(ests[s].peak) for s in strategies},
                "fits": fitting,
                "best_strategy": best,
                "max_batch": largest_fitting(
                    arch, setup, hw.capacity, what="batch", strategy=best, gpus=hw.gpus
                ),
                "max_seq": largest_fitting(arch, setup, hw.capacity, what="seq", strategy=best, gpus=hw.gpus),
            }
            if hw.device == "cuda":
                row["min_gpus_fsdp"] = _min_gpus(arch, setup, hw.capacity)
            rows.append(row)
        trainable = estimate(arch, base.with_(method=method, weights_dtype=dtypes[method])).trainable_params
        methods[method] = {"weights_dtype": dtypes[method], "trainable_params": trainable, "rows": rows}

    timing = {}
    for method, info in methods.items():
        row = next((r for r in info["rows"] if r["fits"]), info["rows"][1])
        fpt = flops_per_token(
            arch,
            method,
            base.seq,
            checkpointing=row["checkpointing"],
            adapter_params=0 if method == "full" else info["trainable_params"],
            objective=base.objective,
            precompute_reference=base.precompute_reference,
        )
        m = mfu * (QLORA_SLOWDOWN if method == "qlora" else 1.0)
        rate = hw.tflops * 1e12
        tps = tokens_per_second or rate * m * hw.gpus / fpt
        entry = {
            "checkpointing": row["checkpointing"],
            "flops_per_token": fpt,
            "mfu": round(m, 3),
            "tokens_per_second": round(tps, 1),
        }
        if tokens:
            seconds = tokens / tps
            entry.update(epoch_hours=round(seconds / 3600, 6), total_hours=round(seconds * epochs / 3600, 6))
            if price is not None:
                entry["cost"] = round(seconds * epochs / 3600 * price * hw.gpus, 2)
        timing[method] = entry
    plan = {
        "model": arch.to_dict(),
        "hardware": {
            "device": hw.device,
            "name": hw.name,
            "memory_gib": hw.memory_gib,
            "count": hw.gpus,
            "tflops": round(hw.tflops, 3),
            "precision": hw.precision,
            "note": hw.note,
        },
        "settings": {
            "batch_size": base.batch,
            "seq_len": base.seq,
            "loss_chunk_size": base.loss_chunk,
            "precision": base.precision,
            "lora_rank": base.rank,
            "lora_targets": base.targets,
            "lora_dropout": base.dropout,
            "optimizer": base.optimizer,
            "strategies": strategies,
        },
        "data": {
            "tokens_per_epoch": tokens,
            "epochs": epochs,
            "note": tokens_note,
            "price_per_gpu_hour": price,
        },
        "methods": methods,
        "time": timing,
        "unit": "GiB",
    }
    plan["recommendation"] = recommend(plan, hw, tokens)
    plan["assumptions"] = assumptions(hw, base)
    return plan


def recommend(plan: dict, hw: Hardware, tokens: float | None) -> dict:
    methods, cap = plan["methods"], hw.memory_gib
    where = f"{hw.gpus} x {cap:g} GiB" if hw.device == "cuda" else f"{cap:.0f} GiB of RAM"

    def first_fit(method):
        return next((r for r in methods[method]["rows"] if r["fits"]), None)

    def peak(method, ckpt=True):
        r = methods[method]["rows"][1 if ckpt else 0]
        return min(r["peak_gib"].values())

    def choice(method, row, reason):
        strategy = "ddp" if "ddp" in row["fits"] else row["fits"][0]
        return {
            "method": method,
            "checkpointing": row["checkpointing"],
            "strategy": strategy,
            "peak_gib": row["peak_gib"][strategy],
            "reason": reason,
        }

    full, lora, qlora = first_fit("full"), first_fit("lora"), first_fit("qlora")
    ck = " with gradient checkpointing"
    if full and tokens and tokens >= FULL_TOKENS:
        return choice(
            "full",
            full,
            f"full fine-tuning fits{ck if full['checkpointing'] else ''} "
            f"({full['peak_gib'][full['fits'][0]]:.1f} of {cap:g} GiB) and {tokens / 1e6:.0f}M tokens "
            "are enough to move all the weights",
        )
    if lora:
        amount = f"{tokens / 1e6:.1f}M tokens" if tokens else "a fine-tuning-sized data set"
        other = (
            f"full fine-tuning fits too, but on {amount} adapters train faster and overfit less"
            if full
            else f"full fine-tuning needs {peak('full'):.1f} GiB per device"
        )
        return choice(
            "lora",
            lora,
            f"LoRA fits{ck if lora['checkpointing'] else ''} in {where} "
            f"({lora['peak_gib'][lora['fits'][0]]:.1f} GiB); {other}",
        )
    if qlora:
        return choice(
            "qlora",
            qlora,
            f"the {methods['lora']['weights_dtype']} base of LoRA needs {peak('lora'):.1f} "
            f"GiB; QLoRA's 4-bit base fits{ck if qlora['checkpointing'] else ''} "
            f"({qlora['peak_gib'][qlora['fits'][0]]:.1f} of {cap:g} GiB)",
        )
    row = methods["qlora"]["rows"][1]
    need = row.get("min_gpus_fsdp")
    more = (
        f"QLoRA needs {peak('qlora'):.1f} GiB at batch {plan['settings']['batch_size']} x "
        f"{plan['settings']['seq_len']}"
    )
    if row["max_batch"] == 0 and row["max_seq"]:
        more += f"; it fits at batch 1 up to seq {row['max_seq']}"
    if need:
        more += f"; LoRA/QLoRA with FSDP over {need}+ GPUs of this size"
    return {
        "method": None,
        "checkpointing": True,
        "strategy": None,
        "peak_gib": None,
        "reason": f"nothing fits {where}: {more}",
    }


def assumptions(hw: Hardware, base: Setup) -> list[str]:
    out = [
        f"peak of a steady-state step: forward ({base.precision}{' autocast' if base.precision != 'fp32' else ''}), "
        "chunked cross-entropy "
        f"({base.loss_chunk} tokens a chunk, recomputed in backward), backward, AdamW step",
        "activations: per-layer bill of tensors saved for backward, Llama + SDPA without a mask "
        "(packed or unpadded batches); see llamaforge/planning/activations.py",
        "AdamW states in the parameter dtype (fp32 for fp32 master weights); adapters kept in fp32 by peft",
        "QLoRA: NF4 with double quantisation (0.516 bytes/param) for the decoder linears, bf16 compute; "
        "embeddings, lm_head and norms in fp32 (peft's prepare_model_for_kbit_training)",
        "FSDP: full shard of all parameters, per-layer units, root (embeddings, lm_head) gathered; "
        "ZeRO-3: DeepSpeed's 18 bytes per trainable parameter / GPUs + 4 x the largest layer",
    ]
    if hw.device == "cuda":
        out.append(
            "CUDA: +0.6 GiB context, +5% allocator fragmentation, +0.5 GiB NCCL with several GPUs; "
            "torch's default foreach AdamW holds one extra copy of the states at the step "
            "(fused=True avoids it)"
        )
        out.append(
            "time: 6N (full) / 4N + adapter (LoRA) FLOPs per token + attention, at the stated MFU "
            "(QLoRA x0.7 for dequantisation)"
        )
    else:
        out.append(
            "CPU: the peak is resident memory added by training, with the allocator's slack "
            "(jemalloc x1.1; glibc malloc x1.8 with train.release_memory step, x1.2 eager, x2.7 off)"
        )
    return out
