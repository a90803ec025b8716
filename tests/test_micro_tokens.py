"""`train.micro_batch_tokens`: a micro-batch past the cap is split within its optimizer step: the same
gradient, a fraction of the activations (the quickstart's peak came from its two longest micro-batches)."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import chat_rows, step_losses, write_jsonl
from fresh_process import train_in_fresh_process
from llamaforge.config import load_config
from llamaforge.planning.arch import load_arch
from llamaforge.planning.autobatch import CPU_MAX_TOKENS, capped_peak, choose_batch, micro_tokens_for
from llamaforge.planning.memory import GiB, Setup, estimate
from llamaforge.train.batching import resolve_micro_tokens, split_by_tokens

ARCH = load_arch("smollm2-135m")


def test_split_keeps_every_row_once_within_the_cap():
    lengths = [300, 20, 250, 40, 40, 600, 100, 90]
    idx = list(range(len(lengths)))
    parts = split_by_tokens(idx, lengths, 512)
    assert sorted(i for p in parts for i in p) == idx
    for part in parts:
        padded = len(part) * max(lengths[i] for i in part)
        assert padded <= 512 or len(part) == 1  # only a lone row may pass the cap (600 here)
    assert [5] in parts
    assert split_by_tokens(idx, lengths, 512) == parts  # deterministic: a resume splits alike
    assert split_by_tokens(idx, lengths, None) == [idx]
    assert split_by_tokens([1, 3, 4], lengths, 512) == [[1, 3, 4]]  # 3 x 40 fits: left whole
    assert split_by_tokens([[0, 1], [5]], lengths, 512) == [[[0, 1], [5]]]  # packed bins: left whole


def test_the_cap_resolves_per_job_and_device(caplog):
    cpu = load_config(None, [])
    assert micro_tokens_for(cpu, "cpu") == CPU_MAX_TOKENS
    assert micro_tokens_for(cpu, "cuda") is None
    assert micro_tokens_for(cpu, "cpu", sharded=True) is None
    assert micro_tokens_for(load_config(None, ["train.packing=true"]), "cpu") is None
    assert micro_tokens_for(load_config(None, ["method.objective=dpo"]), "cpu") is None
    assert micro_tokens_for(load_config(None, ["train.micro_batch_tokens=null"]), "cpu") is None
    assert micro_tokens_for(load_config(None, ["train.micro_batch_tokens=2048"]), "cuda") == 2048
    packed = load_config(None, ["train.packing=true", "train.micro_batch_tokens=1024"])
    with caplog.at_level(logging.WARNING):
        assert resolve_micro_tokens(packed, "cpu", sharded=False) is None
    assert "micro_batch_tokens=1024 is ignored" in caplog.text and packed.train.micro_batch_tokens is None
    with pytest.raises(Exception, match="micro_batch_tokens"):
        load_config(None, ["train.micro_batch_tokens=0"])


def test_the_planner_counts_the_split_in_the_peak():
    setup = Setup(method="lora", seq=1200, batch=4, precision="fp32", device="cpu", rank=16)
    whole = estimate(ARCH, setup).peak
    capped = capped_peak(ARCH, setup, 512)
    assert capped == estimate(ARCH, setup.with_(batch=1)).peak < whole  # one 1,200-token row a part
    short = setup.with_(seq=100)
    assert capped_peak(ARCH, short, 512) == estimate(ARCH, short).peak  # 400 tokens: nothing to split
    choice = choose_batch(
        ARCH, setup, per_device_batch=8, budget_bytes=64 * GiB, mean_tokens=80, micro_tokens=512
    )
    assert choice.micro_tokens == 512 and "split past 512 tokens" in choice.line()
    assert choice.peak_bytes == capped_peak(ARCH, setup.with_(batch=choice.micro_batch), 512)


def _job(tmp_path, tiny_llama_dir, data, name: str, *extra: str) -> list[str]:
    return [
        f"model.source={tiny_llama_dir}",
        f"data.sources=[{{path: {data}}}]",
        "data.val_size=0",
        f"output.dir={tmp_path}",
        f"output.name={name}",
        "train.precision=fp32",
        "method.dropout=0",
        "eval.before_after=false",
        "eval.prompts=[]",
        *extra,
    ]


def test_a_split_step_trains_like_the_whole_micro_batch(tmp_path, tiny_llama_dir):
    """Same data, same steps: one micro-batch of 8 against the same 8 rows split past 64 tokens gives
    the same losses and the same adapter, up to float summation order."""
    from safetensors.torch import load_file

    from llamaforge.train.recipe import run_training

    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(32))
    runs = {}
    for name, cap in (("whole", "null"), ("split", "64")):
        args = [
            "train.max_steps=3",
            "train.batch_size=8",
            "train.grad_accum=1",
            f"train.micro_batch_tokens={cap}",
        ]
        run_dir, summary = run_training(load_config(None, _job(tmp_path, tiny_llama_dir, data, name, *args)))
        runs[name] = run_dir
        assert summary["micro_batch_tokens"] == (None if cap == "null" else 64)
    assert (
        load_config(str(runs["split"] / "config.yaml")).train.micro_batch_tokens == 64
    )  # a resume replays it
    whole, split = step_losses(runs["whole"]), step_losses(runs["split"])
    assert len(whole) == 3 and whole == pytest.approx(split, rel=1e-4)
    a = load_file(runs["whole"] / "adapter" / "adapter_model.safetensors")
    b = load_file(runs["split"] / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)


@pytest.mark.slow  # two fresh processes (~45 s on 2 cores)
def test_the_split_lowers_the_measured_peak(tmp_path, tiny_llama_dir):
    """One micro-batch of 8 long rows (~2,600 padded tokens, a 128k vocabulary's loss chunks) against the
    same step split past 512 tokens, each run in a fresh process: the split one peaks lower, by most of
    the planner's difference between the two."""
    rows = [{"instruction": " ".join(["word"] * 150), "output": " ".join(["answer"] * 150)} for _ in range(8)]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    peaks = {}
    for cap in ("null", "512"):
        args = _job(tmp_path, tiny_llama_dir, data, f"cap{cap}", "train.max_steps=1", "train.batch_size=8")
        args += ["data.max_length=512", f"train.micro_batch_tokens={cap}", "train.allocator=system"]
        peaks[cap] = train_in_fresh_process(args)["peak_rss"]
    assert peaks["512"] < 0.8 * peaks["null"], {k: f"{v / GiB:.2f} GiB" for k, v in peaks.items()}
