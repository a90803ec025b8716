"""The job schema, overrides and the CLI surface."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llamaforge.cli import COMMANDS, build_parser, main
from llamaforge.config import JobConfig, load_config, to_yaml
from llamaforge.errors import ConfigError


def test_defaults_are_complete_and_round_trip(tmp_path):
    cfg = load_config()
    path = tmp_path / "job.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg
    assert cfg.model.source == "smollm2-135m-instruct" and cfg.method.name == "lora"


def test_dotted_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(
        None,
        [
            "train.lr=1e-4",
            "method.targets=[q_proj,v_proj]",
            "train.max_steps=3",
            "data.system_prompt=Be brief: always",
        ],
    )
    assert cfg.train.lr == 1e-4 and cfg.method.targets == ["q_proj", "v_proj"] and cfg.train.max_steps == 3
    assert cfg.data.system_prompt == "Be brief: always"


@pytest.mark.parametrize(
    "override, hint",
    [
        ("trian.lr=1", "did you mean 'train'"),
        ("train.learning_rat=1", None),
        ("method.rnk=4", "did you mean 'method.rank'"),
        ("data.sources=[{path: x, fromat: alpaca}]", "did you mean 'data.sources.0.format'"),
    ],
)
def test_unknown_keys_suggest_the_nearest(override, hint):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert "unknown key" in str(err.value)
    if hint:
        assert hint in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.name=full", "model.quantization=4bit"], "cannot train 4bit"),
        (["method.name=qlora", "model.quantization=8bit"], "8bit contradicts"),
        (["train.eval_every=10", "data.val_size=0"], "needs validation data"),
        (["method.dropout=1.5"], "method.dropout"),
        (["train.batch_size=0"], "train.batch_size"),
        (["data.val_size=2.5"], "whole count"),
    ],
)
def test_impossible_combinations_fail_before_any_model_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_qlora_implies_4bit():
    assert load_config(None, ["method.name=qlora"]).quantization == "4bit"
    assert JobConfig().quantization == "none"


def test_every_command_has_help_with_an_example(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert name in COMMANDS
        assert "example" in (p.epilog or "").lower(), f"{name} --help has no example"
    for name in ("train", "chat", "generate", "merge", "config", "models"):
        assert name in sub.choices


def test_config_show_and_errors_through_main(capsys, tmp_path):
    assert main(["config", "show", "method.rank=8"]) == 0
    assert "rank: 8" in capsys.readouterr().out
    assert main(["config", "show", "method.rnk=8"]) == 2
    assert "did you mean 'method.rank'" in capsys.readouterr().err


def test_cli_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "llamaforge.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "train" in out.stdout


def test_train_dry_run_counts_parameters_without_loading_weights(tiny_llama_dir, capsys):
    from transformers import AutoModelForCausalLM

    assert main(["train", "--dry-run", f"model.source={tiny_llama_dir}", "method.name=full"]) == 0
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).parameters())
    assert f"{total:,} trainable of {total:,}" in capsys.readouterr().out
    assert main(["train", "--dry-run", f"model.source={tiny_llama_dir}", "method.rank=4"]) == 0
    assert "lora: " in capsys.readouterr().out
