"""Mixed precision owned by the recipe (train/amp.py): autocast, the fp16 loss scaler, and runs of
different precisions in one process on accelerate's one process-wide state."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from conftest import chat_rows, step_losses, write_jsonl
from llamaforge.config import load_config
from llamaforge.train.amp import MixedPrecision
from llamaforge.train.recipe import run_training

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None)]
)
def test_autocast_follows_the_precision(precision, dtype):
    amp = MixedPrecision(precision, CPU, Accelerator(cpu=True))
    with amp.autocast():
        assert torch.is_autocast_enabled("cpu") is (dtype is not None)
        if dtype is not None:
            assert torch.get_autocast_dtype("cpu") == dtype
    assert (amp.scaler is not None) is (precision == "fp16")


def test_deepspeed_keeps_precision_to_itself():
    amp = MixedPrecision("fp16", CPU, Accelerator(cpu=True), delegated=True)
    with amp.autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert amp.scaler is None


def test_an_unresolved_precision_is_refused():
    with pytest.raises(ValueError, match="resolved"):
        MixedPrecision("auto", CPU, Accelerator(cpu=True))


def _model_and_loss(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    x = torch.randn(16, 8)
    return model, lambda m: (m(x) ** 2).mean()


def test_the_fp16_scaler_unscales_before_clipping_and_skips_an_inf_step():
    """A finite step equals plain fp32 SGD (the scale is undone before the norm and the update); an
    inf gradient skips the update, leaves the weights and halves the scale."""
    reference, loss_of = _model_and_loss()
    loss_of(reference).backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1))
    torch.optim.SGD(reference.parameters(), lr=0.5).step()

    model, loss_of = _model_and_loss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    amp = MixedPrecision("fp16", CPU, Accelerator(cpu=True))
    start_scale = amp.scaler.get_scale()
    assert start_scale > 1  # the loss really is scaled
    amp.backward(loss_of(model))
    assert model.weight.grad.abs().max() > 100 * reference.weight.grad.abs().max()  # still scaled
    norm = amp.unscale_and_clip(optimizer, model.parameters(), 0.1)
    assert norm == pytest.approx(ref_norm, rel=1e-5) and ref_norm > 0.1  # clipping did act
    assert amp.step(optimizer) is True
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want)
    assert amp.scaler.get_scale() == start_scale and amp.skipped_steps == 0

    optimizer.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    amp.backward(loss_of(model))
    model.weight.grad[0, 0] = float("inf")
    norm = amp.unscale_and_clip(optimizer, model.parameters(), 0.1)
    assert norm == float("inf")
    assert amp.step(optimizer) is False
    for got, kept in zip(model.parameters(), before):
        assert torch.equal(got, kept)
    assert amp.scaler.get_scale() == start_scale / 2 and amp.skipped_steps == 1


def _job(tmp_path, model_dir, data, name: str, precision: str):
    return load_config(
        None,
        [
            f"model.source={model_dir}",
            f"data.sources=[{{path: {data}}}]",
            "data.template=llama3",
            "data.val_size=0",
            f"output.dir={tmp_path / 'runs'}",
            f"output.name={name}",
            "eval.prompts=[]",
            "eval.before_after=false",
            "train.batch_size=4",
            "train.max_steps=1",
            "train.warmup_ratio=0",
            f"train.precision={precision}",
            "method.rank=4",
            "method.dropout=0",
        ],
    )


def test_runs_of_different_precisions_share_one_process(tmp_path, tiny_llama_dir, monkeypatch):
    """fp32 then bf16 in one process (a sweep, a test session): accelerate's process-wide state is
    never reset, and the second run really computes in bf16 (same data and seed, a nearby but
    different loss)."""
    from accelerate.state import AcceleratorState

    def refuse(*args, **kwargs):
        raise AssertionError("accelerate's process-wide state was reset")

    monkeypatch.setattr(AcceleratorState, "_reset_state", refuse)
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(8))
    losses = {}
    for precision in ("fp32", "bf16", "fp32"):
        name = f"{precision}-{len(losses)}"
        run_dir, summary = run_training(_job(tmp_path, tiny_llama_dir, data, name, precision))
        assert summary["precision"] == precision
        losses[name] = step_losses(run_dir)
    (fp32,), (bf16,), (again,) = losses.values()
    assert fp32 == again  # the bf16 run left nothing behind
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.01)
