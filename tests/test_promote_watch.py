"""The watched canary (`llamaforge promote --canary S --watch T`) against the real gateway on the tiny
model: users ask and rate while the canary runs; a candidate they rate down, or one whose generations
fail, is rolled back, one that holds is promoted, and no request to the served adapter fails meanwhile."""
# ruff: noqa: F811 - the shared fixtures are imported from test_serve

from __future__ import annotations

import json
import shutil
import threading

import httpx
import pytest

pytest.importorskip("fastapi")

from llamaforge.cli import main  # noqa: E402
from llamaforge.serve.app import create_app  # noqa: E402
from llamaforge.serve.watch import Counts, WatchRule, verdict  # noqa: E402
from test_promote import make_run, runs, served_answers  # noqa: E402, F401
from test_serve import ServerThread, adapters, chat_body, engine, with_  # noqa: E402, F401

LOOSE = ["--gate", "candidate.exact_match < served.exact_match - 100"]  # lets anything through


@pytest.fixture()
def server(engine, tmp_path):
    cfg = with_(engine.cfg, {"audit": {"path": str(tmp_path / "logs" / "audit.jsonl")}})  # feedback on
    with ServerThread(create_app(cfg, engine)) as url:
        yield url
    for name in list(engine.adapters):
        if name != "a1":
            engine.unload_adapter(name)


def users(url: str, stop: threading.Event, rate, out: dict) -> list[threading.Thread]:
    """Eight callers asking a1 in a loop; each rates its answer with rate(model) (None: no rating)."""

    def user(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                body = chat_body("a1", user=f"u{i}", max_tokens=2, temperature=1.0)
                r = c.post("/v1/chat/completions", json=body)
                model = r.json().get("model") if r.status_code == 200 else None
                out.setdefault(model or f"failed {r.status_code}", []).append(r.status_code)
                if model and (rating := rate(model)):
                    f = c.post("/v1/feedback", json={"id": r.json()["id"], "rating": rating})
                    out.setdefault("rated" if f.is_success else f"failed feedback {f.text}", []).append(model)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    return threads


def watched(url: str, run, rate, *flags: str) -> tuple[int, dict, list[dict]]:
    out, stop = {}, threading.Event()
    threads = users(url, stop, rate, out)
    try:
        code = main(["promote", str(run), "--server", url, "--as", "a1", *LOOSE, "--canary", "0.5", *flags])
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    steps = [json.loads(x) for x in (run / "promote.jsonl").read_text().splitlines()]
    return code, out, steps


def test_a_canary_rated_down_is_rolled_back(server, adapters, runs):
    run = make_run(runs, adapters / "a2", served_answers(server, "a1"))
    code, out, steps = watched(
        server,
        run,
        lambda m: "up" if m == "a1" else "down",
        "--watch",
        "4",
        "--poll",
        "0.5",
        "--min-ratings",
        "3",
    )
    assert code == 1
    [route] = httpx.get(server + "/v1/routes").json()["data"]
    assert route["stable"] == "a1" and route["candidate"] is None
    assert [k for k in out if k.startswith("failed")] == []  # nobody saw an error, before or after
    decision = steps[-1]
    assert decision["step"] == "rollback" and "up share 0.0%" in decision["reason"]
    assert decision["candidate"]["down"] >= 3 and decision["served"]["up"] >= 1
    assert [s["step"] for s in steps][:5] == ["start", "load", "evaluate", "canary", "watch"]


def test_a_canary_that_holds_is_promoted(server, adapters, runs):
    run = make_run(runs, adapters / "a2", served_answers(server, "a1"))
    code, out, steps = watched(
        server, run, lambda m: "up", "--watch", "4", "--poll", "0.5", "--min-ratings", "3"
    )
    assert code == 0
    [route] = httpx.get(server + "/v1/routes").json()["data"]
    assert route["stable"].startswith("a1-run-a2-") and route["previous"] == ["a1"]
    assert [k for k in out if k.startswith("failed")] == [] and route["stable"] in out
    decision = steps[-1]
    assert decision["step"] == "promote" and decision["candidate"]["up"] >= 3
    assert decision["candidate"]["errors"] == 0 and decision["watched"] >= 4


def test_a_canary_whose_generations_fail_is_rolled_back_before_the_window_ends(server, adapters, runs):
    from safetensors.torch import load_file, save_file

    broken = runs / "broken"
    shutil.copytree(adapters / "a2", broken)
    weights = load_file(broken / "adapter_model.safetensors")
    save_file(
        {k: v.fill_(float("nan")) if "lora_B" in k else v for k, v in weights.items()},
        broken / "adapter_model.safetensors",
    )
    run = make_run(runs, broken, served_answers(server, "a1"))
    code, out, steps = watched(
        server, run, lambda m: "up", "--watch", "60", "--poll", "0.5", "--max-error-rate", "0.2"
    )
    assert code == 1
    [route] = httpx.get(server + "/v1/routes").json()["data"]
    assert route["stable"] == "a1" and route["candidate"] is None
    decision = steps[-1]
    assert decision["step"] == "rollback" and "over --max-error-rate 20.0%" in decision["reason"]
    assert (
        decision["watched"] < 60
        and decision["candidate"]["errors"] >= 1
        and decision["served"]["errors"] == 0
    )
    for i in range(8):  # after the rollback every caller is back on a1, and answered
        r = httpx.post(server + "/v1/chat/completions", json=chat_body("a1", user=f"u{i}", temperature=1.0))
        assert r.status_code == 200 and r.json()["model"] == "a1"


def test_the_verdict_rules():
    rule = WatchRule(60, max_error_rate=0.1, min_up_share=0.6, min_ratings=4)
    assert verdict(rule, Counts(10, 0, 1, 0), Counts(), final=False) is None  # still watching
    assert verdict(rule, Counts(10, 2, 0, 0), Counts(), final=False)[0] == "rollback"  # errors: at once
    assert "fewer than --min-ratings 4" in verdict(rule, Counts(10, 0, 3, 0), Counts(), final=True)[1]
    assert verdict(rule, Counts(10, 0, 3, 1), Counts(10, 0, 1, 3), final=True)[0] == "promote"
    assert "served adapter's 100.0%" in verdict(rule, Counts(10, 0, 3, 1), Counts(10, 0, 4, 0), final=True)[1]
    assert "under --min-up-share" in verdict(rule, Counts(10, 0, 2, 2), Counts(), final=True)[1]


def test_watch_needs_a_canary_and_sane_limits(runs, adapters, capsys):
    run = make_run(runs, adapters / "a2", ["x"] * 4)
    base = ["promote", str(run), "--server", "http://127.0.0.1:9", "--as", "a1", *LOOSE]
    assert main([*base, "--watch", "10"]) == 2
    assert "--watch watches a canary" in capsys.readouterr().err
    assert main([*base, "--canary", "0.5", "--watch", "10", "--min-up-share", "2"]) == 2
    assert "--min-up-share must be in [0, 1]" in capsys.readouterr().err
    assert not (run / "promote.jsonl").exists()  # refused before anything was asked of a server
