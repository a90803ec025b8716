"""`POST /v1/feedback` (issue 19): ratings are joined to the audit record of the answer, only the key
that got an answer may rate it, bad bodies get clear 4xx errors, the log is append-only and redacted,
and ratings are counted per model."""
# ruff: noqa: F811 - the shared fixtures are imported from test_serve

from __future__ import annotations

import json
import stat

import pytest

pytest.importorskip("fastapi")

from llamaforge.data.feedback import read_feedback  # noqa: E402
from llamaforge.schema import FeedbackOptions  # noqa: E402
from llamaforge.serve.app import create_app  # noqa: E402
from test_serve import adapters, assert_error, chat_body, engine, local, metric, with_  # noqa: E402, F401

ALICE, BOB = "sk-alice-123456", "sk-bob-1234567"


@pytest.fixture()
def keyed(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_TEST_FEEDBACK_KEYS", f"alice:{ALICE},bob:{BOB}")
    cfg = with_(
        engine.cfg,
        {"api_keys_env": "LLAMAFORGE_TEST_FEEDBACK_KEYS", "audit": {"path": str(tmp_path / "audit.jsonl")}},
    )
    return local(create_app(cfg, engine)), tmp_path


def ask(client, key: str, content="Hello there", model="a1", **kw) -> dict:
    r = client.post("/v1/chat/completions", json=chat_body(model, content, **kw), headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def stored(folder) -> list[dict]:
    path = folder / "feedback.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_feedback_is_joined_to_the_answer_and_redacted(keyed):
    client, folder = keyed
    answer = ask(client, ALICE, "My mail is jane.doe@example.com, what is 2+2?")
    body = {
        "id": answer["id"],
        "rating": "down",
        "correction": "4. Write to me at bob@corp.example",
        "comment": "wrong",
    }
    r = client.post("/v1/feedback", json=body, headers=auth(ALICE))
    assert r.status_code == 200, r.text
    assert r.json() == {"object": "feedback", "id": answer["id"], "rating": "down", "stored": True}
    [record] = stored(folder)
    assert record["model"] == "a1" and record["template"] == "llama3" and record["chat"] is True
    assert record["response"] == answer["choices"][0]["message"]["content"]
    assert "<EMAIL>" in record["prompt"] and "<EMAIL>" in record["correction"]
    text = (folder / "feedback.jsonl").read_text()
    assert "jane.doe@example.com" not in text and "bob@corp.example" not in text
    assert "alice" not in text and ALICE not in text  # the owner is a keyed hash, not the key or its name
    audit = [json.loads(x) for x in (folder / "audit.jsonl").read_text().splitlines()]
    assert record["owner"] == audit[-1]["owner"] and len(record["owner"]) == 32
    assert stat.S_IMODE((folder / "feedback.jsonl").stat().st_mode) == 0o600
    # a second rating appends, never rewrites
    assert (
        client.post("/v1/feedback", json={"id": answer["id"], "rating": 5}, headers=auth(ALICE)).status_code
        == 200
    )
    assert [x["rating"] for x in stored(folder)] == ["down", 5]
    # the log is what `format: feedback` reads: the last rating of the answer counts
    [example] = read_feedback(folder / "feedback.jsonl", FeedbackOptions(kind="binary"))
    assert example.meta["feedback"]["label"] is True and example.messages[-1].content == record["response"]
    assert [m.role for m in example.messages] == ["user", "assistant"] and "<EMAIL>" in example.messages[
        0
    ].content
    text = client.get("/metrics").text
    assert metric(text, 'vllm:feedback_ratings_total{model_name="a1",rating="down"}') == 1
    assert metric(text, 'vllm:feedback_ratings_total{model_name="a1",rating="5"}') == 1


def test_another_keys_answer_cannot_be_rated_and_unknown_ids_are_404(keyed):
    client, folder = keyed
    answer = ask(client, ALICE)
    err = assert_error(
        client.post("/v1/feedback", json={"id": answer["id"], "rating": "up"}, headers=auth(BOB)), 404
    )
    assert err["param"] == "id" and "only the key that got an answer" in err["message"]
    unknown = {"id": "chatcmpl-" + "0" * 24, "rating": "up"}
    assert assert_error(client.post("/v1/feedback", json=unknown, headers=auth(ALICE)), 404)[
        "message"
    ] == err["message"].replace(answer["id"], unknown["id"])  # the same answer: ids leak nothing
    assert stored(folder) == []
    assert client.post("/v1/feedback", json={"id": answer["id"], "rating": "up"}).status_code == 401


@pytest.mark.parametrize(
    "body, where",
    [
        ({"rating": "up"}, "id"),
        ({"id": "ID", "rating": "up"}, "id"),
        ({"id": "chatcmpl-abc", "rating": "meh"}, "rating"),
        ({"id": "chatcmpl-abc", "rating": 6}, "rating"),
        ({"id": "chatcmpl-abc", "rating": True}, "rating"),
        ({"id": "chatcmpl-abc", "rating": 4.0}, "rating"),
        ({"id": "chatcmpl-abc", "rating": "up", "correction": "x" * 16_001}, "correction"),
        ({"id": "chatcmpl-abc", "rating": "up", "comment": ["no"]}, "comment"),
        ({"id": "chatcmpl-abc", "rating": "up", "user": "someone"}, "user"),
        (["chatcmpl-abc", "up"], "body"),
    ],
)
def test_malformed_bodies_are_422_naming_the_field(keyed, body, where):
    client, folder = keyed
    err = assert_error(client.post("/v1/feedback", json=body, headers=auth(ALICE)), 422)
    assert err["message"].startswith(where) and err["param"] == where
    assert stored(folder) == []


def test_not_json_is_400_and_feedback_needs_the_audit_log(keyed, engine):
    client, _ = keyed
    r = client.post(
        "/v1/feedback", content=b"{nope", headers={**auth(ALICE), "content-type": "application/json"}
    )
    assert assert_error(r, 400)["message"] == "The request body is not valid JSON"
    plain = local(create_app(engine.cfg, engine))
    err = assert_error(plain.post("/v1/feedback", json={"id": "chatcmpl-abc", "rating": "up"}), 404)
    assert "serve.audit.path" in err["message"]


def test_a_streamed_answer_is_rated_and_old_answers_come_from_the_audit_file(keyed, engine):
    client, folder = keyed
    with client.stream(
        "POST", "/v1/chat/completions", json=chat_body("tiny", stream=True), headers=auth(BOB)
    ) as r:
        lines = list(r.iter_lines())
    first = json.loads(next(x for x in lines if x.startswith("data: {"))[6:])
    r = client.post("/v1/feedback", json={"id": first["id"], "rating": 2}, headers=auth(BOB))
    assert r.status_code == 200, r.text
    # a restarted server (empty memory, same folder) still finds the answer in the audit file
    again = local(create_app(client.app.state.server.cfg, engine))
    r = again.post("/v1/feedback", json={"id": first["id"], "rating": "up"}, headers=auth(BOB))
    assert r.status_code == 200, r.text
    assert [(x["model"], x["rating"]) for x in stored(folder)] == [("tiny", 2), ("tiny", "up")]
    assert assert_error(
        again.post("/v1/feedback", json={"id": first["id"], "rating": 1}, headers=auth(ALICE)), 404
    )
