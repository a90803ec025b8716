"""`format: feedback` (issue 19): the server's feedback log becomes SFT, KTO or DPO examples, inside a time
window, through `llamaforge prepare`'s curation; malformed lines are rejected with file, line and field."""

from __future__ import annotations

import json

import pytest

from llamaforge.cli import main
from llamaforge.data.feedback import read_feedback
from llamaforge.data.types import Conversation, Rejected
from llamaforge.schema import FeedbackOptions
from llamaforge.train.preference_data import read_preferences


def rating(
    n: int, rating, prompt="user: What is 2+2?", response="5", correction=None, time=None, **kw
) -> dict:
    return {
        "time": time or f"2026-11-30T10:{n:02d}:00Z",
        "id": f"chatcmpl-{n:024x}",
        "owner": "ab" * 16,
        "rating": rating,
        "correction": correction,
        "comment": None,
        "model": "support",
        "template": "llama3",
        "chat": True,
        "prompt": prompt,
        "response": response,
        **kw,
    }


LOG = [
    rating(1, "down", correction="4"),
    rating(2, "up", prompt="system: Be brief.\nuser: Capital of France?", response="Paris."),
    rating(3, 2, prompt="user: Capital of France?", response="Lyon."),
    rating(4, 5, prompt="user: Capital of France?", response="Paris."),
    rating(5, 3, prompt="user: Colour of the sky?", response="Blue."),  # neutral
    rating(6, "down", prompt="user: Colour of the sky?", response="Green.", time="2026-12-01T00:00:00Z"),
]


def write(path, rows, extra_lines=()) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines), encoding="utf-8")
    return str(path)


def read(path, **opts):
    items = list(read_feedback(path, FeedbackOptions(**opts)))
    return [i for i in items if isinstance(i, Conversation)], [i for i in items if isinstance(i, Rejected)]


def turns(conv: Conversation) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conv.messages]


def test_sft_takes_the_corrections(tmp_path):
    good, bad = read(write(tmp_path / "f.jsonl", LOG), kind="sft")
    assert bad == [] and [turns(c) for c in good] == [[("user", "What is 2+2?"), ("assistant", "4")]]
    assert good[0].line == 1 and good[0].meta["feedback"]["id"] == LOG[0]["id"]


def test_binary_labels_by_the_stated_threshold_and_the_window(tmp_path):
    path = write(tmp_path / "f.jsonl", LOG)
    good, _ = read(path, kind="binary", until="2026-12-01T00:00:00Z")
    got = [(c.messages[-1].content, c.meta["feedback"]["label"]) for c in good]
    # down + its correction (good), up, 2 (bad), 5 (good); 3 is neutral; the last line is outside the window
    assert got == [("5", False), ("4", True), ("Paris.", True), ("Lyon.", False), ("Paris.", True)]
    assert turns(good[2])[:2] == [("system", "Be brief."), ("user", "Capital of France?")]
    assert [c.messages[-1].content for c in read(path, kind="binary", good_from=3)[0]][-2:] == [
        "Blue.",
        "Green.",
    ]
    assert read(path, kind="binary", since="2026-11-30T10:06:00Z")[0][0].messages[-1].content == "Green."


def test_pairs_from_corrections_and_differently_rated_answers(tmp_path):
    good, _ = read(write(tmp_path / "f.jsonl", LOG), kind="pairs")
    pairs = [(c.messages[-2].content, c.messages[-1].content, c.meta["feedback"]["rejected"]) for c in good]
    assert pairs == [
        ("What is 2+2?", "4", "5"),
        (
            "Capital of France?",
            "Paris.",
            "Lyon.",
        ),  # rated 5 over rated 2; the system-prompted one is another prompt
        ("Colour of the sky?", "Blue.", "Green."),  # neutral (3) over down
    ]


def test_the_last_rating_of_an_answer_counts(tmp_path):
    again = {**LOG[3], "time": "2026-11-30T11:00:00Z", "rating": "down"}
    good, _ = read(write(tmp_path / "f.jsonl", [LOG[3], again]), kind="binary")
    assert [c.meta["feedback"]["label"] for c in good] == [False]


def test_malformed_lines_are_rejected_with_file_line_and_field(tmp_path):
    rows = [
        rating(1, "meh"),
        rating(2, 6),
        rating(3, True),
        {**rating(4, "up"), "prompt": None},
        {**rating(5, "up"), "prompt": "assistant: hi"},
        {**rating(6, "up"), "time": "yesterday"},
        {**rating(7, "up"), "response": 42},
        rating(8, "up"),
    ]
    path = write(tmp_path / "f.jsonl", rows, ["{not json\n", "[1, 2]\n"])
    good, bad = read(path, kind="binary")
    assert len(good) == 1 and good[0].line == 8
    assert [(r.line, r.field) for r in bad] == [
        (1, "rating"),
        (2, "rating"),
        (3, "rating"),
        (4, "prompt"),
        (5, "prompt"),
        (6, "time"),
        (7, "response"),
        (9, None),
        (10, None),
    ]
    assert all(r.source == path and r.reason for r in bad)
    assert "must end with a user turn" in bad[4].reason and "non-empty text, got a int" in bad[6].reason


@pytest.mark.parametrize(
    "opts, message", [({"since": "noon"}, "ISO 8601"), ({"good_from": 2, "bad_to": 3}, "below")]
)
def test_options_are_checked(opts, message):
    with pytest.raises(ValueError, match=message):
        FeedbackOptions(**opts)


def test_prepare_runs_the_curation_and_the_card_records_the_window(tmp_path, capsys):
    log = [
        *LOG,
        rating(
            7,
            "down",
            prompt="user: Mail jane.doe@example.com the total",
            response="Sent to jane.doe@example.com",
        ),
    ]
    log += [
        rating(8 + i, "up", prompt="user: What is 2+2?", response="Four.") for i in range(3)
    ]  # one example after dedup
    path = write(tmp_path / "feedback.jsonl", log, ["{broken\n"])
    job = tmp_path / "job.yaml"
    job.write_text(
        "data:\n  sources:\n"
        f"    - {{path: {path}, format: feedback, feedback: {{kind: binary, until: '2026-12-01T00:00:00Z'}}}}\n"
        f"prepare:\n  output_dir: {tmp_path / 'out'}\n  arrow: false\n  split: {{enabled: false}}\n"
        "  contradictions: {enabled: false}\n",  # answers to one prompt differ by design here
        encoding="utf-8",
    )
    assert main(["prepare", str(job)]) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    card = json.loads((out / "card.json").read_text())
    source = card["sources"][path]
    assert source["format"] == "feedback" and source["feedback"]["until"] == "2026-12-01T00:00:00Z"
    assert source["feedback"]["since"] is None and source["feedback"]["kind"] == "binary" and source["sha256"]
    text = (out / "train.jsonl").read_text()
    assert "jane.doe@example.com" not in text  # the PII step ran on the answers
    examples = list(read_preferences(out / "train.jsonl", "binary", strict=True))
    labels = [(e.completion, e.label) for e in examples]
    assert labels.count(("Four.", True)) == 1 and ("5", False) in labels and ("4", True) in labels  # dedup
    assert len(examples) == 7 and ("Sent to <EMAIL>", False) in labels
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert any(r.get("line") == len(log) + 1 and r.get("source") == path for r in rejects), rejects
    # the prepared rows refuse to be read as SFT answers when they were rated bad
    from llamaforge.data.formats import read_source

    sft = list(read_source(out / "train.jsonl", "messages"))
    assert any(isinstance(r, Rejected) and r.field == "meta.feedback.label" for r in sft)
