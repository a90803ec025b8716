"""`llamaforge sweep`: grid expansion and up-front validation, then real sweeps on the tiny Llama (one
subprocess per trial): the table rows, a failing trial recorded while the others run, resume, retry."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from conftest import chat_rows, write_jsonl
from llamaforge.cli import main
from llamaforge.errors import ConfigError
from llamaforge.sweep.grid import expand, parse_arguments, split_values, trial_configs
from llamaforge.sweep.report import best_trial, finite, parse_metric
from llamaforge.sweep.runner import last_error_line, run_child

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sweep.yaml"


# ---------------------------------------------------------------- grid


def test_split_values_only_at_top_level_commas():
    assert split_values("8,16, 32") == ["8", "16", "32"]
    assert split_values("attention,[q_proj,v_proj]") == ["attention", "[q_proj,v_proj]"]
    assert split_values("[{path: a, repeat: 2}],[{path: b}]") == ["[{path: a, repeat: 2}]", "[{path: b}]"]
    assert split_values("'Be brief, be kind',\"x,y\"") == ["'Be brief, be kind'", '"x,y"']
    assert split_values("don't, stop") == ["don't", "stop"]  # an apostrophe inside a word opens no quote
    assert split_values("[q_proj,v_proj]") == ["[q_proj,v_proj]"]


def test_axes_fixed_overrides_and_cartesian_product():
    axes, fixed = parse_arguments(
        [
            "method.rank=8,16",
            "train.max_steps=30",
            "method.targets=attention,all-linear",
            "method.modules_to_save=[lm_head,embed_tokens]",
        ]
    )
    assert [(a.key, a.texts) for a in axes] == [
        ("method.rank", ["8", "16"]),
        ("method.targets", ["attention", "all-linear"]),
    ]
    assert fixed == ["train.max_steps=30", "method.modules_to_save=[lm_head,embed_tokens]"]
    trials = expand(axes)
    assert [t.name for t in trials] == [
        "rank-8_targets-attention",
        "rank-8_targets-all-linear",
        "rank-16_targets-attention",
        "rank-16_targets-all-linear",
    ]
    assert trials[2].values == {"method.rank": 16, "method.targets": "attention"}  # parsed like overrides
    assert trials[2].overrides == ["method.rank=16", "method.targets=attention"]
    # keys with the same last part are told apart; a long value gets a short stable name
    axes, _ = parse_arguments(
        [
            "train.seed=1,2",
            "data.seed=3,4",
            "data.sources=[{path: a/very/long/path/x.jsonl}],[{path: b.jsonl}]",
        ]
    )
    names = [t.name for t in expand(axes)]
    assert names[0].startswith("train-seed-1_data-seed-3_sources-")
    assert len(set(names)) == 8 and all(len(n) < 80 for n in names)
    assert [t.name for t in expand([])] == ["single"]


@pytest.mark.parametrize(
    "tokens, message",
    [
        (["method.rank=8,16", "method.rank=4"], "given twice"),
        (["method.rank=8,,16"], "empty value"),
        (["method.rank=8,8"], "repeats a value"),
        (["output.name=a,b"], "cannot be swept"),
        (["method.rank"], "key.sub=value"),
    ],
)
def test_bad_grid_arguments(tokens, message):
    with pytest.raises(ConfigError, match=message):
        parse_arguments(tokens)


def test_every_trial_is_validated_before_anything_runs():
    axes, fixed = parse_arguments(["method.rnk=8,16"])
    with pytest.raises(ConfigError) as err:  # the same typo in every trial: shown once, nearest key suggested
        trial_configs(None, fixed, expand(axes))
    assert "did you mean 'method.rank'" in str(err.value) and "trial" not in str(err.value)
    axes, fixed = parse_arguments(["method.rank=8,0", "train.lr=1e-4"])
    with pytest.raises(ConfigError, match=r"(?s)trial rank-0 \(method.rank=0\).*method.rank: Input"):
        trial_configs(None, fixed, expand(axes))
    configs = trial_configs(None, [], expand(parse_arguments(["method.rank=4,8"])[0]))
    assert [c.method.rank for c in configs] == [4, 8]


def test_primary_metric_names_and_directions():
    assert parse_metric("eval_loss", False) == ("eval_loss", False)
    assert parse_metric("rougeL", True) == ("rougeL", True)
    assert parse_metric("tokens_per_s", False) == ("tokens_per_s", True)
    assert parse_metric("peak_rss_mb:max", False) == ("peak_rss_mb", True)
    with pytest.raises(ConfigError, match="Did you mean 'rougeL'"):
        parse_metric("rogueL", True)
    with pytest.raises(ConfigError, match="evaluation"):
        parse_metric("rougeL", False)


def test_example_sweep_validates_and_its_heldout_set_is_not_trained_on(capsys):
    """examples/sweep.yaml's 40 held-out alpaca records are none of the 64 that training reads."""
    from llamaforge.config import load_config
    from llamaforge.evaluate.tasks import load_task
    from llamaforge.train.data import iter_source

    assert (
        main(
            [
                "sweep",
                str(EXAMPLE),
                "--grid",
                "method.rank=8,16",
                "method.targets=attention,all-linear",
                "--metric",
                "rougeL",
                "--dry-run",
            ]
        )
        == 0
    )
    assert "4 trial(s)" in capsys.readouterr().out
    cfg = load_config(EXAMPLE)
    task = load_task(cfg.evaluation.task)
    assert len(task.examples) == 40
    trained = set()
    for src in cfg.data.sources:
        for conv in iter_source(src, strict=False, rejects=[]):
            trained |= {m.content for m in conv.messages if m.role != "system"}
    for ex in task.examples:
        assert ex.reference not in trained and ex.prompt[-1].content not in trained


# ---------------------------------------------------------------- one child process, measured


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_child_peak_memory_is_the_childs_own(tmp_path):
    # whatever this (pytest) process holds is not counted: the children live long enough to be polled
    small = run_child(_python("import time; time.sleep(0.6)"), tmp_path / "small.log")
    big = run_child(_python("import time; b = b'x' * (300 << 20); time.sleep(0.6)"), tmp_path / "big.log")
    assert small.exit_code == big.exit_code == 0 and small.signal is None
    assert big.peak_rss_mb - small.peak_rss_mb > 250  # 300 MB of bytes, in the child only
    assert small.peak_rss_mb < 200 and big.wall_s >= 0
    assert (tmp_path / "big.log").read_text().startswith("$ ")  # the command heads its log


def test_killed_and_crashed_children_give_their_reason(tmp_path):
    killed = run_child(
        _python("import os, signal; print('loading'); os.kill(os.getpid(), signal.SIGKILL)"),
        tmp_path / "killed.log",
    )
    assert killed.exit_code == -9 and killed.signal == "SIGKILL"
    crashed = run_child(
        _python(
            "import sys\nprint('step 1\\rstep 2')\ntry:\n    1/0\nexcept Exception:\n"
            "    raise ValueError('lr too high: loss is nan')"
        ),
        tmp_path / "crash.log",
    )
    assert crashed.exit_code == 1 and crashed.signal is None
    assert last_error_line(tmp_path / "crash.log") == "ValueError: lr too high: loss is nan"
    cli = run_child(
        _python("import sys; print('error: data file not found: x.jsonl', file=sys.stderr); sys.exit(2)"),
        tmp_path / "cli.log",
    )
    assert cli.exit_code == 2 and last_error_line(tmp_path / "cli.log") == "data file not found: x.jsonl"
    assert last_error_line(tmp_path / "missing.log") == "no log"


def test_best_trial_skips_failed_and_non_finite_and_json_stays_strict():
    results = [
        {"name": "a", "status": "completed", "metrics": {"eval_loss": 1.5}, "task_metrics": {"rougeL": 20.0}},
        {"name": "b", "status": "completed", "metrics": {"eval_loss": 1.2}, "task_metrics": {"rougeL": 18.0}},
        {"name": "c", "status": "diverged", "metrics": {"eval_loss": float("nan")}},
        {"name": "d", "status": "failed", "metrics": {"eval_loss": 0.1}},  # a failed trial never wins
    ]
    assert best_trial(results, "eval_loss", higher=False) == "b"
    assert best_trial(results, "rougeL", higher=True) == "a"
    assert best_trial(results, "bleu", higher=True) is None

    def reject(name):
        raise ValueError(name)

    assert json.loads(json.dumps(finite(results)), parse_constant=reject)[2]["metrics"]["eval_loss"] == "nan"


# ---------------------------------------------------------------- real sweeps (one subprocess per trial)


def _job(tmp: Path, tiny_llama_dir: Path) -> Path:
    data = write_jsonl(tmp / "data.jsonl", chat_rows(16))
    task = write_jsonl(tmp / "task.jsonl", chat_rows(16)[:4])
    job = {
        "model": {"source": str(tiny_llama_dir)},
        "data": {"sources": [{"path": str(data)}], "template": "llama3", "val_size": 0.25},
        "method": {"rank": 2, "dropout": 0.0},
        "train": {"max_steps": 3, "batch_size": 4, "precision": "fp32", "warmup_ratio": 0.0},
        "eval": {"prompts": [], "before_after": False},
        "output": {"dir": str(tmp / "runs"), "name": "tiny"},
        "evaluation": {
            "task": {"path": str(task)},
            "generation": {"max_new_tokens": 4, "batch_size": 4, "precision": "fp32"},
            "scoring": {
                "metrics": ["rouge"],
                "bootstrap_samples": 0,
                "fail_if": ["tuned.rougeL < base.rougeL"],
            },
        },
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _stamps(sweep: Path) -> dict[str, int]:
    return {
        str(p.relative_to(sweep)): p.stat().st_mtime_ns
        for p in sorted((sweep / "trials").glob("*/*"))
        if p.name in ("result.json", "train.log", "eval.log")
    }


def _lora_params(model_dir: Path, rank: int, modules: list[str]) -> int:
    """r * (in + out) per adapted Linear, from the model's shapes."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, head = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, cfg["num_key_value_heads"] * head),
        "v_proj": (hidden, cfg["num_key_value_heads"] * head),
        "o_proj": (hidden, hidden),
    }
    return cfg["num_hidden_layers"] * sum(rank * sum(shapes[m]) for m in modules)


@pytest.mark.slow  # three `llamaforge` subprocesses: ~40 s on an idle 2-core machine, minutes on a busy one
def test_sweep_records_a_failing_trial_writes_the_table_and_resumes(tmp_path, tiny_llama_dir, capsys):
    job = _job(tmp_path, tiny_llama_dir)
    out = tmp_path / "sw"
    argv = [
        "sweep",
        str(job),
        "--grid",
        "method.targets=attention,[nope]",
        "--metric",
        "rougeL",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[1/2] targets-attention ... completed" in printed and "[2/2] targets-nope ... failed" in printed

    data = json.loads((out / "results.json").read_text())
    rows = {r["trial"]: r for r in data["rows"]}
    assert list(rows) == ["targets-attention", "targets-nope"]
    ok, bad = rows["targets-attention"], rows["targets-nope"]
    assert ok["status"] == "completed" and ok["method.targets"] == "attention"
    assert ok["trainable_params"] == _lora_params(tiny_llama_dir, 2, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert ok["peak_rss_mb"] > 100 and ok["train_s"] > 0 and ok["tokens_per_s"] > 0
    assert math.isfinite(ok["train_loss"]) and math.isfinite(ok["eval_loss"]) and ok["eval_ppl"] > 1
    assert 0 <= ok["rougeL"] <= 100 and ok["task_loss"] > 0  # scored by `llamaforge eval` on the task
    assert (out / "trials" / "targets-attention" / "eval" / "results.json").is_file()
    # the failure is recorded with its reason (the last error line of its log) and the sweep went on
    assert bad["status"] == "failed" and bad["method.targets"] == ["nope"]
    assert "nope" in bad["reason"] and "not found" in bad["reason"]
    assert bad["peak_rss_mb"] > 0 and bad["rougeL"] is None
    result = json.loads((out / "trials" / "targets-nope" / "result.json").read_text())
    assert result["train"]["exit_code"] != 0 and "eval" not in result
    assert data["sweep"]["best"] == "targets-attention" and data["sweep"]["metric"] == "rougeL"

    md = (out / "results.md").read_text()
    assert "| trial | method.targets | status |" in md and "rougeL" in md
    assert "★ **targets-attention**" in md and "| targets-nope |" in md
    page = (out / "results.html").read_text()
    assert (
        '<tr class="best"><td>targets-attention</td>' in page
        and '<tr class="bad"><td>targets-nope</td>' in page
    )
    assert "data:image/png;base64,iVBOR" in page  # the chart, embedded

    # an existing sweep folder is only continued on purpose
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    # --resume runs nothing again: completed and failed trials are kept (their files untouched)
    before = _stamps(out)
    assert len(before) == 5  # train.log + result.json each, eval.log for the completed one
    assert main([*argv, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert _stamps(out) == before
    assert "targets-attention  kept: completed" in printed and "--retry-failed reruns it" in printed
    assert json.loads((out / "results.json").read_text())["rows"] == data["rows"]


@pytest.mark.slow
def test_retry_failed_reruns_only_failed_trials_and_divergence_is_recorded(tmp_path, tiny_llama_dir, capsys):
    job = _job(tmp_path, tiny_llama_dir)
    out = tmp_path / "sw"
    argv = ["sweep", str(job), "--grid", "train.lr=1e-3,1e30", "--no-eval", "--out", str(out)]
    assert main(argv) == 0
    rows = {r["trial"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["lr-1e-3"]["status"] == "completed"
    # NaN train loss, or the recipe's TrainingDiverged (non-zero exit, run.json "diverged")
    assert rows["lr-1e30"]["status"] == "diverged" and rows["lr-1e30"]["reason"]
    assert "rougeL" not in rows["lr-1e-3"]  # --no-eval: the runs' own eval loss only
    before = _stamps(out)
    assert main([*argv, "--retry-failed"]) == 0
    after = _stamps(out)
    assert after["trials/lr-1e-3/result.json"] == before["trials/lr-1e-3/result.json"]
    assert after["trials/lr-1e30/train.log"] != before["trials/lr-1e30/train.log"]
    capsys.readouterr()
