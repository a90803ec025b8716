# ruff: noqa: F811 - the studio_workspace fixture is imported, then named as a test argument
"""The served proxy (/served/<id>/...) in front of a `llamaforge serve` the studio started.

The slow test starts the real server (the workspace's tiny trained run, with API keys) and talks to it
only through the studio: the studio's key is added by the proxy, the page never holds it, only the
chat's OpenAI routes pass, and a rating lands in the run's feedback.jsonl. Hostile ids and paths are
sent as raw ASGI requests, so no HTTP client tidies `..` or `%2F` away before the studio sees them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import pytest

pytest.importorskip("fastapi", reason="the studio needs the serve extra: pip install 'llamaforge[studio]'")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from llamaforge.studio.app import create_app  # noqa: E402
from studio_fixtures import studio_workspace  # noqa: E402, F401 - fixture

KEY = "sk-studio-0123456789"
OTHER = "sk-other-9876543210"  # a second key of the studio, which a page may log in with


def raw_request(app, method: str, raw_path: str, headers: dict[str, str]) -> tuple[int, dict]:
    """One request straight into the ASGI app, its path exactly as given (undecoded, dots kept)."""
    from urllib.parse import unquote

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body or b"{}")


def test_an_id_the_studio_did_not_start_and_hostile_ids_are_404(tmp_path):
    app = create_app(tmp_path)
    host = {"host": "127.0.0.1"}
    for raw in (
        "/served/nope/health",
        "/served/../api/runs",
        "/served/..%2F..%2Fapi%2Fruns/health",
        "/served/%2e%2e/v1/models",
        "/served//health",
    ):
        status, body = raw_request(app, "GET", raw, host)
        assert status == 404, raw
        assert body["error"]["message"] == "no such server: start it from the run page", raw


def _wait_ready(client: TestClient, sid: str, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while True:
        state = client.get(f"/api/serve/{sid}").json()
        if state["state"] == "ready":
            return state
        assert state["state"] == "starting", state
        assert time.time() < deadline, "the served run did not load in time"
        time.sleep(1)


@pytest.mark.slow
def test_the_proxy_signs_with_the_studios_key_and_passes_only_the_chat_routes(
    studio_workspace, tmp_path, monkeypatch
):
    monkeypatch.delenv("LLAMAFORGE_API_KEYS", raising=False)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"me:{KEY}\nother:{OTHER}\n")
    app = create_app(studio_workspace, host="0.0.0.0", api_keys_file=str(keys))
    client = TestClient(app, base_url="http://10.1.2.3")
    client.post("/login", data={"key": KEY}, follow_redirects=False)  # the page's cookie, no header
    started = client.post("/api/runs/runs/done/serve", json={})
    assert started.status_code == 200, started.text
    sid = started.json()["id"]
    try:
        state = _wait_ready(client, sid)
        port = int(state["url"].rsplit(":", 1)[1].split("/")[0])
        # the server itself wants the key; through the studio the page never sends one
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        assert client.get(f"/served/{sid}/v1/models").status_code == 200
        page = client.get(f"/chat?served={sid}", headers={"accept": "text/html"}).text
        assert KEY not in page and KEY not in client.get("/api/serve").text
        answer = client.post(
            f"/served/{sid}/v1/chat/completions",
            json={
                "model": "done",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "Who are you?"}],
            },
        )
        assert answer.status_code == 200, answer.text
        answer_id = answer.json()["id"]
        rated = client.post(
            f"/served/{sid}/v1/feedback",
            json={"id": answer_id, "rating": "down", "correction": "I am a tiny test model."},
        )
        assert rated.status_code == 200 and rated.json()["stored"] is True, rated.text
        log = studio_workspace / state["feedback"]
        assert state["feedback"] == ".studio/feedback/runs--done/feedback.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert records[-1]["id"] == answer_id and records[-1]["rating"] == "down"
        assert records[-1]["correction"] == "I am a tiny test model."
        assert records[-1]["response"] == answer.json()["choices"][0]["message"]["content"]
        # a page's own Authorization header is not passed on: the answer belongs to the studio's key
        other = client.post(
            f"/served/{sid}/v1/chat/completions",
            json={"model": "done", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
            headers={"authorization": f"Bearer {OTHER}"},
        )
        assert other.status_code == 200, other.text
        secret = (log.parent / ".feedback-secret").read_bytes().strip()
        owner = hmac.new(secret, b"me", hashlib.sha256).hexdigest()[:32]
        audit = [json.loads(line) for line in (log.parent / "audit.jsonl").read_text().splitlines()]
        assert {r["owner"] for r in audit if r.get("id") in (answer_id, other.json()["id"])} == {owner}

        # only the chat's routes, spelled plainly
        assert client.get(f"/served/{sid}/metrics").status_code == 403
        refused = client.post(
            f"/served/{sid}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/"}
        )
        assert refused.status_code == 403
        assert refused.json()["error"]["message"].startswith("POST /v1/load_lora_adapter is not proxied")
        assert client.post(f"/served/{sid}/v1/routes/promote", json={}).status_code == 403
        assert client.get(f"/served/{sid}/v1/chat/completions").status_code == 403
        auth = {"host": "10.1.2.3", "authorization": f"Bearer {KEY}"}
        for raw in (
            f"/served/{sid}/v1/../metrics",
            f"/served/{sid}/./health",
            f"/served/{sid}/v1%2Fmodels",
            f"/served/{sid}/%2e%2e/metrics",
            f"/served/{sid}/v1/models%00",
        ):
            status, body = raw_request(app, "GET", raw, auth)
            assert status == 403, raw
            assert "not allowed in a proxied path" in body["error"]["message"], raw
        assert raw_request(app, "GET", "/served/nope/v1/models", auth)[0] == 404
    finally:
        client.post(f"/api/serve/{sid}/stop")
    gone = client.get(f"/served/{sid}/v1/models")
    assert gone.status_code == 404 and gone.json()["error"]["message"] == "the server has exited"
