"""FSDP (torch FSDP2) on CPU with gloo: two processes with sharded weights train like one process.

accelerate 1.15 turns `ACCELERATE_USE_FSDP=true` into FSDP only on GPU launches (a CPU launch would
silently train with DDP), so on CPU the recipe shards with `fully_shard` itself (train/sharded.py).
Evaluation, generation samples, the best and step checkpoints, resume and the final adapter / model
must all work through the shards: each gathers the full state (torch.distributed.checkpoint's
state-dict API). The fast test shards in this process (a one-process gloo group); the slow ones
launch two processes with torchrun.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_rows, step_losses, write_jsonl
from torchrun import torchrun_train

TOL = 1e-5  # float32 rounding: the sharded gradient is reduce-scattered, the single one summed in place


def write_job(folder, model_dir, *, method: str = "lora", dropout: float = 0.0, extra: str = "") -> object:
    data = write_jsonl(folder / "data.jsonl", chat_rows(20))
    job = folder / "job.yaml"
    job.write_text(
        f"model: {{source: {model_dir}}}\n"
        f"data: {{sources: [{{path: {data}}}], template: llama3, val_size: 4}}\n"
        f"method: {{name: {method}, rank: 4, dropout: {dropout}}}\n"
        "train: {batch_size: 2, grad_accum: 1, epochs: 2, lr: 0.005, warmup_ratio: 0, precision: fp32,"
        f" eval_every: 2, save_every: 2{extra}}}\n"
        "eval: {before_after: true, prompts: [Say hello, Count to three], max_new_tokens: 6}\n"
        f"output: {{dir: {folder / 'runs'}}}\n"
    )
    return job


def launch_fsdp(job, *args: str) -> None:
    """Two processes on this machine, FSDP asked for the way `accelerate launch --use_fsdp` asks."""
    done = torchrun_train(job, *args, env={"ACCELERATE_USE_FSDP": "true"})
    assert "FSDP on CPU: sharding" in done.stderr + done.stdout


def single(job, *args: str, grad_accum: int = 2):
    """The reference: one process, accumulating the micro-batches both processes take in a step."""
    from llamaforge.config import load_config
    from llamaforge.train.recipe import run_training

    run_dir, summary = run_training(load_config(job, [f"train.grad_accum={grad_accum}", *args]))
    return run_dir, summary


def eval_losses(run_dir) -> list[float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


def assert_same_run(run_dir, reference, weights_file: str, steps: int = 8) -> None:
    got, want = step_losses(run_dir), step_losses(reference)
    assert len(got) == len(want) == steps
    assert got == pytest.approx(want, rel=0, abs=TOL)
    assert eval_losses(run_dir) == pytest.approx(eval_losses(reference), rel=0, abs=TOL)
    mine, theirs = load_file(run_dir / weights_file), load_file(reference / weights_file)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert mine[key].shape == theirs[key].shape, key  # gathered whole, not a shard
        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=TOL)
    summaries = [json.loads((r / "summary.json").read_text()) for r in (run_dir, reference)]
    assert summaries[0]["after"]["answers"] == summaries[1]["after"]["answers"]
    best = load_file(run_dir / "checkpoints" / "best" / "trainable.safetensors")
    assert best.keys() == load_file(reference / "checkpoints" / "best" / "trainable.safetensors").keys()


@pytest.mark.slow
def test_lora_under_fsdp_trains_evaluates_and_saves_like_one_process(tmp_path, tiny_llama_dir):
    job = write_job(tmp_path, tiny_llama_dir)
    reference, _ = single(job, "output.name=single")
    launch_fsdp(job, "output.name=fsdp")
    assert_same_run(tmp_path / "runs" / "fsdp", reference, "adapter/adapter_model.safetensors")


@pytest.mark.slow
def test_full_fine_tuning_under_fsdp_saves_the_whole_model(tmp_path, tiny_llama_dir):
    """With accumulation too: each process accumulates 2 micro-batches into its gradient shards
    (reduce-scattered at every backward), one process accumulates all 4."""
    job = write_job(tmp_path, tiny_llama_dir, method="full", extra=", lr: 0.0005, keep_checkpoints: 1")
    reference, _ = single(job, "output.name=single", grad_accum=4)
    launch_fsdp(job, "output.name=fsdp", "train.grad_accum=2")
    assert_same_run(tmp_path / "runs" / "fsdp", reference, "model/model.safetensors", steps=4)


@pytest.mark.slow
def test_an_fsdp_run_resumes_exactly_on_every_rank(tmp_path, tiny_llama_dir):
    """Dropout on: stopped at step 4 and resumed, the losses are the straight run's; each rank's
    dropout masks come from its own restored RNG, the weights and Adam moments from the gathered
    checkpoint, scattered back into the shards."""
    job = write_job(tmp_path, tiny_llama_dir, dropout=0.3, extra=", scheduler: constant")
    launch_fsdp(job, "output.name=straight", "train.max_steps=8")
    launch_fsdp(job, "output.name=cut", "train.max_steps=4")
    state = torch.load(tmp_path / "runs" / "cut" / "checkpoints" / "step-00000004" / "state.pt")
    assert state["sharded"] and all(isinstance(k, str) for k in state["optimizer"]["state"])
    launch_fsdp(job, "output.name=cut", "train.max_steps=8", "--resume", str(tmp_path / "runs" / "cut"))
    got, want = step_losses(tmp_path / "runs" / "cut"), step_losses(tmp_path / "runs" / "straight")
    assert len(got) == 8 and got == pytest.approx(want, rel=0, abs=1e-6)


# ------------------------------------------------------------------------ fast: one process, FSDP2


@pytest.fixture()
def gloo_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_sharded_weights_gather_whole_and_load_back(gloo_group, tiny_llama_dir, tmp_path):
    """The default-run smoke test: a LoRA model sharded with FSDP2 (a one-process group) gathers a
    whole adapter state that equals the plain model's, trains one step through the sharded loss,
    and a saved state loads back into the shards; the optimizer follows the sharded parameters."""
    from accelerate.state import PartialState
    from torch.distributed.tensor import DTensor

    from llamaforge.config import MethodConfig
    from llamaforge.models import load_model
    from llamaforge.train.adapters import attach_method
    from llamaforge.train.checkpoint import load_trainable, trainable_state
    from llamaforge.train.distributed import TokenLoss
    from llamaforge.train.sharded import (
        gather_model_state,
        gather_optimizer_state,
        gather_trainable,
        is_fsdp,
        load_full_state,
        shard_on_cpu,
    )

    model, _ = load_model(str(tiny_llama_dir), dtype=torch.float32)
    model = attach_method(model, MethodConfig(rank=4, dropout=0.0))
    plain = trainable_state(model)
    loss = TokenLoss(model, chunk_size=64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    wrapped = shard_on_cpu(1, loss, optimizer)
    assert is_fsdp(wrapped) and all(isinstance(p, DTensor) for p in model.parameters())
    assert all(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])

    state = PartialState()
    whole = gather_trainable(state, wrapped, model)
    assert whole.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(whole[key], plain[key], rtol=0, atol=0)
    assert set(gather_model_state(state, wrapped, model)) == set(plain)  # frozen base not gathered

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    wrapped(batch).backward()
    optimizer.step()
    trained, moments = (
        gather_trainable(state, wrapped, model),
        gather_optimizer_state(wrapped, model, optimizer),
    )
    assert any(not torch.equal(trained[k], plain[k]) for k in plain)
    assert set(moments["state"]) == {k for k in plain if "lora_B" in k or "lora_A" in k}

    from safetensors.torch import save_file

    save_file(plain, tmp_path / "trainable.safetensors")
    load_trainable(tmp_path, model)  # whole tensors into the shards
    load_full_state(model, optimizer, moments)
    back = gather_trainable(state, wrapped, model)
    for key in plain:
        torch.testing.assert_close(back[key], plain[key], rtol=0, atol=0)


def test_a_quantized_base_is_refused_on_cpu_with_the_reason():
    """QLoRA + FSDP is the GPU recipe (bitsandbytes, bf16 quant storage); a CPU launch asking for
    FSDP over a 4-bit base (torchao's NF4 here) stops before any process shards anything."""
    from torchao.quantization import to_nf4

    from llamaforge.errors import ConfigError
    from llamaforge.train.sharded import shard_on_cpu

    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 2))
    model[0].weight = torch.nn.Parameter(to_nf4(model[0].weight.detach()), requires_grad=False)
    optimizer = torch.optim.AdamW(model[1].parameters())
    with pytest.raises(
        ConfigError, match=r"QLoRA \+ FSDP on CPU: 0.weight is a quantized weight \(NF4Tensor\)"
    ):
        shard_on_cpu(2, model, optimizer)


@pytest.mark.slow
def test_a_deepspeed_launch_on_cpu_is_refused_not_run_as_ddp(tmp_path, tiny_llama_dir):
    """accelerate 1.15 gives a CPU launch with ACCELERATE_USE_DEEPSPEED=true a plain DDP setup;
    the recipe stops at setup on every process instead of training something else than asked."""
    job = write_job(tmp_path, tiny_llama_dir)
    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    done = torchrun_train(job, "output.name=ds", env=deepspeed, expect_success=False, timeout=600)
    assert done.returncode != 0
    assert (done.stdout + done.stderr).count("asks for DeepSpeed but accelerate set up MULTI_CPU") == 2
    assert not (tmp_path / "runs" / "ds" / "metrics.jsonl").exists()
