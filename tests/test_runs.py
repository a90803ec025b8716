"""runs.Run: every check of a run directory names the file and the field; run.json is written whole."""

from __future__ import annotations

import json

import pytest

from llamaforge.data.types import Conversation, Message
from llamaforge.errors import ModelSourceError
from llamaforge.runs import Run, run_status, write_val_conversations


def make_run(tmp_path, **info):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    data = {
        "status": "completed",
        "base_model": "base",
        "method": "lora",
        "weights": "adapter",
        "template": "llama3",
        "dataset_sha256": "ab" * 32,
        "step": 3,
        "total_steps": 3,
        **info,
    }
    (run / "run.json").write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return run


def test_open_reads_every_field(tmp_path):
    run = Run.open(make_run(tmp_path))
    assert (run.base_model, run.method, run.weights, run.status, run.template_name, run.step) == (
        "base",
        "lora",
        "adapter",
        "completed",
        "llama3",
        3,
    )
    assert run.is_adapter and run.weights_dir == tmp_path / "run" / "adapter"


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ({"method": None}, "field 'method' is missing"),
        ({"weights": "lora"}, "field 'weights' must be one of adapter, model"),
        ({"status": "done"}, "field 'status' must be one of running"),
    ],
)
def test_bad_run_json_names_the_file_and_field(tmp_path, info, message):
    run = make_run(tmp_path, **info)
    with pytest.raises(ModelSourceError, match=message) as exc:
        Run.open(run)
    assert str(run / "run.json") in str(exc.value)


def test_unreadable_or_missing_run_json(tmp_path):
    with pytest.raises(ModelSourceError, match="is not a llamaforge run"):
        Run.open(tmp_path)
    assert run_status(tmp_path) is None
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="run.json: not readable JSON"):
        Run.read(tmp_path)


def test_open_needs_the_weights_read_does_not(tmp_path):
    run = make_run(tmp_path, status="completed")
    (run / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(ModelSourceError, match="has no adapter at .*status completed"):
        Run.open(run)
    assert Run.read(run).status == "completed" == run_status(run)


def test_open_refuses_an_unfinished_run_read_does_not(tmp_path):
    run = make_run(tmp_path, status="interrupted")  # weights there: a checkpoint-era adapter, say
    with pytest.raises(ModelSourceError, match="status is 'interrupted'.*--resume"):
        Run.open(run)
    assert Run.read(run).status == "interrupted" == run_status(run)


def test_write_status_keeps_the_fields_and_leaves_no_temporary_file(tmp_path):
    run = Run.open(make_run(tmp_path))
    run.write_status("running", step=7)
    assert json.loads((run.dir / "run.json").read_text())["template"] == "llama3"
    again = Run.read(run.dir)
    assert (again.status, again.step, again.dataset_sha256) == ("running", 7, "ab" * 32)
    assert sorted(p.name for p in run.dir.iterdir()) == ["adapter", "run.json"]
    with pytest.raises(ValueError, match="no field 'steps'"):
        run.write_status("completed", steps=8)


def test_val_conversations_round_trip_and_name_a_bad_line(tmp_path):
    run = Run.open(make_run(tmp_path))
    with pytest.raises(ModelSourceError, match="has no val.jsonl"):
        run.val_conversations()
    convs = [
        Conversation(
            [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello")],
            "data.jsonl",
            4,
        )
    ]
    write_val_conversations(run.dir, convs)
    assert run.val_conversations() == convs
    with open(run.dir / "val.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ModelSourceError, match=r"val.jsonl:2: not a conversation record"):
        run.val_conversations()


def test_the_gateway_refuses_a_run_whose_method_cannot_hot_swap(tmp_path):
    from llamaforge.errors import ConfigError
    from llamaforge.serve.config import ServeConfig
    from llamaforge.serve.engine import Engine

    run = make_run(tmp_path, method="prefix")
    engine = Engine(ServeConfig(model=str(run)))
    with pytest.raises(ConfigError, match="a prefix adapter cannot be hot-loaded"):
        engine.load()
    assert engine.load_error and not engine.ready
