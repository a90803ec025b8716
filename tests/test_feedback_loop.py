"""The worked example of issue 19 end to end on the CPU (slow suite): serve a tune, users rate it, the
log becomes KTO data, a KTO tune runs, the gate compares, the canary goes to 100%. What it asserts is
what the example shows: on held-out questions nobody rated, the users' rule (says Forge) holds more
often after the loop than before, the gate held and all callers are on the new adapter."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "feedback_loop" / "feedback_loop.py"


@pytest.mark.slow
def test_the_feedback_loop_runs_end_to_end(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("feedback_loop", EXAMPLE)
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    result = loop.run(tmp_path, sft_steps=6, kto_steps=30)
    with capsys.disabled():
        print("\nfeedback loop:", json.dumps(result))
    ratings = [json.loads(x) for x in (tmp_path / "logs" / "feedback.jsonl").read_text().splitlines()]
    assert len(ratings) == len(loop.ASKED) and sum(result["ratings"].values()) == len(loop.ASKED)
    assert {r["model"] for r in ratings} == {"assistant"} and all(r["owner"] for r in ratings)
    card = json.loads((tmp_path / "feedback-data" / "card.json").read_text())
    assert next(iter(card["sources"].values()))["feedback"]["kind"] == "binary"
    steps = result["promote_steps"]
    assert not set(loop.HELD_OUT) & set(loop.ASKED)  # the metric is on questions nobody rated
    assert result["kto_examples"]["desirable"] > 0 and result["kto_examples"]["undesirable"] > 0
    served, candidate = (
        result["evaluation"]["contains"]["served"],
        result["evaluation"]["contains"]["candidate"],
    )
    assert result["gate_passed"] and candidate > served, result["evaluation"]
    assert steps == ["start", "load", "evaluate", "canary", "promote"]
    route = result["route"]
    assert route["stable"].startswith("assistant-kto-") and route["candidate"] is None  # 100% of callers
    assert result["held_out_says_forge_after"] > result["held_out_says_forge_before"]
