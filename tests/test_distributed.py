"""Data-parallel training on CPU: two torchrun processes (gloo) must train exactly like one process
with the same global batch.

The recipe deals the epoch's micro-batches round-robin to the processes (rank r takes batches r,
r+N, ...), so one optimizer step of N processes covers the same N micro-batches as one process
with train.grad_accum=N, and the loss is normalised by the target tokens of all of them. The
losses of every step, and the adapter at the end, must then agree to float32 rounding. A launch
whose processes do not sync gradients drifts from the second step on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import chat_rows, write_jsonl
from torchrun import torchrun_train

STEPS = 10  # 20 records / batch 2 = 10 micro-batches an epoch: 5 steps of 2 micro-batches, 2 epochs


def write_job(folder, model_dir):
    data = write_jsonl(folder / "data.jsonl", chat_rows(20))
    job = folder / "job.yaml"
    job.write_text(
        f"model: {{source: {model_dir}}}\n"
        f"data: {{sources: [{{path: {data}}}], template: llama3, val_size: 0}}\n"
        "method: {rank: 4, dropout: 0}\n"
        "train: {batch_size: 2, grad_accum: 1, epochs: 2, lr: 0.005, warmup_ratio: 0, precision: fp32}\n"
        "eval: {before_after: false, prompts: []}\n"
        f"output: {{dir: {folder / 'runs'}}}\n"
    )
    return job


def losses(run_dir) -> list[float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if "loss" in r]


def adapter(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_llama_dir):
    """The reference: one process, two accumulated micro-batches a step."""
    from llamaforge.config import load_config
    from llamaforge.train.recipe import run_training

    job = write_job(tmp_path_factory.mktemp("dist"), tiny_llama_dir)
    run_dir, _ = run_training(load_config(job, ["train.grad_accum=2", "output.name=single"]))
    assert len(losses(run_dir)) == STEPS
    return job, run_dir


def assert_same_training(run_dir, reference) -> None:
    got, want = losses(run_dir), losses(reference)
    assert len(got) == STEPS
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5, (got, want)
    mine, theirs = adapter(run_dir), adapter(reference)
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(one_process):
    job, reference = one_process
    torchrun_train(job, "output.name=two")
    assert_same_training(job.parent / "runs" / "two", reference)


@pytest.mark.slow
def test_plain_torchrun_is_joined_too(one_process):
    """Without ACCELERATE_USE_CPU, accelerate 1.15 still forms the gloo group, because the recipe asks
    for the CPU explicitly (Accelerator(cpu=True)): the same training, not two unsynchronised ones."""
    job, reference = one_process
    torchrun_train(job, "output.name=plain", accelerate_use_cpu=False)
    assert_same_training(job.parent / "runs" / "plain", reference)


def test_a_launch_accelerate_did_not_join_is_refused(monkeypatch):
    """What `torchrun` gives when accelerate is not told to use the CPU (a GPU-less machine with
    Accelerator(cpu=False)): one-process states in N processes, which check_launch refuses."""
    from accelerate.state import PartialState

    from llamaforge.errors import ConfigError
    from llamaforge.train.recipe import check_launch

    state = PartialState()
    assert state.num_processes == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="ACCELERATE_USE_CPU=1 torchrun"):
        check_launch(state)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(state)


# ---------------------------------------------------------------------- examples/accelerate/*.yaml

ACCELERATE_EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


def launch_env(name: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file <name>.yaml` gives each process, built by
    accelerate's own launcher code (no GPU needed to build it)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        [
            "--config_file",
            str(ACCELERATE_EXAMPLES / f"{name}.yaml"),
            "-m",
            "llamaforge.cli",
            "train",
            "job.yaml",
        ]
    )
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before deepspeed_launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize(
    "name, kind, sharded",
    [
        ("ddp", "MULTI_GPU", False),
        ("fsdp", "FSDP", True),
        ("fsdp_qlora", "FSDP", True),
        ("deepspeed_zero2", "DEEPSPEED", False),
        ("deepspeed_zero3", "DEEPSPEED", True),
    ],
)
def test_accelerate_examples_load_and_launch_as_documented(name, kind, sharded, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from llamaforge.models import _quantization_config, sharded_launch

    config = load_config_from_file(str(ACCELERATE_EXAMPLES / f"{name}.yaml"))
    assert config.distributed_type == DistributedType[kind] and config.num_processes >= 2
    env = launch_env(name)
    if name.startswith("fsdp"):
        assert (
            env["ACCELERATE_USE_FSDP"] == "true"
            and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
        )
        for flag in ("CPU_RAM_EFFICIENT_LOADING", "RESHARD_AFTER_FORWARD"):
            assert env[f"FSDP_{flag}"] == "true", flag
        assert env["FSDP_VERSION"] == "2"  # version 1 is refused at setup (train/sharded.py)
    if kind == "DEEPSPEED":
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == name[-1]
    # the loader reads the same variables: a sharded launch stores the 4-bit weights as bfloat16
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    assert sharded_launch() is sharded
    storage = _quantization_config("4bit", torch.bfloat16).bnb_4bit_quant_storage
    assert storage == (torch.bfloat16 if sharded else torch.uint8)


# ---------------------------------------------------------------------- DeepSpeed config vs the job


def train_section(**values):
    from llamaforge.config import load_config

    return load_config(None, [f"train.{k}={v}" for k, v in values.items()]).train


def test_deepspeed_auto_batch_settings_come_from_the_job():
    from llamaforge.train.sharded import reconcile_deepspeed

    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 3},
    }
    reconcile_deepspeed(ds, train_section(batch_size=4, grad_accum=1, max_grad_norm=0.5), world=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 8 and ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize(
    "key, value, field",
    [
        ("train_micro_batch_size_per_gpu", 8, "train.batch_size=4"),
        ("gradient_accumulation_steps", 4, "train.grad_accum=1"),
        ("train_batch_size", 64, "train.batch_size x train.grad_accum x processes=8"),
        ("gradient_clipping", 1.0, "train.max_grad_norm=0.5"),
    ],
)
def test_a_deepspeed_config_that_disagrees_with_the_job_is_refused(key, value, field):
    from llamaforge.errors import ConfigError
    from llamaforge.train.sharded import reconcile_deepspeed

    with pytest.raises(ConfigError, match=f"sets {key}={value} but the job has {field}"):
        reconcile_deepspeed(
            {key: value}, train_section(batch_size=4, grad_accum=1, max_grad_norm=0.5), world=2
        )


def test_deepspeed_refuses_accumulation_and_resume():
    from llamaforge.errors import ConfigError
    from llamaforge.train.sharded import reconcile_deepspeed

    with pytest.raises(ConfigError, match="train.grad_accum=4 under DeepSpeed"):
        reconcile_deepspeed({}, train_section(batch_size=2, grad_accum=4), world=2)
    with pytest.raises(ConfigError, match="--resume under DeepSpeed"):
        reconcile_deepspeed({}, train_section(batch_size=2, grad_accum=1), world=2, resume=True)


def test_the_zero3_example_config_passes_for_a_job_without_accumulation(monkeypatch):
    """accelerate's own DeepSpeed plugin, built from examples/accelerate/deepspeed_zero3.yaml's
    launch environment, agrees with a job of grad_accum 1 and max_grad_norm 1.0."""
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin

    from llamaforge.train.sharded import reconcile_deepspeed

    for key, value in launch_env("deepspeed_zero3").items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    ds = reconcile_deepspeed(plugin.deepspeed_config, train_section(batch_size=2, grad_accum=1), world=2)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == 2
