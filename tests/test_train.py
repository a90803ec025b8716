"""The training recipe on a tiny random Llama with the real Llama 3 tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import chat_rows, step_losses, write_jsonl
from llamaforge.config import load_config
from llamaforge.train.recipe import FineTuneRecipe, run_training
from llamaforge.train.state import TrainState


def job(tmp_path, model_dir, data, **extra):
    overrides = [
        f"model.source={model_dir}",
        f"data.sources=[{{path: {data}}}]",
        "data.template=llama3",
        "data.val_size=0.2",
        f"output.dir={tmp_path / 'runs'}",
        "output.name=t",
        "eval.prompts=[Hi]",
        "eval.max_new_tokens=4",
        "train.batch_size=4",
        "train.lr=5e-3",
        "train.warmup_ratio=0",
        "train.precision=fp32",
        "method.rank=4",
        "method.dropout=0",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


@pytest.fixture()
def data_file(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", chat_rows(24))


def test_lora_run_writes_a_complete_run_dir_and_loss_falls(tmp_path, tiny_llama_dir, data_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = job(
        tmp_path, tiny_llama_dir, data_file, **{"train.max_steps": 25, "train.lr": 3e-2, "method.rank": 8}
    )
    run_dir, summary = run_training(cfg)
    for name in (
        "config.yaml",
        "data_card.json",
        "rejects.jsonl",
        "metrics.jsonl",
        "loss.png",
        "run.json",
        "summary.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/llamaforge_template.json",
        "adapter/tokenizer.json",
    ):
        assert (run_dir / name).is_file(), name
    card = json.loads((run_dir / "data_card.json").read_text())
    assert len(card["sha256"]) == 64 and card["train_records"] + card["val_records"] == 24
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"] - 0.1
    losses = step_losses(run_dir)
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    # the adapter is a plain PEFT adapter
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft_model = PeftModel.from_pretrained(base, run_dir / "adapter")
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_same_template_at_inference_as_in_training(tiny_run):
    from llamaforge.runs import load_for_inference

    run_dir = tiny_run
    _, tokenizer, template = load_for_inference(run_dir)
    saved = json.loads((run_dir / "adapter" / "llamaforge_template.json").read_text())
    assert template.name == "llama3" and template.jinja == saved["jinja"] == tokenizer.chat_template


def _grads(recipe, groups):
    recipe.model.zero_grad(set_to_none=True)
    for group in groups:
        recipe.accumulate(group)
    return torch.cat([p.grad.flatten() for p in recipe.model.parameters() if p.requires_grad])


def test_gradient_accumulation_normalises_by_all_target_tokens(tmp_path, tiny_llama_dir, data_file):
    """One batch of 8 == 4 accumulated micro-batches of 2 with unequal lengths (Llama 3 item 7)."""
    cfg = job(tmp_path, tiny_llama_dir, data_file, **{"train.max_steps": 1})
    recipe = FineTuneRecipe(cfg)
    recipe.setup()
    with torch.no_grad():  # a non-zero adapter, so the gradient reaches lora_A too
        for n, p in recipe.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    lengths = recipe.data.train["length"]
    idx = sorted(range(len(lengths)), key=lambda i: lengths[i])[:8]
    assert len({lengths[i] for i in idx}) > 2
    whole = _grads(recipe, [[idx]])
    micro = _grads(recipe, [[idx[0:2], idx[2:4], idx[4:6], idx[6:8]]])
    torch.testing.assert_close(micro, whole, rtol=1e-4, atol=1e-7)
    # the naive mean of per-batch means gives a different gradient: the test can fail
    recipe.model.zero_grad(set_to_none=True)
    for k in range(0, 8, 2):
        recipe.accumulate([idx[k : k + 2]])
    naive = torch.cat([p.grad.flatten() for p in recipe.model.parameters() if p.requires_grad]) / 4
    assert not torch.allclose(naive, whole, rtol=1e-3)


def test_chunked_loss_equals_full_logits_loss(tmp_path, tiny_llama_dir, data_file):
    from llamaforge.losses import collate, full_logits_loss_sum, token_loss_sum

    cfg = job(tmp_path, tiny_llama_dir, data_file, **{"train.max_steps": 1})
    recipe = FineTuneRecipe(cfg)
    recipe.setup()
    batch = collate([recipe.data.train[i] for i in range(4)], recipe.tokenizer.pad_token_id)
    # padded rows: the chunked path drops the (redundant) right-padding mask, the reference keeps it
    assert not batch["attention_mask"].all()
    chunked = token_loss_sum(recipe.model, batch, chunk_size=7)
    g1 = torch.autograd.grad(chunked, [p for p in recipe.model.parameters() if p.requires_grad])
    full = full_logits_loss_sum(recipe.model, batch)
    g2 = torch.autograd.grad(full, [p for p in recipe.model.parameters() if p.requires_grad])
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(
            a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max())
        )  # summation order differs


def test_only_a_right_padding_mask_is_dropped():
    from llamaforge.losses import without_redundant_mask

    ids = torch.ones(2, 4, dtype=torch.long)
    right = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    left = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])}
    holes = {"input_ids": ids, "attention_mask": torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])}
    assert "attention_mask" not in without_redundant_mask(right)
    assert without_redundant_mask(left) is left and without_redundant_mask(holes) is holes


# 0.1: FastDropout's masks come from the restored RNG (the harder case, in the default run); 0: opt-in (slow)
@pytest.mark.parametrize("dropout", [pytest.param("0", marks=pytest.mark.slow), "0.1"])
def test_resume_continues_the_same_loss_sequence(tmp_path, tiny_llama_dir, data_file, dropout):
    straight_dir, _ = run_training(
        job(
            tmp_path / "a",
            tiny_llama_dir,
            data_file,
            **{"train.max_steps": 8, "eval.before_after": "false", "method.dropout": dropout},
        )
    )
    first = job(
        tmp_path / "b",
        tiny_llama_dir,
        data_file,
        **{
            "train.max_steps": 8,
            "train.save_every": 4,
            "eval.before_after": "false",
            "method.dropout": dropout,
        },
    )
    recipe = FineTuneRecipe(first)
    recipe.setup()
    recipe.total_steps = 4  # stop half-way, as an interrupted run would
    recipe.train()
    resumed_dir, _ = run_training(first, run_dir=recipe.run_dir, resume=True)

    assert len(step_losses(resumed_dir)) == 8
    assert step_losses(resumed_dir) == pytest.approx(step_losses(straight_dir), rel=1e-5)


def test_bad_configs_fail_before_loading(tmp_path):
    from llamaforge.errors import ConfigError

    with pytest.raises(ConfigError, match="qlora"):
        load_config(None, ["method.name=full", "model.quantization=4bit"])
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        load_config(None, ["train.lrr=1e-4"])
    cfg = load_config(None, ["train.precision=fp16", f"output.dir={tmp_path}"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16"):
            FineTuneRecipe(cfg).setup()


SIGNALLED = {
    "train.max_steps": 5,
    "eval.before_after": "false",
    "train.batch_size": 2,
    "train.grad_accum": 2,
    "method.dropout": 0.1,
    "output.name": "interrupted",
}


@pytest.fixture(scope="module")
def signal_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("signal-data") / "data.jsonl", chat_rows(24))


@pytest.fixture(scope="module")
def straight_losses(tmp_path_factory, tiny_llama_dir, signal_data):
    """The step losses of the uninterrupted run each signal test's resumed run must reproduce: the
    same for all three, so trained once."""
    tmp = tmp_path_factory.mktemp("straight")
    run_dir, _ = run_training(
        job(tmp, tiny_llama_dir, signal_data, **{**SIGNALLED, "output.name": "straight"})
    )
    return step_losses(run_dir)


def _interrupted_then_resumed(tmp_path, tiny_llama_dir, data_file, straight, send, *, patience_s=30.0):
    """Train 5 steps with `send(signal)` called inside step 3, after its first micro-batch has drawn
    dropout masks; resume to the end and compare with `straight` (the uninterrupted run's losses).
    Returns (run dir, name of the checkpoint the interrupt saved)."""
    import os
    import signal

    from llamaforge.train.recipe import TrainingInterrupted

    cfg = job(tmp_path, tiny_llama_dir, data_file, **SIGNALLED)
    recipe = FineTuneRecipe(cfg)
    recipe.setup()
    recipe.signals.patience_s = patience_s
    real_loss, calls = recipe.train_loss, []

    def loss_that_gets_signalled(batch):
        calls.append(1)
        out = real_loss(batch)
        if len(calls) == 6:  # step 3, second micro-batch: the first one's dropout draws are done
            send(lambda: os.kill(os.getpid(), signal.SIGINT))
        return out

    recipe.train_loss = loss_that_gets_signalled
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="--resume"), recipe.signals.installed():
        recipe.train()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    assert json.loads((recipe.run_dir / "run.json").read_text())["status"] == "interrupted"
    saved = [p.name for p in (recipe.run_dir / "checkpoints").iterdir()]
    run_dir, summary = run_training(cfg, run_dir=recipe.run_dir, resume=True)
    assert summary["steps"] == 5
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    # exact: the resumed run replays the interrupted step with the RNG of its boundary
    assert len(straight) == 5 and step_losses(run_dir)[-2:] == straight[-2:]
    return run_dir, saved


def test_a_first_signal_stops_at_the_next_step_boundary(
    tmp_path, tiny_llama_dir, signal_data, straight_losses
):
    _, saved = _interrupted_then_resumed(
        tmp_path, tiny_llama_dir, signal_data, straight_losses, lambda kill: kill()
    )
    assert saved == ["step-00000003"]  # step 3 was finished, then the run stopped


def test_a_second_signal_stops_now_keeping_the_last_boundary(
    tmp_path, tiny_llama_dir, signal_data, straight_losses
):
    def twice(kill):
        kill()
        kill()

    _, saved = _interrupted_then_resumed(tmp_path, tiny_llama_dir, signal_data, straight_losses, twice)
    assert saved == ["step-00000002"]  # step 3 abandoned mid-way: the checkpoint is the boundary before it


def test_a_signal_during_a_long_step_stops_now(tmp_path, tiny_llama_dir, signal_data, straight_losses):
    # a step expected to take longer than the patience (30 s by default) is not waited for
    _, saved = _interrupted_then_resumed(
        tmp_path, tiny_llama_dir, signal_data, straight_losses, lambda kill: kill(), patience_s=0.0
    )
    assert saved == ["step-00000002"]


def test_sigterm_takes_the_same_path(tmp_path, tiny_llama_dir, data_file):
    import os
    import signal

    from llamaforge.train.recipe import TrainingInterrupted

    cfg = job(tmp_path, tiny_llama_dir, data_file, **{"train.max_steps": 4, "eval.before_after": "false"})
    recipe = FineTuneRecipe(cfg)
    recipe.setup()
    real_step = recipe._step

    def preempted_in_second(group, index):
        if index == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal (unhandled, it would kill the process)
        return real_step(group, index)

    recipe._step = preempted_in_second
    with pytest.raises(TrainingInterrupted), recipe.signals.installed():
        recipe.train()
    assert [p.name for p in (recipe.run_dir / "checkpoints").iterdir()] == ["step-00000002"]


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from llamaforge.train import checkpoint as ck

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ck.save_checkpoint(tmp_path, 1, model, opt, sched, TrainState(step=1), keep=2)

    def die(*args, **kwargs):
        raise SystemExit("killed while writing")

    monkeypatch.setattr(ck, "save_file", die)
    with pytest.raises(SystemExit):
        ck.save_checkpoint(tmp_path, 2, model, opt, sched, TrainState(step=2), keep=2)
    monkeypatch.undo()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000001"]
    assert ck.load_checkpoint(ck.list_checkpoints(tmp_path)[-1], model, opt, sched) == TrainState(step=1)
