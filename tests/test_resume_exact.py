"""`--resume` repeats an uninterrupted run exactly, wherever the interrupt lands (issue 15):
the checkpoint holds the last step boundary's state, every generator (CUDA included) and every
process's own RNG."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

from conftest import chat_rows, step_losses, write_jsonl
from llamaforge.config import load_config
from llamaforge.train import checkpoint as ck
from llamaforge.train.recipe import FineTuneRecipe, TrainingInterrupted, run_training
from llamaforge.train.state import TrainState
from torchrun import torchrun_train

STEPS = 6


def job(tmp_path, model_dir, data, name: str, **extra):
    overrides = [
        f"model.source={model_dir}",
        f"data.sources=[{{path: {data}}}]",
        "data.template=llama3",
        "data.val_size=0",
        f"output.dir={tmp_path / 'runs'}",
        f"output.name={name}",
        "eval.prompts=[]",
        "eval.before_after=false",
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.lr=5e-3",
        "train.warmup_ratio=0",
        "train.precision=fp32",
        "method.rank=4",
        "method.dropout=0.2",
        f"train.max_steps={STEPS}",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_llama_dir):
    """The reference: the same run, never interrupted."""
    tmp = tmp_path_factory.mktemp("straight")
    data = write_jsonl(tmp / "data.jsonl", chat_rows(16))
    run_dir, _ = run_training(job(tmp, tiny_llama_dir, data, "straight"))
    return data, step_losses(run_dir)


def interrupt_and_resume(tmp_path, model_dir, data, arm) -> tuple[list[float], int]:
    """Train, let `arm(recipe)` plant an interrupt, resume; (losses of the whole run, checkpoint step)."""
    cfg = job(tmp_path, model_dir, data, "cut")
    recipe = FineTuneRecipe(cfg)
    recipe.setup()
    arm(recipe)
    try:
        with pytest.raises(TrainingInterrupted):
            recipe.train()
    finally:
        recipe.cleanup()
    saved = ck.list_checkpoints(recipe.run_dir / "checkpoints")[-1]
    run_dir, summary = run_training(cfg, run_dir=recipe.run_dir, resume=True)
    assert summary["steps"] == STEPS
    return step_losses(run_dir), int(saved.name.removeprefix(ck.PREFIX))


def test_an_interrupt_between_micro_batches_resumes_exactly(tmp_path, tiny_llama_dir, straight):
    """Ctrl-C after the first micro-batch of step 4 drew its dropout masks: the checkpoint is the
    state before step 4, not the RNG halfway through it."""
    data, reference = straight

    def arm(recipe):
        real, calls = recipe.train_loss, []

        def loss_then_interrupt(batch):
            out = real(batch)
            calls.append(1)
            if len(calls) == 7:  # step 4, micro-batch 1 of 2
                raise KeyboardInterrupt
            return out

        recipe.train_loss = loss_then_interrupt

    losses, saved_at = interrupt_and_resume(tmp_path, tiny_llama_dir, data, arm)
    assert saved_at == 3
    assert losses == pytest.approx(reference, rel=1e-6, abs=1e-7)


def test_an_interrupt_after_the_update_counts_the_step_whole(tmp_path, tiny_llama_dir, straight):
    """The update of step 4 landed, the loop had not yet moved past its micro-batches: the checkpoint
    is step 4, and the resumed run neither repeats nor skips a batch."""
    data, reference = straight

    def arm(recipe):
        real = recipe._step

        def step_then_interrupt(group, index):
            record = real(group, index)
            if recipe.state.step == 4:
                raise KeyboardInterrupt
            return record

        recipe._step = step_then_interrupt

    losses, saved_at = interrupt_and_resume(tmp_path, tiny_llama_dir, data, arm)
    assert saved_at == 4
    # the metrics of step 4 were never written (interrupted first): the others must match exactly
    assert len(losses) == STEPS - 1
    assert losses == pytest.approx(reference[:3] + reference[4:], rel=1e-6, abs=1e-7)


def test_a_signal_during_the_update_waits_for_it_to_finish():
    """Even a "stop now" (second) signal never leaves the weights half-updated."""
    from llamaforge.train.signals import StopSignals

    signals, done, before = StopSignals(), [], signal.getsignal(signal.SIGINT)
    with signals.installed(), pytest.raises(KeyboardInterrupt), signals.update():
        os.kill(os.getpid(), signal.SIGINT)  # the first asks for a stop at the step boundary
        os.kill(os.getpid(), signal.SIGINT)  # the second for a stop now: held until the update is whole
        done.append("rest of the update")
    assert done == ["rest of the update"]
    assert signal.getsignal(signal.SIGINT) is before


def draws() -> tuple:
    cuda = torch.rand(3, device="cuda").tolist() if torch.cuda.is_available() else []
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), cuda


def test_every_generator_is_saved_and_restored():
    state = ck.rng_state()
    first = draws()
    ck.set_rng_state(state)
    assert draws() == first
    assert len(state["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dropout_repeats_after_a_restore():
    x = torch.ones(4096, device="cuda")
    state = ck.rng_state()
    a = torch.nn.functional.dropout(x, 0.5)
    ck.set_rng_state(state)
    assert torch.equal(a, torch.nn.functional.dropout(x, 0.5))


def test_each_rank_gets_back_its_own_rng(tmp_path, caplog):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    root = tmp_path / "checkpoints"
    per_rank = {}
    for rank in (0, 1, 2):
        torch.manual_seed(100 + rank)
        random.seed(100 + rank)
        np.random.seed(100 + rank)
        per_rank[rank] = draws()
        torch.manual_seed(100 + rank)
        random.seed(100 + rank)
        np.random.seed(100 + rank)
        if rank == 0:
            ck.save_checkpoint(root, 5, model, opt, sched, TrainState(step=5), keep=2, rng=ck.rng_state())
        else:
            ck.save_rank_rng(root, 5, rank)
    (root / "rng-rank2-step-00000005.pt").unlink()  # rank 2's file lost
    path = ck.list_checkpoints(root)[-1]
    for rank in (1, 0):
        torch.manual_seed(0)
        ck.load_checkpoint(path, model, opt, sched, rank=rank)
        assert draws() == per_rank[rank]
    torch.manual_seed(7)
    with caplog.at_level("WARNING"):
        ck.load_checkpoint(path, model, opt, sched, rank=2)
    assert "process 2" in caplog.text
    torch.manual_seed(7)
    expected = torch.rand(3).tolist()
    torch.manual_seed(7)
    ck.load_checkpoint(path, model, opt, sched, rank=2)
    assert torch.rand(3).tolist() == expected  # left as it was, not given another rank's state
    for step in (6, 7):  # pruning takes the other ranks' files with their checkpoint
        ck.save_rank_rng(root, step, 1)
        ck.save_checkpoint(root, step, model, opt, sched, TrainState(step=step), keep=2)
    assert sorted(p.name for p in root.iterdir()) == [
        "rng-rank1-step-00000006.pt",
        "rng-rank1-step-00000007.pt",
        "step-00000006",
        "step-00000007",
    ]


def test_a_checkpoint_from_before_per_rank_files_still_loads(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = ck.save_checkpoint(tmp_path, 1, model, opt, sched, TrainState(step=1), keep=1)
    torch.manual_seed(3)
    random.seed(3)
    want = (random.random(), torch.rand(2).tolist())
    torch.manual_seed(3)
    random.seed(3)
    state = torch.load(path / "state.pt", weights_only=True)
    torch.save(
        {**state, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, path / "state.pt"
    )
    (path / "rng-rank0.pt").unlink()
    torch.manual_seed(0)
    random.seed(0)
    ck.load_checkpoint(path, model, opt, sched)
    assert (random.random(), torch.rand(2).tolist()) == want


@pytest.mark.slow
def test_two_processes_resume_exactly(tmp_path, tiny_llama_dir):
    """Two torchrun processes with dropout: stopped at step 2, resumed to 4, the losses are those of
    a straight run to 4 (rank 1 draws its masks from its own restored RNG, not rank 0's)."""
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(16))
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        f"model: {{source: {tiny_llama_dir}}}\n"
        f"data: {{sources: [{{path: {data}}}], template: llama3, val_size: 0}}\n"
        "method: {rank: 4, dropout: 0.3}\n"
        "train: {batch_size: 2, grad_accum: 1, lr: 0.005, warmup_ratio: 0, precision: fp32, scheduler: constant,"
        " save_every: 2}\n"
        "eval: {before_after: false, prompts: []}\n"
        f"output: {{dir: {tmp_path / 'runs'}}}\n"
    )
    torchrun_train(job_file, "output.name=straight", "train.max_steps=4")
    torchrun_train(job_file, "output.name=cut", "train.max_steps=2")
    assert (tmp_path / "runs" / "cut" / "checkpoints" / "rng-rank1-step-00000002.pt").is_file()
    torchrun_train(
        job_file, "output.name=cut", "train.max_steps=4", "--resume", str(tmp_path / "runs" / "cut")
    )
    got, want = step_losses(tmp_path / "runs" / "cut"), step_losses(tmp_path / "runs" / "straight")
    assert len(got) == 4 and got == pytest.approx(want, rel=1e-6, abs=1e-7)
