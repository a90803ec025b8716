"""`train.batch_size: auto`: the planner's micro-batch fits the budget and keeps the effective batch."""

from __future__ import annotations

import pytest

from conftest import chat_rows, write_jsonl
from fresh_process import train_in_fresh_process
from llamaforge.config import load_config
from llamaforge.errors import ConfigError
from llamaforge.planning.arch import load_arch
from llamaforge.planning.autobatch import CPU_MIN_TOKENS, choose_batch
from llamaforge.planning.memory import GiB, Setup, estimate

ARCH = load_arch("smollm2-135m")
CPU_SETUP = Setup(method="lora", seq=384, precision="fp32", device="cpu", rank=16)


def test_cpu_picks_the_smallest_micro_batch_with_enough_tokens():
    choice = choose_batch(ARCH, CPU_SETUP, per_device_batch=8, budget_bytes=20 * GiB, mean_tokens=100)
    assert choice.micro_batch * 100 >= CPU_MIN_TOKENS > choice.micro_batch / 2 * 100
    assert choice.micro_batch * choice.grad_accum == 8 and not choice.checkpointing and choice.fits


def test_a_tight_budget_gives_a_smaller_micro_batch_then_checkpointing():
    roomy = choose_batch(ARCH, CPU_SETUP, per_device_batch=8, budget_bytes=20 * GiB, mean_tokens=400)
    assert roomy.micro_batch == 1  # 400 tokens a row already feed the CPU's matmuls
    gpu = CPU_SETUP.with_(device="cuda")
    peaks = {b: estimate(ARCH, gpu.with_(batch=b)).peak for b in (1, 2, 4, 8)}
    assert (
        choose_batch(ARCH, gpu, per_device_batch=8, budget_bytes=peaks[8] + 1, mean_tokens=400).micro_batch
        == 8
    )
    mid = choose_batch(ARCH, gpu, per_device_batch=8, budget_bytes=peaks[4] + 1, mean_tokens=400)
    assert (mid.micro_batch, mid.grad_accum, mid.checkpointing) == (4, 2, False)
    ckpt_peak = estimate(ARCH, gpu.with_(batch=1, checkpointing=True)).peak
    tight = choose_batch(
        ARCH, gpu, per_device_batch=8, budget_bytes=min(peaks[1] - 1, ckpt_peak * 1.01), mean_tokens=400
    )
    assert tight.checkpointing and tight.fits and "checkpointing needed" in tight.reason
    hopeless = choose_batch(ARCH, gpu, per_device_batch=8, budget_bytes=1, mean_tokens=400)
    assert not hopeless.fits and hopeless.micro_batch == 1 and "nothing fits" in hopeless.reason


def test_fixed_checkpointing_is_respected():
    choice = choose_batch(
        ARCH, CPU_SETUP, per_device_batch=6, budget_bytes=20 * GiB, mean_tokens=50, checkpointing=True
    )
    assert choice.checkpointing and choice.micro_batch in (1, 2, 3, 6) and 6 % choice.micro_batch == 0


def test_schema_rules():
    assert load_config(None, []).train.batch_size == "auto"
    assert load_config(None, []).train.target_effective_batch() == 8
    assert load_config(None, ["train.batch_size=4", "train.grad_accum=2"]).train.target_effective_batch() == 8
    with pytest.raises(ConfigError, match="derived when train.batch_size is auto"):
        load_config(None, ["train.grad_accum=4"])
    with pytest.raises(ConfigError, match="not a multiple"):
        load_config(None, ["train.batch_size=3", "train.effective_batch_size=8"])


@pytest.fixture()
def data_file(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", chat_rows(48))


def test_the_recipe_resolves_auto_and_records_it(tmp_path, tiny_llama_dir, data_file):
    from llamaforge.train.recipe import run_training

    cfg = load_config(
        None,
        [
            f"model.source={tiny_llama_dir}",
            f"data.sources=[{{path: {data_file}}}]",
            "data.val_size=4",
            f"output.dir={tmp_path}",
            "output.name=auto",
            "train.max_steps=2",
            "train.precision=fp32",
            "train.effective_batch_size=8",
            "eval.before_after=false",
            "eval.prompts=[]",
        ],
    )
    run_dir, summary = run_training(cfg)
    choice = summary["batch_choice"]
    assert choice["micro_batch"] * choice["grad_accum"] == 8 and choice["gradient_checkpointing"] is False
    assert cfg.train.batch_size == "auto"  # the caller's config is left as it was
    saved = load_config(str(run_dir / "config.yaml")).train  # what a resume reads
    assert (saved.batch_size, saved.grad_accum, saved.effective_batch_size) == (
        choice["micro_batch"],
        choice["grad_accum"],
        8,
    )
    assert summary["micro_batch"] == choice["micro_batch"]


# glibc (every machine) in the default run; jemalloc's ~30 s in the opt-in slow run
@pytest.mark.parametrize("allocator", ["glibc", pytest.param("jemalloc", marks=pytest.mark.slow)])
def test_auto_batch_stays_within_its_budget_measured(tmp_path, tiny_llama_dir, allocator):
    """Planner vs a measured run: with a budget a full micro-batch does not fit, the chosen one keeps the
    process's measured peak RSS under the budget it was given, on glibc's malloc and on jemalloc (the
    planner counts the slack of the allocator the process runs on)."""
    from llamaforge.hardware import available_memory_bytes, find_jemalloc

    if allocator == "jemalloc" and find_jemalloc() is None:
        pytest.skip("needs libjemalloc (apt install libjemalloc2)")

    rows = [
        {"instruction": " ".join(["word"] * 150), "output": " ".join(["answer"] * 150)} for _ in range(24)
    ]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    # a 128k vocabulary makes the loss chunk and activations large next to the tiny model's weights
    budget_gib = 1.6
    fraction = budget_gib * GiB / available_memory_bytes()
    args = [
        f"model.source={tiny_llama_dir}",
        f"data.sources=[{{path: {data}}}]",
        "data.val_size=0",
        "data.max_length=512",
        f"output.dir={tmp_path}",
        "output.name=budget",
        "train.max_steps=2",
        "train.precision=fp32",
        "train.effective_batch_size=16",
        "train.micro_batch_tokens=null",  # the budget alone binds here (the split: test_micro_tokens.py)
        f"train.memory_fraction={fraction:.6f}",
        "train.loss_chunk_size=4096",
        "eval.before_after=false",
        "eval.prompts=[]",
    ]
    run = train_in_fresh_process(args, preload=find_jemalloc() if allocator == "jemalloc" else None)
    choice, peak_gib = run["summary"]["batch_choice"], run["peak_rss"] / GiB
    assert choice["micro_batch"] < 16, choice  # the budget binds: the whole batch at once would not fit
    assert peak_gib <= choice["budget_gib"] * 1.05, (peak_gib, choice)


def test_a_fixed_micro_batch_accumulates_to_the_effective_batch():
    """`train.batch_size=2` on a job asking 8 examples a step accumulates 4, never silently trains on 2."""
    from llamaforge.config import load_config
    from llamaforge.errors import ConfigError
    from llamaforge.train.batching import derive_grad_accum

    t = load_config(None, ["train.effective_batch_size=8", "train.batch_size=2"]).train
    derive_grad_accum(t, world=1)
    assert (t.batch_size, t.grad_accum) == (2, 4)
    t = load_config(None, ["train.effective_batch_size=8", "train.batch_size=2"]).train
    derive_grad_accum(t, world=2)
    assert t.grad_accum == 2
    t = load_config(None, ["train.effective_batch_size=8", "train.batch_size=2", "train.grad_accum=2"]).train
    with pytest.raises(ConfigError, match="train.grad_accum=2 disagrees"):
        derive_grad_accum(t, world=1)
    t = load_config(None, ["train.effective_batch_size=8", "train.batch_size=4"]).train
    with pytest.raises(ConfigError, match="not a multiple"):
        derive_grad_accum(t, world=3)
    t = load_config(None, ["train.batch_size=4", "train.grad_accum=2"]).train  # no effective batch: as given
    derive_grad_accum(t, world=1)
    assert t.grad_accum == 2
