"""Nothing a user made is deleted, and nothing half-written is accepted (issue 15, "data loss" and
"atomicity"): the marker rule, outputs that hold inputs, output names, and writes that a kill in the
middle leaves whole. Every test only writes inside its own tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llamaforge.atomic import (
    MARKER,
    atomic_write_text,
    building_folder,
    check_not_input,
    check_replaceable,
    is_ours,
    name_problem,
)
from llamaforge.cli import main
from llamaforge.config import DataSource, load_config
from llamaforge.data.curate.config import PrepareConfig
from llamaforge.data.curate.pipeline import run_prepare
from llamaforge.data.curate.review import apply_review
from llamaforge.errors import ConfigError, ModelSourceError

ROWS = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red is one of the primary colours."},
    {
        "instruction": "What is the capital of France?",
        "input": "",
        "output": "Paris is the capital of France.",
    },
    {"instruction": "How many legs has a spider?", "input": "", "output": "A spider has eight legs in all."},
    {"instruction": "Who wrote Hamlet?", "input": "", "output": "William Shakespeare wrote the play Hamlet."},
]


def data_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def user_folder(path: Path) -> dict[str, bytes]:
    """A folder the user made (no marker), with files in it; returns its content to compare later."""
    (path / "notes").mkdir(parents=True)
    (path / "thesis.txt").write_text("five years of work", encoding="utf-8")
    (path / "notes" / "a.md").write_text("more work", encoding="utf-8")
    return snapshot(path)


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def prep_cfg(out: Path, **kw) -> PrepareConfig:
    return PrepareConfig.model_validate(
        {
            "output_dir": str(out),
            "arrow": False,
            "filters": {"enabled": False},
            "split": {"val": 0, "test": 0},
            **kw,
        }
    )


# ---------------------------------------------------------------- the rules themselves


def test_only_a_folder_llamaforge_made_is_replaced(tmp_path):
    mine = user_folder(tmp_path / "mine")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="not created by llamaforge"):
            check_replaceable(tmp_path / "mine", overwrite=overwrite, what="output folder")
    assert snapshot(tmp_path / "mine") == mine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        check_replaceable(tmp_path / "file", overwrite=True, what="output folder")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", overwrite=True, what="output folder")  # nothing to lose: no marker
    check_replaceable(tmp_path / "empty", overwrite=False, what="output folder", empty_ok=True)
    with pytest.raises(ConfigError, match="exists"):
        check_replaceable(tmp_path / "empty", overwrite=False, what="output folder")
    check_replaceable(tmp_path / "absent", overwrite=False, what="output folder")
    with building_folder(tmp_path / "made", "prepare") as tmp:
        (tmp / "train.jsonl").write_text("{}\n")
    assert is_ours(tmp_path / "made")
    with pytest.raises(ConfigError, match="exists"):
        check_replaceable(tmp_path / "made", overwrite=False, what="output folder")
    check_replaceable(tmp_path / "made", overwrite=True, what="output folder")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "x").write_text("x")
    os.symlink(tmp_path / "made" / MARKER, tmp_path / "fake" / MARKER)  # a marker must be a real file
    with pytest.raises(ConfigError, match="not created by llamaforge"):
        check_replaceable(tmp_path / "fake", overwrite=True, what="output folder")


def test_an_output_may_not_be_or_hold_an_input(tmp_path, monkeypatch):
    src = data_file(tmp_path / "work" / "data" / "train.jsonl")
    for out in (tmp_path / "work", tmp_path / "work" / "data", src):
        with pytest.raises(ConfigError, match="could delete it"):
            check_not_input(out, [src], "output folder")
    os.symlink(tmp_path / "work", tmp_path / "link")
    with pytest.raises(ConfigError, match="contains the input"):
        check_not_input(tmp_path / "link", [src], "output folder")  # through a symlink too
    check_not_input(tmp_path / "wor", [src], "output folder")  # a shared name prefix is not containment
    check_not_input(tmp_path / "work" / "data" / "out", [src], "output folder")  # beside an input is fine
    check_not_input(tmp_path / "out", [None, "", src], "output folder")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    for out in (".", tmp_path, "..", "../empty"):  # the folder the user works in, even empty
        with pytest.raises(ConfigError, match="current folder"):
            check_not_input(out, [src], "output folder")
    with pytest.raises(ConfigError, match="current folder"):
        run_prepare(prep_cfg(Path(".")), [DataSource(path=str(src))])
    assert (tmp_path / "empty").is_dir() and snapshot(tmp_path / "work") == {
        "data/train.jsonl": src.read_bytes()
    }


@pytest.mark.parametrize("name", ["..", ".", "../elsewhere", "a/b", "/etc", "a\\b", "  ", "x\x00y"])
def test_an_output_name_is_one_plain_folder_name(name):
    assert name_problem(name)
    with pytest.raises(ConfigError, match="output.name"):
        load_config(None, [f"output.name={name}"] if name.strip() else [f"output.name='{name}'"])


def test_plain_names_are_accepted():
    for name in ("run-1", "a..b", "try.2", "ünïcode"):
        assert name_problem(name) is None
        assert load_config(None, [f"output.name={name}"]).output.name == name


# ---------------------------------------------------------------- prepare never deletes a source


def test_prepare_with_overwrite_into_the_folder_holding_its_source_keeps_the_source(tmp_path, capsys):
    """The issue's example: prepare.overwrite=true and an output folder that contains the data."""
    work = tmp_path / "work"
    src = data_file(work / "raw.jsonl")
    before = snapshot(work)
    with pytest.raises(ConfigError, match="contains the input"):
        run_prepare(prep_cfg(work, overwrite=True), [DataSource(path=str(src))])
    assert snapshot(work) == before and leftovers(tmp_path) == []
    job = work / "job.yaml"
    job.write_text(
        f"data:\n  sources: [{{path: {src}}}]\nprepare:\n  output_dir: {work}\n  overwrite: true\n"
    )
    before = snapshot(work)
    assert main(["prepare", str(job)]) == 2
    err = capsys.readouterr().err
    assert "contains the input" in err and str(work) in err
    assert snapshot(work) == before


def test_prepare_refuses_every_output_that_would_lose_an_input(tmp_path):
    src = data_file(tmp_path / "deep" / "in" / "raw.jsonl")
    cases = [
        (tmp_path / "deep", [DataSource(path=str(src))], {}),  # a grandparent of the source
        (tmp_path / "deep" / "in", [DataSource(path="in/raw.jsonl")], {}),  # relative source path
        (
            tmp_path / "evals",
            [DataSource(path=str(src))],  # the evaluation set it decontaminates against
            {
                "decontaminate": {
                    "enabled": True,
                    "eval_sources": [{"path": str(data_file(tmp_path / "evals" / "e.jsonl"))}],
                }
            },
        ),
        (
            tmp_path / "lex",
            [DataSource(path=str(src))],  # a file the filters read
            {"filters": {"enabled": True, "profanity_file": str(tmp_path / "lex" / "words.txt")}},
        ),
    ]
    (tmp_path / "lex").mkdir()
    (tmp_path / "lex" / "words.txt").write_text("badword\n")
    for out, sources, extra in cases:
        before = snapshot(out)
        with pytest.raises(ConfigError, match="could delete it"):
            run_prepare(prep_cfg(out, overwrite=True, **extra), sources, base_dir=tmp_path / "deep")
        assert snapshot(out) == before
    job = data_file(tmp_path / "jobdir" / "keep.jsonl")  # the job file itself is protected by the CLI
    (tmp_path / "jobdir" / "job.yaml").write_text(
        f"data:\n  sources: [{{path: {src}}}]\nprepare:\n  output_dir: {tmp_path / 'jobdir'}\n  overwrite: true\n"
    )
    assert main(["prepare", str(tmp_path / "jobdir" / "job.yaml")]) == 2
    assert job.is_file() and (tmp_path / "jobdir" / "job.yaml").is_file()


def test_prepare_replaces_only_its_own_output(tmp_path):
    src = data_file(tmp_path / "raw.jsonl")
    mine = user_folder(tmp_path / "docs")
    with pytest.raises(ConfigError, match="not created by llamaforge"):
        run_prepare(prep_cfg(tmp_path / "docs", overwrite=True), [DataSource(path=str(src))])
    assert snapshot(tmp_path / "docs") == mine
    out = tmp_path / "prepared"
    run_prepare(prep_cfg(out), [DataSource(path=str(src))])
    assert is_ours(out) and (out / "train.jsonl").is_file()
    with pytest.raises(ConfigError, match="prepare.overwrite=true"):
        run_prepare(prep_cfg(out), [DataSource(path=str(src))])
    (out / "stale.txt").write_text("from the last run")
    run_prepare(prep_cfg(out, overwrite=True), [DataSource(path=str(src))])
    assert not (out / "stale.txt").exists() and is_ours(out) and leftovers(tmp_path) == []


# ---------------------------------------------------------------- runs, exports, merges, sweeps


def fake_run(run: Path, status: str | None = "completed", base: str = "some-base") -> Path:
    """A run folder as a finished training leaves it (the adapter's config only: nothing is loaded)."""
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    info = {"base_model": base, "method": "lora", "weights": "adapter", "template": "llama3"}
    if status is not None:
        info["status"] = status
    (run / "run.json").write_text(json.dumps(info))
    return run


def test_a_run_folder_is_replaced_only_when_llamaforge_made_it(tmp_path):
    from llamaforge.train.recipe import FineTuneRecipe
    from llamaforge.train.rundir import prepare_run_dir

    def prepare(r: FineTuneRecipe) -> None:
        prepare_run_dir(r.run_dir, r.cfg, resume=r.resume)

    src = data_file(tmp_path / "data.jsonl")

    def recipe(**kw):
        over = [
            f"data.sources=[{{path: {src}}}]",
            f"output.dir={tmp_path / 'runs'}",
            "output.name=r",
            "output.overwrite=true",
            *(f"{k}={v}" for k, v in kw.items()),
        ]
        return FineTuneRecipe(load_config(None, over))

    mine = user_folder(tmp_path / "runs" / "r")
    with pytest.raises(ConfigError, match="not created by llamaforge"):
        prepare(recipe())
    assert snapshot(tmp_path / "runs" / "r") == mine
    inside = data_file(tmp_path / "runs" / "r2" / "data.jsonl")
    (tmp_path / "runs" / "r2" / MARKER).write_text("{}")
    with pytest.raises(ConfigError, match="contains the input"):
        prepare(
            FineTuneRecipe(
                load_config(
                    None,
                    [
                        f"data.sources=[{{path: {inside}}}]",
                        f"output.dir={tmp_path / 'runs'}",
                        "output.name=r2",
                        "output.overwrite=true",
                    ],
                )
            )
        )
    assert inside.is_file()
    r = recipe(**{"output.name": "r3"})
    prepare(r)
    assert is_ours(tmp_path / "runs" / "r3")
    (tmp_path / "runs" / "r3" / "old.txt").write_text("x")
    prepare(recipe(**{"output.name": "r3"}))  # ours, overwrite=true: replaced
    assert not (tmp_path / "runs" / "r3" / "old.txt").exists()


def test_export_and_merge_never_replace_what_they_did_not_make(tmp_path):
    from llamaforge.export.cli_export import export_run
    from llamaforge.export.manifest import ExportError, atomic_dir
    from llamaforge.export.merge import merge_run

    base = tmp_path / "base-model"
    base.mkdir()
    (base / "config.json").write_text("{}")
    run = fake_run(tmp_path / "runs" / "r", base=str(base))
    mine = user_folder(tmp_path / "mine")
    with (
        pytest.raises(ExportError, match="not created by llamaforge"),
        atomic_dir(tmp_path / "mine", overwrite=True),
    ):
        pass
    assert snapshot(tmp_path / "mine") == mine
    for out in (run, tmp_path / "runs", base, tmp_path):
        for fmt in ("safetensors", "gguf", "quantized"):
            with pytest.raises(ConfigError, match="could delete it"):
                export_run(run, out, export_format=fmt, overwrite=True)
        with pytest.raises(ConfigError, match="could delete it"):
            merge_run(run, out, overwrite=True)
    with pytest.raises(ConfigError, match="not created by llamaforge"):
        merge_run(run, tmp_path / "mine", overwrite=True)
    assert snapshot(tmp_path / "mine") == mine and (run / "adapter" / "adapter_config.json").is_file()
    with atomic_dir(tmp_path / "exp") as tmp:
        (tmp / "model.gguf").write_bytes(b"GGUF")
    assert is_ours(tmp_path / "exp")
    with atomic_dir(tmp_path / "exp", overwrite=True) as tmp:  # an export llamaforge made: replaced
        (tmp / "model.gguf").write_bytes(b"GGUF2")
    assert (tmp_path / "exp" / "model.gguf").read_bytes() == b"GGUF2"


def test_a_sweep_writes_only_into_its_own_folder(tmp_path):
    from llamaforge.sweep.runner import run_sweep

    mine = user_folder(tmp_path / "mine")
    (tmp_path / "mine" / "trials").mkdir()
    for resume in (False, True):
        with pytest.raises(ConfigError, match="not created by llamaforge"):
            run_sweep(
                None,
                ["train.lr=1e-4,2e-4"],
                out=str(tmp_path / "mine"),
                resume=resume,
                echo=lambda *a, **k: None,
            )
    assert snapshot(tmp_path / "mine") == mine
    src = data_file(tmp_path / "sw" / "data.jsonl")
    with pytest.raises(ConfigError, match="contains the input"):
        run_sweep(
            None,
            ["train.lr=1e-4,2e-4", f"data.sources=[{{path: {src}}}]"],
            out=str(tmp_path / "sw"),
            echo=lambda *a, **k: None,
        )
    assert src.is_file()


# ---------------------------------------------------------------- unfinished runs are refused


@pytest.mark.parametrize("status", ["running", "interrupted", "diverged", "failed"])
def test_every_consumer_refuses_a_run_that_did_not_complete(tmp_path, status, capsys):
    from llamaforge.evaluate.candidates import load_candidate_tokenizer, parse_candidate
    from llamaforge.export.cli_export import export_run
    from llamaforge.export.merge import merge_run
    from llamaforge.runs import Run, load_for_inference

    run = fake_run(tmp_path / "run", status)
    expected = f"status is '{status}'"
    for use in (
        lambda: Run.open(run),
        lambda: load_for_inference(str(run)),
        lambda: export_run(run, tmp_path / "e", export_format="safetensors"),
        lambda: merge_run(run, tmp_path / "m"),
        lambda: load_candidate_tokenizer(parse_candidate(str(run))),
    ):
        with pytest.raises(ModelSourceError, match=expected):
            use()
    for command in (
        ["serve", str(run), "--print-vllm-command"],
        ["chat", str(run)],
        ["generate", str(run), "--prompt", "hi"],
    ):
        assert main(command) == 2, command
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "m").exists()


def test_a_completed_run_and_a_hand_written_one_are_accepted(tmp_path):
    from llamaforge.runs import Run

    assert Run.open(fake_run(tmp_path / "a")).as_dict()["status"] == "completed"
    assert "status" not in Run.open(fake_run(tmp_path / "b", status=None)).as_dict()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "run.json").write_text("{half a fi")
    with pytest.raises(ModelSourceError, match="not readable JSON"):
        Run.open(tmp_path / "c")


# ---------------------------------------------------------------- a kill midway leaves the old version


def test_atomic_write_text_killed_midway_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_text('{"status": "completed"}')

    def killed(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, '{"status": "running", "half": ')
    monkeypatch.undo()
    assert target.read_text() == '{"status": "completed"}' and leftovers(tmp_path) == []
    atomic_write_text(target, '{"status": "running"}')
    assert json.loads(target.read_text()) == {"status": "running"}


@pytest.mark.parametrize("where", ["phase2", "report", "card"])
def test_prepare_killed_midway_leaves_the_previous_dataset(tmp_path, monkeypatch, where):
    from llamaforge.data.curate import pipeline, report

    src = data_file(tmp_path / "raw.jsonl")
    out = tmp_path / "prepared"
    run_prepare(prep_cfg(out), [DataSource(path=str(src))])
    before = snapshot(out)  # a second run, with another split, is killed midway
    target = {
        "phase2": (pipeline.Pipeline, "_phase2"),
        "report": (report, "render_html"),
        "card": (report, "write_card"),
    }[where]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(*target, killed)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(prep_cfg(out, overwrite=True, split={"val": 0.5, "test": 0}), [DataSource(path=str(src))])
    assert snapshot(out) == before and leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        run_prepare(prep_cfg(tmp_path / "fresh"), [DataSource(path=str(src))])
    assert not (tmp_path / "fresh").exists() and leftovers(tmp_path) == []


def test_apply_review_killed_midway_changes_nothing(tmp_path, monkeypatch):
    import csv

    from llamaforge.data.curate import report

    src = data_file(tmp_path / "raw.jsonl")
    out = tmp_path / "prepared"
    run_prepare(prep_cfg(out, review={"sample_size": 4}), [DataSource(path=str(src))])
    with (out / "review.csv").open(encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f))
    table[0]["verdict"] = "reject"
    reviewed = tmp_path / "reviewed.csv"
    with reviewed.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    before = snapshot(out)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_card", killed)  # after the splits were rewritten
    with pytest.raises(KeyboardInterrupt):
        apply_review(out, reviewed)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    summary = apply_review(out, reviewed)
    assert summary["verdicts"] == {"reject": 1} and summary["splits"]["train"] == 3


def test_a_save_killed_midway_leaves_no_half_adapter_and_the_run_is_refused(
    tmp_path, tiny_llama_dir, monkeypatch
):
    """The final adapter is written beside its folder and renamed; until then run.json says "running"."""
    from conftest import chat_rows, write_jsonl
    from llamaforge.runs import Run
    from llamaforge.train.recipe import FineTuneRecipe

    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(8))
    cfg = load_config(
        None,
        [
            f"model.source={tiny_llama_dir}",
            f"data.sources=[{{path: {data}}}]",
            "data.template=llama3",
            "data.val_size=0",
            f"output.dir={tmp_path / 'runs'}",
            "output.name=r",
            "eval.prompts=[]",
            "eval.before_after=false",
            "train.max_steps=1",
            "train.batch_size=4",
            "train.precision=fp32",
            "method.rank=4",
        ],
    )
    recipe = FineTuneRecipe(cfg)
    recipe.setup()
    try:
        recipe.train()

        def disk_full(folder):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(recipe.template, "save", disk_full)  # the tokenizer and weights were written
        with pytest.raises(OSError, match="No space"):
            recipe.save()
        run = recipe.run_dir
        assert not (run / "adapter").exists() and leftovers(run) == [MARKER]
        assert json.loads((run / "run.json").read_text())["status"] == "running"
        with pytest.raises(ModelSourceError, match="status is 'running'"):
            Run.open(run)
        monkeypatch.undo()
        recipe.save()
    finally:
        recipe.cleanup()
    assert Run.open(run).status == "completed" and leftovers(run) == [MARKER]
    model, _ = Run.open(run).load()
    assert model.peft_config["default"].r == 4
