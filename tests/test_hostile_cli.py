"""Bad input given to the CLI and the data readers: every bad record becomes a reject that names its
file, line, field and reason, and the run goes on; every bad file is a clear error, never a hang or
a traceback; every output is strict JSON (issue 15, "CLI and data")."""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamaforge.cli import main
from llamaforge.config import DataSource, load_config
from llamaforge.data.curate.config import PrepareConfig
from llamaforge.data.curate.pipeline import run_prepare
from llamaforge.data.curate.review import apply_review, neutralise, restore
from llamaforge.data.formats import read_source
from llamaforge.data.types import Rejected
from llamaforge.errors import ConfigError, DataError

GOOD = {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."}
SRC = Path(__file__).resolve().parents[1] / "src"


def cfg(out: Path, **kw) -> PrepareConfig:
    return PrepareConfig.model_validate({"output_dir": str(out), "arrow": False, **kw})


FACTS = [
    ("Name a primary colour.", "Red is one of the three primary colours of paint."),
    ("What is the capital of France?", "Paris has been the capital of France for centuries."),
    ("How many legs does a spider have?", "A spider has eight legs, unlike insects with six."),
    ("Which planet is closest to the sun?", "Mercury orbits closest to the sun in our solar system."),
    ("What do bees make?", "Bees make honey from the nectar they gather from flowers."),
    ("Why do we need sleep?", "Sleep lets the brain consolidate memories and the body recover."),
    ("What is water made of?", "Each water molecule holds two hydrogen atoms and one oxygen atom."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet around the year sixteen hundred."),
    ("What is a prime number?", "A prime has exactly two divisors: one and the number itself."),
    ("How far is the moon?", "The moon lies about three hundred eighty thousand kilometres away."),
    ("What gas do plants absorb?", "Plants take in carbon dioxide and release oxygen by photosynthesis."),
    ("What is the boiling point of water?", "At sea level pure water boils at one hundred degrees Celsius."),
]


def good(i: int) -> dict:
    return {"instruction": FACTS[i][0], "input": "", "output": FACTS[i][1]}


def _no_constant(name: str):
    raise AssertionError(f"{name} is not JSON")


def strict_lines(path: Path) -> list[dict]:
    """Parse JSON lines like a strict RFC 8259 reader: NaN/Infinity and bytes that are not UTF-8 fail."""
    text = path.read_bytes().decode("utf-8")
    return [json.loads(x, parse_constant=_no_constant) for x in text.splitlines() if x.strip()]


def rejects_of(path: Path) -> list[Rejected]:
    return [r for r in read_source(path) if isinstance(r, Rejected)]


def kept_of(path: Path) -> list:
    return [r for r in read_source(path) if not isinstance(r, Rejected)]


# ---------------------------------------------------------------- records that crashed prepare


@pytest.mark.parametrize("ext", [".jsonl", ".json"])
def test_numbers_too_long_to_read_are_rejects_and_the_file_goes_on(tmp_path, ext):
    rows = [
        json.dumps(good(0)),
        '{"instruction": "big", "output": "x", "n": ' + "9" * 5000 + "}",
        '{"instruction": "neg", "output": "x", "n": [-' + "1" * 4400 + "]}",
        json.dumps(good(1)),
    ]
    path = tmp_path / f"big{ext}"
    path.write_text("\n".join(rows) + "\n" if ext == ".jsonl" else "[\n" + ",\n".join(rows) + "\n]\n")
    first = 1 if ext == ".jsonl" else 2  # a .json array's first record is on line 2
    rejects = rejects_of(path)
    assert [r.line for r in rejects] == [first + 1, first + 2]
    assert all("number too long" in r.reason for r in rejects)
    assert len(kept_of(path)) == 2  # the records after the bad ones are read


@pytest.mark.parametrize("ext", [".jsonl", ".json"])
def test_absurd_nesting_is_a_reject_not_a_recursion_error(tmp_path, ext):
    deep = "[" * 100_000 + "]" * 100_000
    rows = [
        json.dumps(good(0)),
        '{"instruction": "deep", "output": "x", "meta": ' + deep + "}",
        deep,
        '{"instruction": "deep-ish", "output": "x", "meta": ' + "[" * 500 + "]" * 500 + "}",
        json.dumps(good(1)),
    ]
    path = tmp_path / f"deep{ext}"
    path.write_text("\n".join(rows) + "\n" if ext == ".jsonl" else "[\n" + ",\n".join(rows) + "\n]\n")
    first = 1 if ext == ".jsonl" else 2
    rejects = rejects_of(path)
    assert [r.line for r in rejects] == [first + 1, first + 2, first + 3]
    assert "nested too deeply" in rejects[0].reason and "nested too deeply" in rejects[1].reason
    assert "nested more than 100 levels" in rejects[2].reason and rejects[2].field == "meta"
    assert isinstance(rejects[2].record, str) and len(rejects[2].record) < 1000  # a bounded snippet
    assert len(kept_of(path)) == 2


def test_non_finite_numbers_and_lone_surrogates_are_rejected_with_their_field(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(
        json.dumps(good(0))
        + "\n"
        + '{"instruction": "q", "output": "a", "score": NaN}\n'
        + '{"instruction": "q", "output": "a", "extra": {"w": [1, Infinity]}}\n'
        + '{"instruction": "q", "output": "a", "w": -1e999}\n'
        + '{"instruction": "q \\ud800 z", "output": "a"}\n'
        + '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfff"}]}\n',
        encoding="utf-8",
    )
    rejects = rejects_of(path)
    got = [(r.line, r.field) for r in rejects]
    assert got == [(2, "score"), (3, "extra.w[1]"), (4, "w"), (5, "instruction"), (6, "messages[1].content")]
    assert "NaN" in rejects[0].reason and "Infinity" in rejects[1].reason and "-Infinity" in rejects[2].reason
    assert "lone surrogate \\ud800" in rejects[3].reason


def test_prepare_goes_on_and_writes_strict_json_whatever_the_records_hold(tmp_path):
    src = tmp_path / "hostile.jsonl"
    src.write_text(
        "".join(json.dumps(good(i)) + "\n" for i in range(3))
        + '{"instruction": "nan", "output": "a", "score": NaN}\n'
        + '{"instruction": "kept? \\ud83d", "output": "a lone high surrogate"}\n'
        + '["\\udc00", 5]\n'
        + '{"no_format": "\\ud800", "x": Infinity}\n'
        + '{"instruction": "x", "output": "y", "n": '
        + "7" * 5000
        + "}\n"
        + "[" * 50_000
        + "]" * 50_000
        + "\n",
        encoding="utf-8",
    )
    report = run_prepare(cfg(tmp_path / "out"), [DataSource(path=str(src))])
    out = tmp_path / "out"
    assert report["records_out"] == 3 and report["steps"]["ingest"]["rejected"] == 6
    kept = (
        strict_lines(out / "train.jsonl") + strict_lines(out / "val.jsonl") + strict_lines(out / "test.jsonl")
    )
    assert len(kept) == 3
    rejects = strict_lines(out / "rejects.jsonl")
    assert [r["line"] for r in rejects] == [4, 5, 6, 7, 8, 9]
    assert all(r["source"] == str(src) and r["reason"] for r in rejects)
    assert rejects[1]["field"] == "instruction" and "\ufffd" in rejects[1]["record"]["instruction"]
    assert (
        "must be an object" in rejects[2]["reason"] and rejects[2]["record"][0] == "\ufffd"
    )  # made writable
    assert rejects[3]["record"]["x"] == "Infinity"
    json.loads((out / "report.json").read_text(encoding="utf-8"), parse_constant=_no_constant)


def parquet_file(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_columns_without_a_json_form_are_rejects_naming_the_column(tmp_path):
    import pyarrow as pa

    n = 2
    base = {"instruction": ["q1", "q2"], "output": ["a1", "a2"]}
    cases = {
        "created": (
            pa.array([dt.datetime(2024, 1, 1), dt.datetime(2024, 1, 2)], pa.timestamp("us")),
            "timestamp",
        ),
        "blob": (pa.array([b"\x00\xff", b"\x01"], pa.binary()), "binary data"),
        "day": (pa.array([dt.date(2024, 1, 1)] * n, pa.date32()), "a date"),
        "price": (pa.array([decimal.Decimal("1.50")] * n, pa.decimal128(5, 2)), "a decimal"),
        "score": (pa.array([float("nan"), 1.0], pa.float64()), None),
    }
    for name, (column, word) in cases.items():
        path = parquet_file(tmp_path / f"{name}.parquet", {**base, name: column})
        rejects = rejects_of(path)
        expected = n if word else 1  # NaN in row 1 only
        assert len(rejects) == expected and all(r.field == name for r in rejects), name
        assert word is None or word in rejects[0].reason
        assert rejects[0].line == 1
    # a timestamp past what Python can hold: that row alone is a reject, the rest are read
    far = pa.array([253402300800 * 10**6, 0], pa.timestamp("us"))  # year 10000, then 1970
    path = parquet_file(tmp_path / "far.parquet", {**base, "t": far})
    rejects = rejects_of(path)
    assert [r.line for r in rejects] == [1, 2] and {r.field for r in rejects} == {"t"}


def test_prepare_on_a_parquet_with_timestamp_and_binary_columns_goes_on(tmp_path):
    import pyarrow as pa

    rows = [good(i) for i in range(4)]
    path = parquet_file(
        tmp_path / "mixed.parquet",
        {
            "instruction": [r["instruction"] for r in rows],
            "output": [r["output"] for r in rows],
            "created": pa.array([dt.datetime(2024, 1, i + 1) for i in range(4)], pa.timestamp("ms")),
        },
    )
    other = tmp_path / "fine.jsonl"
    other.write_text("".join(json.dumps(good(10 + i)) + "\n" for i in range(2)), encoding="utf-8")
    blob = parquet_file(tmp_path / "blob.parquet", {"text": pa.array([b"raw bytes"], pa.binary())})
    report = run_prepare(cfg(tmp_path / "out"), [DataSource(path=str(p)) for p in (path, blob, other)])
    rejects = strict_lines(tmp_path / "out" / "rejects.jsonl")
    assert len(rejects) == 5 and {r["field"] for r in rejects} == {"created", "text"}
    assert {r["line"] for r in rejects if r["field"] == "created"} == {1, 2, 3, 4}
    assert report["records_out"] == 2  # the other source still went through


# ---------------------------------------------------------------- files that are not data files


def run_cli(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "llamaforge.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_fifo_or_a_device_as_a_source_is_refused_at_once(tmp_path):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="FIFO"):
        read_source(fifo)
    with pytest.raises(DataError, match="device"):
        read_source("/dev/null")  # no known extension either: the kind of file is checked first
    sock_dir = tmp_path / "s"
    sock_dir.mkdir()
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_dir / "data.jsonl"))
    try:
        with pytest.raises(DataError, match="socket"):
            read_source(sock_dir / "data.jsonl")
    finally:
        sock.close()
    from llamaforge.data.curate.config import FiltersConfig
    from llamaforge.data.curate.filters import Filters
    from llamaforge.data.curate.review import read_verdicts
    from llamaforge.data.curate.synth import read_document

    with pytest.raises(DataError, match="FIFO"):
        read_verdicts(fifo)  # a reviewed CSV
    with pytest.raises(DataError, match="FIFO"):
        read_document(fifo)  # a synth document
    with pytest.raises(ConfigError, match="not a regular file"):
        Filters(FiltersConfig(profanity_file=str(fifo)))
    job = tmp_path / "job.yaml"
    job.write_text(f"data:\n  sources: [{{path: {fifo}}}]\nprepare:\n  output_dir: {tmp_path / 'out'}\n")
    done = run_cli(["prepare", str(job)], tmp_path, timeout=60)  # a hang would time out
    assert done.returncode == 2 and "FIFO" in done.stderr and str(fifo) in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("case", ["latin1", "deep", "deep_flow", "huge_int", "fifo", "directory"])
def test_a_bad_job_file_is_a_clear_error_naming_it(tmp_path, case, capsys):
    job = tmp_path / "job.yaml"
    if case == "latin1":
        job.write_bytes("data:\n  sources: [{path: caf\xe9.jsonl}]\n".encode("latin-1"))
    elif case == "deep":
        job.write_text("train: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n")
    elif case == "deep_flow":
        job.write_text("train: " + "[" * 20_000 + "]" * 20_000 + "\n")
    elif case == "huge_int":
        job.write_text("train:\n  seed: " + "9" * 5000 + "\n")
    elif case == "fifo":
        os.mkfifo(job)
    else:
        job.mkdir()
    with pytest.raises(ConfigError) as err:
        load_config(job)
    assert str(job) in str(err.value)
    for command in (["train", str(job), "--dry-run"], ["prepare", str(job)]):
        assert main(command) == 2  # an error for the user (anything else would raise here)
        assert str(job) in capsys.readouterr().err


def test_train_dry_run_checks_that_the_data_exists(tmp_path, tiny_llama_dir, capsys):
    good_file = tmp_path / "ok.jsonl"
    good_file.write_text(json.dumps(good(0)) + "\n", encoding="utf-8")
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "data.xlsx").write_text("x")
    cases = [
        ("data.sources", tmp_path / "missing.jsonl", "not found"),
        ("data.val_sources", tmp_path / "missing-val.jsonl", "not found"),
        ("data.sources", fifo, "FIFO"),
        ("data.sources", tmp_path / "folder.jsonl", "directory"),
        ("data.sources", tmp_path / "data.xlsx", "unknown file type"),
    ]
    for key, path, words in cases:
        overrides = [
            f"model.source={tiny_llama_dir}",
            f"data.sources=[{{path: {good_file}}}]",
            f"{key}=[{{path: {path}}}]",
        ]
        assert main(["train", "--dry-run", *overrides]) == 2, key
        err = capsys.readouterr().err
        assert f"{key}[0]" in err and str(path) in err and words in err, err
    assert (
        main(
            ["train", "--dry-run", f"model.source={tiny_llama_dir}", f"data.sources=[{{path: {good_file}}}]"]
        )
        == 0
    )


# ---------------------------------------------------------------- review.csv and spreadsheets

FORMULAS = [
    '=HYPERLINK("http://x","y")',
    "+1+1",
    "-2+3",
    "@SUM(A1)",
    "\t=1",
    "\r=1",
    "'=already quoted",
    "''+two quotes",
    "'plain quote",
    "plain",
    "",
    "a=b",
    "é=ok",
]


def test_neutralise_and_restore_are_exact_inverses():
    for text in FORMULAS:
        cell = neutralise(text)
        assert restore(cell) == text
        assert not cell or cell[0] not in "=+-@\t\r", text  # nothing a spreadsheet evaluates
    assert neutralise("plain") == "plain" and neutralise(3) == 3


def test_review_csv_neutralises_formulas_and_apply_review_restores_them(tmp_path):
    rows = [
        {"instruction": f"=cmd|' /C calc'!A{i}", "input": "", "output": f"-{i} and more text {i}"}
        for i in range(6)
    ]
    rows += [
        {"instruction": f"@user question {i}", "input": "", "output": f"+{i} is the answer here"}
        for i in range(6)
    ]
    src = tmp_path / "f.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    run_prepare(
        cfg(
            out,
            split={"val": 0, "test": 0},
            review={"sample_size": 12},
            dedup={"enabled": False},
            contradictions={"enabled": False},
        ),
        [DataSource(path=str(src))],
    )
    with (out / "review.csv").open(encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 12
    for row in table:
        for key, value in row.items():
            assert not value or value[0] not in "=+-@\t\r", (key, value)
    table[0]["verdict"], table[0]["edited_answer"] = "edit", neutralise("=SUM(A1:A9) is a formula")
    table[1]["verdict"], table[1]["edited_prompt"] = "edit", neutralise("-negative prompt")
    table[2]["verdict"], table[2]["note"] = "reject", neutralise("@reviewer: off topic")
    reviewed = tmp_path / "reviewed.csv"
    with reviewed.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    apply_review(out, reviewed)
    kept = strict_lines(out / "train.jsonl")
    answers = {m["content"] for r in kept for m in r["messages"] if m["role"] == "assistant"}
    prompts = {m["content"] for r in kept for m in r["messages"] if m["role"] == "user"}
    assert "=SUM(A1:A9) is a formula" in answers and "-negative prompt" in prompts
    assert any(p.startswith("=cmd|") for p in prompts) and any(a.startswith("+") for a in answers)
    notes = [r["reason"] for r in strict_lines(out / "rejects.jsonl") if r["step"] == "review"]
    assert notes == ["review: rejected (@reviewer: off topic)"]


# ---------------------------------------------------------------- dedup keep=longest


@pytest.mark.parametrize("batch_size", [1, 2, 64])
@pytest.mark.parametrize("near", [False, True])
def test_dedup_keep_longest_keeps_the_longest_even_within_one_batch(tmp_path, batch_size, near):
    """Four groups of three duplicates (same prompt), the longest answer first, second or last."""
    prompts = [
        "Explain why the sky looks blue on a clear afternoon.",
        "List three uses of copper wire at home.",
        "Describe how a bicycle gear changes speed.",
        "Summarise the plot of a famous opera.",
    ]
    answers = [
        "Long answer: a full explanation that is clearly the longest of the three here.",
        "Short.",
        "Medium: a brief one.",
    ]
    rows = []
    for prompt, order in zip(prompts, ([0, 1, 2], [1, 0, 2], [1, 2, 0], [2, 1, 0]), strict=True):
        rows += [
            {"instruction": prompt, "input": "", "output": f"{answers[i]} ({prompt[:12]})"} for i in order
        ]
    src = tmp_path / "dups.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    dedup = {"compare": "prompt", "keep": "longest", "exact": True, "near": near}
    run_prepare(
        cfg(
            tmp_path / "out",
            batch_size=batch_size,
            dedup=dedup,
            split={"enabled": False},
            contradictions={"enabled": False},
            filters={"enabled": False},
        ),
        [DataSource(path=str(src))],
    )
    kept = strict_lines(tmp_path / "out" / "train.jsonl")
    assert sorted(r["messages"][1]["content"] for r in kept) == sorted(
        f"{answers[0]} ({p[:12]})" for p in prompts
    )
