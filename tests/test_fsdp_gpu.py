"""Sharded training on CUDA GPUs through `accelerate launch` and the example configs: FSDP2, QLoRA +
FSDP2 (bf16 quant storage), DeepSpeed ZeRO-2 and ZeRO-3. Prepared for the GPU check
(bench/gpu_check.sh, part `distributed`); skipped with the reason without CUDA or DeepSpeed.

Every GPU of the machine takes part (one process each; a single GPU still runs the sharding and
gathering code with one shard). Each case trains 4 steps of a tiny Llama and checks what the CPU
tests cannot: the launch runs to the end, the losses are finite and fall, the saved adapter holds
whole LoRA tensors (rank x width, not shards, not empty ZeRO-3 placeholders) and the FSDP / ZeRO
cases agree with one unsharded process on the first step's loss (bf16: 2e-2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_qlora
from conftest import chat_rows, step_losses, write_jsonl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA GPUs (run bench/gpu_check.sh there)"
    ),
]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
tiny64_dir = test_qlora.tiny64_dir  # 64-wide layers, as bitsandbytes needs


def write_job(folder: Path, model_dir: Path, qlora: bool) -> Path:
    data = write_jsonl(folder / "data.jsonl", chat_rows(32))
    method = "{name: qlora, rank: 8, dropout: 0}" if qlora else "{rank: 8, dropout: 0}"
    quant = ", quantization: 4bit, quantization_backend: bitsandbytes" if qlora else ""
    job = folder / "job.yaml"
    job.write_text(
        f"model: {{source: {model_dir}{quant}}}\n"
        f"data: {{sources: [{{path: {data}}}], template: llama3, val_size: 4}}\n"
        f"method: {method}\n"
        "train: {batch_size: 2, grad_accum: 1, max_steps: 4, lr: 0.01, warmup_ratio: 0, precision: bf16,"
        " save_every: 2, scheduler: constant}\n"
        "eval: {before_after: true, prompts: [Say hello], max_new_tokens: 4}\n"
        f"output: {{dir: {folder / 'runs'}}}\n"
    )
    return job


def launch(config: str | None, job: Path, name: str) -> Path:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    gpus = torch.cuda.device_count() if config else 1
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus)]
    cmd += ["--config_file", str(EXAMPLES / f"{config}.yaml")] if config else ["--num_machines", "1"]
    cmd += ["-m", "llamaforge.cli", "train", str(job), f"output.name={name}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=job.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return job.parent / "runs" / name


@pytest.mark.parametrize(
    "config, qlora",
    [("fsdp", False), ("fsdp_qlora", True), ("deepspeed_zero2", False), ("deepspeed_zero3", False)],
)
def test_a_sharded_launch_trains_and_saves_whole_adapters(config, qlora, tmp_path, tiny64_dir):
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    job = write_job(tmp_path, tiny64_dir, qlora)
    run = launch(config, job, config)
    losses = step_losses(run)
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]
    from safetensors.torch import load_file

    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapter
    for key, tensor in adapter.items():
        assert tensor.numel() > 0 and torch.isfinite(tensor.float()).all(), key
        assert 8 in tensor.shape and min(tensor.shape) == 8, (key, tuple(tensor.shape))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["answers"]  # generation ran through the shards on every process
    reference = step_losses(launch(None, job, f"{config}-single"))
    assert losses[0] == pytest.approx(reference[0], abs=2e-2)
