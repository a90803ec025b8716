"""Gate and canary (issue 19): `llamaforge promote` against a real HTTP server on the tiny model. A failed
gate leaves the served adapter untouched, a canary split is stable per caller and near its share, and
promoting and rolling back never fail a request sent meanwhile."""
# ruff: noqa: F811 - the shared fixtures are imported from test_serve

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from llamaforge.cli import main  # noqa: E402
from llamaforge.serve.app import create_app  # noqa: E402
from llamaforge.serve.canary import Routes, bucket  # noqa: E402
from test_serve import ServerThread, adapters, chat_body, engine, with_  # noqa: E402, F401

QUESTIONS = ["Hello there", "What is two plus two?", "Name a colour.", "Say something kind."]


def served_answers(url: str, model: str) -> list[str]:
    out = []
    for q in QUESTIONS:
        r = httpx.post(url + "/v1/chat/completions", json=chat_body(model, q), timeout=60)
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["message"]["content"])
    return out


def make_run(folder, adapter, references: list[str]):
    """A finished run whose adapter is `adapter` and whose validation answers are `references`.
    `folder` lies under the adapters root, the server's only allowed adapter folder."""
    run = folder / f"run-{adapter.name}"
    shutil.copytree(adapter, run / "adapter")
    info = {
        "status": "completed",
        "base_model": "tiny",
        "method": "lora",
        "weights": "adapter",
        "template": "llama3",
    }
    (run / "run.json").write_text(json.dumps(info))
    (run / "config.yaml").write_text(
        "evaluation:\n  generation: {max_new_tokens: 6}\n"
        "  scoring: {metrics: [exact_match, rouge], bootstrap_samples: 20}\n"
    )
    with open(run / "val.jsonl", "w") as f:
        for q, a in zip(QUESTIONS, references):
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return run


@pytest.fixture()
def runs(adapters, tmp_path):
    folder = adapters / f"runs-{tmp_path.name}"
    folder.mkdir()
    yield folder
    shutil.rmtree(folder)


@pytest.fixture()
def server(engine):
    with ServerThread(create_app(engine.cfg, engine)) as url:
        yield url
    for name in list(engine.adapters):  # leave the shared engine as the fixture made it
        if name != "a1":
            engine.unload_adapter(name)


def steps(run) -> list[str]:
    return [json.loads(x)["step"] for x in (run / "promote.jsonl").read_text().splitlines()]


def test_a_failed_gate_leaves_the_served_adapter_untouched(server, adapters, runs, engine, capsys):
    references = served_answers(server, "a1")  # what users get today is the reference: a1 scores 100
    run = make_run(runs, adapters / "a2", references)
    before = [m["id"] for m in httpx.get(server + "/v1/models").json()["data"]]
    code = main(
        [
            "promote",
            str(run),
            "--server",
            server,
            "--as",
            "a1",
            "--gate",
            "candidate.exact_match < served.exact_match",
        ]
    )
    out = capsys.readouterr()
    assert code == 1 and "gate failed" in out.err and "FAILED" in out.out, out
    assert [m["id"] for m in httpx.get(server + "/v1/models").json()["data"]] == before and set(
        engine.adapters
    ) == {"a1"}
    assert httpx.get(server + "/v1/routes").json()["data"] == []
    assert served_answers(server, "a1") == references
    assert steps(run) == ["start", "load", "evaluate", "gate_failed"]
    evaluated = json.loads((run / "promote.jsonl").read_text().splitlines()[2])
    assert (
        evaluated["metrics"]["exact_match"]["served"]
        == 100.0
        > evaluated["metrics"]["exact_match"]["candidate"]
    )


def test_a_passing_gate_canaries_then_promotes_and_rolls_back(server, adapters, runs, capsys):
    references = served_answers(server, "a1")
    run = make_run(runs, adapters / "a1", references)  # the same weights: the gate holds
    gate = ["--gate", "candidate.exact_match < served.exact_match"]
    assert main(["promote", str(run), "--server", server, "--as", "a1", *gate, "--canary", "0.5"]) == 0
    [route] = httpx.get(server + "/v1/routes").json()["data"]
    assert route["stable"] == "a1" and route["candidate"].startswith("a1-run-a1-") and route["share"] == 0.5
    assert "canary: 50%" in capsys.readouterr().out
    assert main(["promote", str(run), "--server", server, "--as", "a1", *gate]) == 2  # one canary at a time
    assert "already has a candidate" in capsys.readouterr().err
    assert main(["promote", "--full", str(run), "--server", server, "--as", "a1"]) == 0
    [route] = httpx.get(server + "/v1/routes").json()["data"]
    assert (
        route["stable"].startswith("a1-run-a1-")
        and route["candidate"] is None
        and route["previous"] == ["a1"]
    )
    assert main(["promote", "--rollback", "--server", server, "--as", "a1"]) == 0
    [route] = httpx.get(server + "/v1/routes").json()["data"]
    assert route["stable"] == "a1" and route["previous"] == []
    assert steps(run) == ["start", "load", "evaluate", "canary", "promote"]


def test_canary_split_is_stable_per_caller_and_near_the_share():
    routes = Routes()
    routes.canary("support", "support-v2", 0.1)
    callers = [f"key\x00user-{i}" for i in range(4000)]
    chosen = [routes.choose("support", c) for c in callers]
    assert chosen == [routes.choose("support", c) for c in callers]  # the same caller, the same adapter
    share = chosen.count("support-v2") / len(callers)
    assert 0.085 < share < 0.115, share
    routes.canary("support", "support-v2", 0.3)  # widening keeps the first 10% on the candidate
    assert all(
        routes.choose("support", c) == "support-v2" for c, k in zip(callers, chosen) if k == "support-v2"
    )
    assert routes.choose("other", callers[0]) == "other" and 0 <= bucket("support", callers[0]) < 1


def test_routes_need_an_admin_key_and_loaded_models(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_TEST_ROUTE_KEYS", "ops:sk-ops-1234567:admin,user:sk-user-123456")
    cfg = with_(engine.cfg, {"api_keys_env": "LLAMAFORGE_TEST_ROUTE_KEYS"})
    with ServerThread(create_app(cfg, engine)) as url:
        body = {"name": "tiny", "candidate": "a1", "share": 0.5}
        user = httpx.post(url + "/v1/routes", json=body, headers={"Authorization": "Bearer sk-user-123456"})
        assert user.status_code == 403
        ops = {"Authorization": "Bearer sk-ops-1234567"}
        r = httpx.post(url + "/v1/routes", json={**body, "candidate": "nope"}, headers=ops)
        assert r.status_code == 404 and r.json()["error"]["param"] == "candidate"
        assert httpx.post(url + "/v1/routes", json={**body, "share": 1.5}, headers=ops).status_code == 400
        assert httpx.post(url + "/v1/routes/rollback", json={"name": "tiny"}, headers=ops).status_code == 409
        assert httpx.post(url + "/v1/routes", json=body, headers=ops).status_code == 200
        models = set()
        for i in range(24):  # callers split by user; each keeps its adapter
            ask = chat_body("tiny", user=f"u{i}", max_tokens=1)
            first = httpx.post(url + "/v1/chat/completions", json=ask, headers=ops).json()["model"]
            again = httpx.post(url + "/v1/chat/completions", json=ask, headers=ops).json()["model"]
            assert first == again
            models.add(first)
        assert models == {"tiny", "a1"}


def test_promoting_and_rolling_back_fail_no_request(server, adapters):
    assert (
        httpx.post(
            server + "/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": str(adapters / "a2")}
        ).status_code
        == 200
    )
    failures, served, stop = [], [], threading.Event()

    def user(i: int) -> None:
        with httpx.Client(base_url=server, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/chat/completions", json=chat_body("a1", user=f"u{i}", max_tokens=2))
                (served if r.status_code == 200 else failures).append(r.json().get("model", r.text))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for path, body in [
            ("/v1/routes", {"name": "a1", "candidate": "a2", "share": 0.5}),
            ("/v1/routes/promote", {"name": "a1"}),
            ("/v1/routes/rollback", {"name": "a1"}),
        ]:
            before = len(served)
            while len(served) < before + 6:  # requests in flight across every change
                threading.Event().wait(0.05)
            assert httpx.post(server + path, json=body).status_code == 200
        before = len(served)
        while len(served) < before + 6:
            threading.Event().wait(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert failures == [] and {"a1", "a2"} <= set(served)
    assert httpx.get(server + "/v1/routes").json()["data"][0]["stable"] == "a1"


def test_rollback_refuses_an_adapter_that_is_no_longer_loaded():
    from llamaforge.serve.protocol import APIError

    routes = Routes()
    routes.canary("support", "support-v2", 0.2)
    routes.promote("support")
    with pytest.raises(APIError, match="no longer loaded"):
        routes.rollback("support", loaded=lambda model: model != "support")
    assert routes.choose("support", "anyone") == "support-v2"  # unchanged
    assert routes.rollback("support").stable == "support"
    with pytest.raises(APIError, match="nothing to roll back"):
        routes.rollback("support")


def wait_healthy(url: str) -> None:
    deadline = time.time() + 120
    while httpx.get(url + "/health").status_code != 200:
        assert time.time() < deadline, httpx.get(url + "/health").text
        time.sleep(0.1)


def test_the_routing_table_survives_a_restart(engine, adapters, runs, tmp_path, caplog):
    """Each start is a fresh engine that loads in the background, as `llamaforge serve` does."""
    cfg = with_(engine.cfg, {"state_dir": str(tmp_path / "state")})
    shutil.copytree(adapters / "a2", runs / "v2")

    def start():
        app = create_app(cfg)
        return app, ServerThread(app)

    app, thread = start()
    with thread as url:
        wait_healthy(url)
        load = {"lora_name": "a1-v2", "lora_path": str(runs / "v2")}
        assert httpx.post(url + "/v1/load_lora_adapter", json=load).status_code == 200
        assert httpx.post(
            url + "/v1/routes", json={"name": "a1", "candidate": "a1-v2", "share": 0.5}
        ).is_success
        table = httpx.get(url + "/v1/routes").json()["data"]
    app.state.server.engine.shutdown()
    saved = json.loads((tmp_path / "state" / "routes.json").read_text())
    assert saved["adapters"] == {
        "a1": str((adapters / "a1").resolve()),
        "a1-v2": str((runs / "v2").resolve()),
    }

    app, thread = start()  # the canary is back, its candidate hot-loaded again, callers split as before
    with thread as url:
        wait_healthy(url)
        assert httpx.get(url + "/v1/routes").json()["data"] == table
        answered = {
            httpx.post(url + "/v1/chat/completions", json=chat_body("a1", user=f"u{i}", max_tokens=1)).json()[
                "model"
            ]
            for i in range(16)
        }
        assert answered == {"a1", "a1-v2"}
        assert httpx.post(url + "/v1/routes/promote", json={"name": "a1"}).is_success
    app.state.server.engine.shutdown()

    shutil.rmtree(runs / "v2")  # the promoted adapter is gone: a warning, and a1 serves as itself
    app, thread = start()
    with caplog.at_level("WARNING", logger="llamaforge.serve"), thread as url:
        wait_healthy(url)
        assert httpx.get(url + "/v1/routes").json()["data"] == []
        r = httpx.post(url + "/v1/chat/completions", json=chat_body("a1", max_tokens=1))
        assert r.status_code == 200 and r.json()["model"] == "a1"
    app.state.server.engine.shutdown()
    assert "a1-v2" in caplog.text and "falls back to a1 itself" in caplog.text
    assert json.loads((tmp_path / "state" / "routes.json").read_text()) == {
        **saved,
        "routes": {
            "a1": {
                **saved["routes"]["a1"],
                "stable": "a1-v2",
                "candidate": None,
                "share": 0.0,
                "previous": ["a1"],
            }
        },
    }  # what the user's server wrote stays as it was until the table changes again
