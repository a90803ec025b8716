"""Long-run knobs: early stopping, best weights, overfitting and divergence, trackers, optimizers,
determinism, and generation metrics during training (tiny random Llama, real Llama 3 tokenizer)."""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch

from conftest import chat_rows, read_metrics, step_losses, write_jsonl
from llamaforge.config import load_config
from llamaforge.errors import ConfigError
from llamaforge.train.monitor import TrainingMonitor, overfitting
from llamaforge.train.recipe import FineTuneRecipe, TrainingDiverged, run_training
from llamaforge.train.state import WatchState


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread avoids oversubscription (10x here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def job(tmp_path, model_dir, data, *extra, val=None):
    data_keys = [f"data.val_sources=[{{path: {val}}}]"] if val else ["data.val_size=0.2"]
    overrides = [
        f"model.source={model_dir}",
        f"data.sources=[{{path: {data}}}]",
        "data.template=llama3",
        *data_keys,
        f"output.dir={tmp_path / 'runs'}",
        "output.name=t",
        "eval.prompts=[]",
        "eval.before_after=false",
        "train.batch_size=4",
        "train.lr=5e-3",
        "train.warmup_ratio=0",
        "train.precision=fp32",
        "method.rank=4",
        "method.dropout=0",
        *extra,
    ]
    return load_config(None, overrides)


@pytest.fixture()
def data_file(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", chat_rows(24))


# ---------------------------------------------------------------- the monitor on numbers


def test_overfitting_detector_on_synthetic_sequences():
    train = [3.0, 2.5, 2.0, 1.5, 1.0]
    assert overfitting([2.0, 1.8, 1.9, 2.0, 2.1], train, 3)  # 3 rises while training falls
    assert not overfitting([2.0, 1.8, 1.9, 2.0, 2.1], train, 4)  # only 3 rises
    assert not overfitting([2.0, 1.8, 1.9, 1.85, 2.1], train, 3)  # a dip breaks the streak
    assert not overfitting([2.0, 1.8, 1.9, 2.0, 2.1], [1.0, 1.0, 1.2, 1.4, 1.6], 3)  # training rises too
    assert not overfitting([2.0, 2.1, 2.2, 2.3], [3.0, 2.0, 1.5, 1.0], 0)  # 0 = off
    assert overfitting([2.0, 2.1, 2.2, 2.3], [3.0, 2.0, 1.5, 1.0], 3)


def test_monitor_best_patience_warning_and_state():
    m = TrainingMonitor(patience=2, min_delta=0.05, overfit_evals=2)
    steps = iter(range(10, 1000, 10))

    def feed(eval_loss, train_losses):
        for loss in train_losses:
            m.add_train_loss(loss)
        return m.update(next(steps), {"eval_loss": eval_loss})

    assert feed(2.0, [3.0, 2.9]).best
    v = feed(1.97, [2.5])  # best, but not by more than min_delta: counts against the patience
    assert v.best and not v.stop and m.state.bad_evals == 1
    v = feed(1.9, [2.4])  # improves by 0.07 > min_delta: patience resets
    assert v.best and m.state.bad_evals == 0 and m.state.best_step == 30
    state = json.loads(json.dumps(m.state.to_dict()))  # survives the checkpoint's progress.json
    v = feed(1.95, [2.0])
    assert not v.best and v.warning is None
    v = feed(2.1, [1.5])  # a second rise while training falls: overfitting, and patience is spent
    assert v.stop and "overfitting" in v.warning and m.state.stopped_at == 50
    assert m.state.warnings == [{"type": "overfitting", "step": 50, "message": v.warning}]
    assert feed(2.2, [1.4]).warning is None  # warned once per streak
    restored = TrainingMonitor(patience=2, min_delta=0.05, overfit_evals=2, state=WatchState.from_dict(state))
    s = restored.state
    assert (s.best_step, s.best_loss, s.bad_evals) == (30, 1.9, 0)
    assert restored.update(40, {"eval_loss": 1.95}).best is False and s.bad_evals == 1


def test_nan_eval_loss_is_never_best():
    m = TrainingMonitor(patience=1)
    assert m.update(1, {"eval_loss": 2.0}).best
    v = m.update(2, {"eval_loss": float("nan")})
    assert not v.best and v.stop and m.state.best_step == 1


# ---------------------------------------------------------------- real runs


def disjoint_sets(tmp_path):
    """Train and validation answers drawn from disjoint words: memorising one hurts the other fast."""
    words = [
        "apple",
        "river",
        "stone",
        "cloud",
        "maple",
        "tiger",
        "violet",
        "copper",
        "anchor",
        "lantern",
        "meadow",
        "falcon",
        "harbor",
        "velvet",
    ]
    rng = random.Random(0)

    def rows(n, offset, pool):
        return [
            {
                "instruction": f"Say the code for item {offset + i}.",
                "input": "",
                "output": " ".join(rng.choice(pool) for _ in range(6)),
            }
            for i in range(n)
        ]

    return (
        write_jsonl(tmp_path / "train.jsonl", rows(4, 0, words[:7])),
        write_jsonl(tmp_path / "val.jsonl", rows(4, 100, words[7:])),
    )


def test_overfitting_run_warns_stops_early_and_saves_the_best(tmp_path, tiny_llama_dir, capsys):
    from safetensors.torch import load_file

    train, val = disjoint_sets(tmp_path)
    cfg = job(
        tmp_path,
        tiny_llama_dir,
        train,
        "method.name=full",
        "train.lr=2e-2",
        "train.batch_size=8",
        "train.scheduler=constant",
        "train.max_steps=40",
        "train.eval_every=2",
        "train.early_stopping_patience=4",
        val=val,
    )
    run_dir, summary = run_training(cfg)
    evals = [r for r in read_metrics(run_dir) if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"])
    # early stopping: 4 evals (every 2 steps) without improving on the best
    assert summary["stopped_early_at"] == summary["steps"] == best["step"] + 4 * 2 < 40
    # the overfitting warning fired on the way, and is recorded
    assert summary["warnings"] and summary["warnings"][0]["type"] == "overfitting"
    assert best["step"] < summary["warnings"][0]["step"] <= summary["steps"]
    # the saved model holds the best eval's weights (load_best_at_end defaults on with eval_every),
    # not the last step's
    assert summary["best_step"] == summary["weights_step"] == best["step"] < summary["steps"]
    assert summary["best_eval_loss"] == summary["after"]["eval_loss"] == best["eval_loss"]
    assert json.loads((run_dir / "checkpoints" / "best" / "best.json").read_text())["step"] == best["step"]
    kept = load_file(run_dir / "checkpoints" / "best" / "trainable.safetensors")
    saved = load_file(run_dir / "model" / "model.safetensors")
    assert all(torch.equal(saved[name], kept[name]) for name in saved)
    assert json.loads((run_dir / "summary.json").read_text())["warnings"] == summary["warnings"]
    out = capsys.readouterr().out
    assert f"the saved weights are from step {best['step']}" in out and "early stopping" in out


def test_divergence_stops_with_an_error_naming_the_step(tmp_path, tiny_llama_dir, data_file):
    cfg = job(
        tmp_path, tiny_llama_dir, data_file, "train.lr=1e6", "train.max_steps=8", "train.scheduler=constant"
    )
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+: the (training loss|gradient norm) is"):
        run_training(cfg)
    run_dir = tmp_path / "runs" / "t"
    info = json.loads((run_dir / "run.json").read_text())
    rows = read_metrics(run_dir)
    assert info["status"] == "diverged" and rows[-1]["step"] == info["step"] < 8 and "diverged" in rows[-1]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, info["step"]))  # the metrics so far
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and f"step {info['step']}" in summary["error"]


def test_trackers_and_generation_metrics_during_training(tmp_path, tiny_llama_dir, data_file):
    from matplotlib.image import imread
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = job(
        tmp_path,
        tiny_llama_dir,
        data_file,
        "train.max_steps=4",
        "train.eval_every=2",
        "eval.sample_size=3",
        "eval.max_new_tokens=4",
        "train.trackers=[tensorboard, mlflow]",
        "train.save_every=1",
        "train.keep_checkpoints=1",
    )
    run_dir, summary = run_training(cfg)
    # keep_checkpoints=1 rotated the periodic checkpoints away; the best weights are never rotated
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "step-00000004"]
    progress = json.loads((run_dir / "checkpoints" / "step-00000004" / "progress.json").read_text())
    assert progress["monitor"]["best_step"] == summary["best_step"]  # a resumed run goes on counting
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 4]  # two during training, the final one
    for r in evals:
        for key in ("eval_rougeL", "eval_bleu", "eval_exact_match", "eval_rouge1"):
            assert 0 <= r[key] <= 100, key
    # loss.png gains a second panel for the generation metrics (12 x 4 inches instead of 7 x 4)
    assert imread(run_dir / "loss.png").shape[:2] == (440, 1320)

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(
        [r["loss"] for r in rows if "loss" in r]
    )
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4, 4]
    assert "eval/rougeL" in acc.Tags()["scalars"]

    ids = json.loads((run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    run = client.get_run(ids["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "4" and run.data.params["method.name"] == "lora"
    history = client.get_metric_history(ids["run_id"], "loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [r["loss"] for r in rows if "loss" in r]
    )
    assert "eval_rougeL" in run.data.metrics


def test_deterministic_runs_are_bit_identical(tmp_path, tiny_llama_dir, data_file):
    from safetensors.torch import load_file

    def run(name):
        cfg = job(
            tmp_path / name,
            tiny_llama_dir,
            data_file,
            "train.max_steps=3",
            "train.deterministic=true",
            "method.dropout=0.1",
            "data.val_size=0",
        )
        recipe = FineTuneRecipe(cfg)
        recipe.setup()
        assert torch.are_deterministic_algorithms_enabled()
        try:
            recipe.train()
            recipe.save()
        finally:
            recipe.cleanup()
        return step_losses(recipe.run_dir), load_file(
            recipe.run_dir / "adapter" / "adapter_model.safetensors"
        )

    losses_a, weights_a = run("a")
    assert not torch.are_deterministic_algorithms_enabled()  # the process-wide switch is given back
    losses_b, weights_b = run("b")
    assert losses_a == losses_b and len(losses_a) == 3
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert any(weights_a[k].abs().sum() > 0 for k in weights_a if "lora_B" in k)  # it did train


def test_8bit_adamw_trains_on_cpu_with_8bit_states(tmp_path, tiny_llama_dir, data_file):
    pytest.importorskip("bitsandbytes")
    # bitsandbytes keeps tensors under 4096 elements in 32-bit: rank 128 x hidden 32 makes LoRA's 8-bit
    cfg = job(
        tmp_path,
        tiny_llama_dir,
        data_file,
        "method.rank=128",
        "method.alpha=256",
        "train.optimizer=adamw_8bit",
        "train.lr=5e-2",
        "train.max_steps=4",
        "data.val_size=0",
        "train.batch_size=32",
    )  # one batch: the same examples at each step
    recipe = FineTuneRecipe(cfg)
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    optimizer = recipe.optimizer.optimizer
    assert type(optimizer).__name__ == "AdamW8bit"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() >= 4096 for p in params) >= len(params) // 2
    for p in params:  # 8-bit moments for every tensor large enough
        assert optimizer.state[p]["state1"].dtype == (torch.uint8 if p.numel() >= 4096 else torch.float32)
    losses = step_losses(recipe.run_dir)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.05


def test_paged_and_sgd_optimizers_step():
    pytest.importorskip("bitsandbytes")
    from llamaforge.train.knobs import build_optimizer

    for name in ("paged_adamw_8bit", "sgd", "adamw"):
        model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.LayerNorm(128))
        before = model[0].weight.detach().clone()
        opt = build_optimizer(model, name, 1e-2, 0.01)
        model(torch.randn(4, 128)).pow(2).mean().backward()
        opt.step()
        assert not torch.equal(before, model[0].weight), name
        assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]  # no decay on biases and norms


@pytest.mark.gpu
def test_paged_adamw_8bit_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("paged optimizers page their states through CUDA unified memory: needs a CUDA GPU")
    pytest.importorskip("bitsandbytes")
    from llamaforge.train.knobs import build_optimizer

    model = torch.nn.Linear(256, 256).cuda()
    opt = build_optimizer(model, "paged_adamw_8bit", 1e-2, 0.0)
    model(torch.randn(4, 256, device="cuda")).pow(2).mean().backward()
    opt.step()
    assert opt.state[model.weight]["state1"].dtype == torch.uint8


def test_impossible_combinations_fail_before_loading(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="set train.eval_every"):
        load_config(None, ["train.early_stopping_patience=3"])
    with pytest.raises(ConfigError, match="early_stopping_patience needs validation data"):
        load_config(None, ["train.early_stopping_patience=3", "data.val_size=0"])
    with pytest.raises(ConfigError, match="eval.sample_size needs validation data"):
        load_config(None, ["eval.sample_size=4", "data.val_size=0"])
    with pytest.raises(ConfigError, match="not in train.trackers"):
        load_config(None, ["train.mlflow_uri=file:///tmp/x"])
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(None, ["train.optimizer=lion"])
    # a missing tracker package names the extra to install, before any model is loaded
    monkeypatch.setitem(sys.modules, "mlflow", None)
    cfg = load_config(None, [f"output.dir={tmp_path}", "output.name=x", "train.trackers=[mlflow]"])
    with pytest.raises(ConfigError, match=r"llamaforge\[mlflow\]"):
        FineTuneRecipe(cfg).setup()
    assert not (tmp_path / "x").exists()
