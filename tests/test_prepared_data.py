"""One content hash and split for `prepare` and `train` (data/split.py), and `data.prepared: DIR`:
train reads a prepare output's splits as they are, after checking DIR is one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import chat_rows, write_jsonl
from llamaforge.config import load_config
from llamaforge.data.curate.config import PrepareConfig
from llamaforge.data.curate.pipeline import run_prepare
from llamaforge.data.types import Conversation
from llamaforge.errors import ConfigError
from llamaforge.schema import DataConfig, DataSource
from llamaforge.templates import get_template
from llamaforge.train.data import prepare_data, split_conversations


def prepare(tmp_path: Path, rows: list[dict], val: float) -> Path:
    src = write_jsonl(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "prepared"
    cfg = PrepareConfig.model_validate(
        {
            "output_dir": str(out),
            "arrow": False,
            "filters": {"enabled": False},
            "review": {"enabled": False},
            "split": {"val": val, "test": 0},
        }
    )
    run_prepare(cfg, [DataSource(path=str(src))])
    return out


def contents(convs) -> list[list[tuple[str, str]]]:
    return sorted([(m.role, m.content) for m in c.messages] for c in convs)


def read_split(path: Path) -> list[Conversation]:
    return [Conversation.from_dict(json.loads(line)) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare(tmp_path_factory.mktemp("prep"), chat_rows(120), val=0.25)


def test_prepare_and_train_put_each_record_in_the_same_split(prepared):
    """train's own split of the records (data.val_size) is prepare's split (split.val, seed 0)."""
    raw = prepared.parent / "raw.jsonl"
    rejects: list = []
    train, val = split_conversations(DataConfig(sources=[DataSource(path=str(raw))], val_size=0.25), rejects)
    assert not rejects and 10 < len(val) < 50
    assert contents(val) == contents(read_split(prepared / "val.jsonl"))
    assert contents(train) == contents(read_split(prepared / "train.jsonl"))


def test_train_reads_the_prepared_splits_and_card(prepared, llama3_tokenizer):
    cfg = DataConfig(prepared=str(prepared), template="llama3")
    data = prepare_data(cfg, get_template("llama3", llama3_tokenizer))
    on_disk_val = read_split(prepared / "val.jsonl")
    assert data.card["train_records"] == len(read_split(prepared / "train.jsonl"))
    assert data.card["val_records"] == len(on_disk_val) and contents(data.val_conversations) == contents(
        on_disk_val
    )
    card = json.loads((prepared / "card.json").read_text())
    assert [s["file"] for s in data.card["sources"]] == [str(prepared / "train.jsonl")]
    assert data.card["sources"][0]["prepared_dataset_sha256"] == card["dataset_sha256"]
    assert data.card["val_sources"][0]["prepared_dataset_sha256"] == card["dataset_sha256"]


def test_data_prepared_is_checked_before_anything_is_read(tmp_path, prepared):
    def split(folder) -> None:
        split_conversations(DataConfig(prepared=str(folder)), [])

    with pytest.raises(ConfigError, match=f"data.prepared: {tmp_path / 'nope'} is not a folder"):
        split(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "train.jsonl").write_text("")
    with pytest.raises(
        ConfigError, match=f"is not a prepare output: {tmp_path / 'plain' / 'card.json'} is missing"
    ):
        split(tmp_path / "plain")

    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("card.json", "train.jsonl"):
        (copy / name).write_bytes((prepared / name).read_bytes())
    with pytest.raises(ConfigError, match=f"not a complete prepare output: {copy / 'val.jsonl'} is missing"):
        split(copy)
    (copy / "val.jsonl").write_bytes((prepared / "val.jsonl").read_bytes())
    split(copy)  # complete again
    with open(copy / "train.jsonl", "a", encoding="utf-8") as fh:
        fh.write(
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
            )
            + "\n"
        )
    with pytest.raises(ConfigError, match=f"{copy / 'train.jsonl'} changed after prepare wrote"):
        split(copy)
    (copy / "card.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not a prepare card"):
        split(copy)


def test_data_prepared_replaces_the_sources_and_split(prepared):
    cfg = load_config(None, [f"data.prepared={prepared}"])
    assert cfg.data.prepared == str(prepared)
    for extra in (
        "data.val_size=0.2",
        "data.sources=[{path: x.jsonl}]",
        "data.val_sources=[{path: v.jsonl}]",
    ):
        with pytest.raises(ConfigError, match=f"leave {extra.split('=')[0]} unset"):
            load_config(None, [f"data.prepared={prepared}", extra])


def test_preference_objectives_refuse_data_prepared(prepared, llama3_tokenizer):
    from llamaforge.train.preference_data import prepare_preferences

    with pytest.raises(ConfigError, match="preference objectives read their pairs"):
        prepare_preferences(
            DataConfig(prepared=str(prepared)), "pairs", get_template("llama3", llama3_tokenizer)
        )


def test_the_planner_counts_the_prepared_train_split(prepared):
    from llamaforge.planning.data_tokens import job_tokens

    tokens, how = job_tokens(load_config(None, [f"data.prepared={prepared}"]))
    assert how.startswith(f"~{len(read_split(prepared / 'train.jsonl'))} records") and tokens > 0
