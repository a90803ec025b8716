"""A LoRA or QLoRA training step on a random-init Llama-3-8B-shaped model on one CUDA GPU.

Reports target tokens/s over timed steps (after warm-up steps), MFU against the GPU's bf16 data-sheet
peak and against a measured best-of-bursts matmul peak, and the peak GPU memory against the planner's
estimate for the same setup (llamaforge.planning.memory.estimate, what `llamaforge plan` prints). The
step is the recipe's: llamaforge.train.adapters.attach_method (peft; prepare_model_for_kbit_training for
QLoRA), the chunked token loss, AdamW over the adapter, bf16 autocast over bf16 base weights.

QLoRA loads through transformers' bitsandbytes path with llamaforge's own quantization config (NF4,
double quantization, bf16 compute), from a random model saved once to --model-dir (about 16 GB).

    python bench/gpu_step.py --method lora --out lora.json
    python bench/gpu_step.py --method qlora --out qlora.json
Run by bench/gpu_check.sh; one method per process (clean peak memory).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity), TFLOP/s.
DATASHEET_BF16_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "A10": 125.0,
    "L4": 121.0,
}


def datasheet_peak(name: str) -> float | None:
    for key, tflops in DATASHEET_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def build_random(model_dir: Path) -> None:
    """The random bf16 8B-shaped model, built on the GPU and saved once (QLoRA quantises it on load)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (model_dir / "config.json").is_file():
        return
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B, dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()


def load(method: str, model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from llamaforge.models import _quantization_config, keep_4bit_gradients_exact

    if method == "qlora":
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=torch.bfloat16,
            quantization_config=_quantization_config("4bit", torch.bfloat16),
            attn_implementation="sdpa",
            device_map={"": 0},
        )
        keep_4bit_gradients_exact(model)
        return model
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA3_8B, attn_implementation="sdpa")).to(torch.bfloat16)


def model_flops(trainable: int, batch: int, seq: int) -> float:
    """Useful FLOPs of one LoRA step (frozen base: no weight gradients, activation gradients flow)."""
    c = LLAMA3_8B
    d, ff, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head = d // c["num_attention_heads"]
    dq, dkv = c["num_attention_heads"] * head, c["num_key_value_heads"] * head
    n_linear = layers * (d * dq + 2 * d * dkv + dq * d + 3 * d * ff)
    tokens, targets = batch * seq, batch * (seq - 1)
    return (
        4 * n_linear * tokens
        + 4 * vocab * d * targets
        + 6 * trainable * tokens
        + 6 * layers * dq * batch * seq * (seq + 1)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["lora", "qlora"], required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--model-dir", default="/tmp/llama3-8b-random")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import torch

    from llamaforge.config import MethodConfig
    from llamaforge.losses import token_loss_sum
    from llamaforge.planning.arch import Arch
    from llamaforge.planning.memory import Setup, estimate
    from llamaforge.train.adapters import attach_method
    from machine import describe

    out = Path(a.out)
    result: dict = {"method": a.method, "batch": a.batch, "seq": a.seq, "rank": a.rank, "status": "started"}

    def write() -> None:
        out.write_text(json.dumps(result, indent=2))

    write()
    machine = describe("auto", peak_seconds=1.0)
    print(machine.line(), flush=True)
    result["machine"] = machine.record()
    name = torch.cuda.get_device_name()
    sheet = datasheet_peak(name)
    result["datasheet_bf16_tflops"] = sheet / 1e12 if sheet else None
    write()

    if a.method == "qlora":
        t0 = time.perf_counter()
        build_random(Path(a.model_dir))
        result["build_and_save_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    model = load(a.method, Path(a.model_dir))
    model = attach_method(
        model, MethodConfig(name=a.method, rank=a.rank, alpha=2 * a.rank, dropout=0.05, targets="all-linear")
    )
    model.train()
    result["load_seconds"] = round(time.perf_counter() - t0, 1)
    params = [q for q in model.parameters() if q.requires_grad]
    trainable = sum(q.numel() for q in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, LLAMA3_8B["vocab_size"], (a.batch, a.seq), device="cuda", generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    targets = a.batch * (a.seq - 1)

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = token_loss_sum(model, batch) / targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    losses = [step() for _ in range(a.warmup_steps)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses += [step() for _ in range(a.steps)]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()

    arch = Arch.from_config(LLAMA3_8B, "llama3-8b-shaped")
    setup = Setup(
        method=a.method,
        batch=a.batch,
        seq=a.seq,
        checkpointing=False,
        weights_dtype="bfloat16",
        precision="bf16",
        rank=a.rank,
        targets="all-linear",
        dropout=0.05,
        device="cuda",
    )
    planned = estimate(arch, setup)
    flops = model_flops(trainable, a.batch, a.seq) * a.steps
    result.update(
        status="ok",
        gpu=name,
        trainable_params=trainable,
        timed_steps=a.steps,
        step_seconds=round(seconds / a.steps, 3),
        tokens_per_s=round(a.batch * a.seq * a.steps / seconds, 1),
        target_tokens_per_s=round(targets * a.steps / seconds, 1),
        losses=[round(x, 4) for x in losses],
        mfu_vs_datasheet=round(flops / seconds / sheet, 4) if sheet else None,
        mfu_vs_measured_peak=round(flops / seconds / (machine.peak_gflops * 1e9), 4),
        peak_memory_gib=round(peak / 2**30, 2),
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
        plan_estimate_gib=round(planned.peak / 2**30, 2),
        plan_peak_phase=planned.peak_phase,
        plan_error=round((planned.peak - peak) / peak, 4),
    )
    write()
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
