"""`llamaforge serve`: the OpenAI-compatible API on a tiny random Llama with two real peft adapters."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from llamaforge.errors import ConfigError  # noqa: E402
from llamaforge.serve.app import create_app  # noqa: E402
from llamaforge.serve.config import ServeConfig  # noqa: E402
from llamaforge.serve.engine import Engine  # noqa: E402


def make_adapter(base_dir: Path, out: Path, seed: int, rank: int = 4, **lora) -> Path:
    """A real peft LoRA adapter with random non-zero B, so its outputs differ from the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(
        base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj"], **lora)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)
    model.save_pretrained(out)  # safetensors by default
    return out


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny_llama_dir, root / "a1", seed=1)
    make_adapter(tiny_llama_dir, root / "a2", seed=2, rank=12)
    return root


def serve_config(tiny_llama_dir, adapters, **kw) -> ServeConfig:
    base = dict(
        model=str(tiny_llama_dir),
        served_model_name="tiny",
        adapters={"a1": str(adapters / "a1")},
        adapter_dirs=[str(adapters)],
        template="llama3",
        precision="fp32",
        batch_wait_ms=30,
        max_model_len=256,
        default_max_tokens=8,
        api_keys_env="LLAMAFORGE_TEST_NO_KEYS",
    )
    base.update(kw)
    return ServeConfig(**base)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, adapters):
    eng = Engine(serve_config(tiny_llama_dir, adapters))
    eng.load()
    yield eng
    eng.shutdown()


@pytest.fixture()
def client(engine, tiny_llama_dir, adapters):
    return local(create_app(engine.cfg, engine))


def local(app) -> TestClient:
    """A test client that talks to the app as a loopback client does (a keyless server refuses other hosts)."""
    return TestClient(app, base_url="http://127.0.0.1")


def with_(cfg: ServeConfig, changes: dict) -> ServeConfig:
    return ServeConfig.model_validate({**cfg.model_dump(), **changes})


def chat_body(model="tiny", content="Hello there", **kw):
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 6,
        **kw,
    }


def metric(text: str, series: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series + " "))


def assert_error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    return err


# ------------------------------------------------------------------ API basics


def test_chat_and_text_completions(client):
    r = client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["model"] == "tiny"
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 5
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 5
    # a long prompt twice: the second takes its prefix from the prefix cache, and usage says how much
    long = chat_body(max_tokens=5, content="Tell me about the sea. " * 12)
    first, again = (client.post("/v1/chat/completions", json=long).json() for _ in range(2))
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < again["usage"]["prompt_tokens"]
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    r = client.post(
        "/v1/completions", json={"model": "a1", "prompt": "Once upon", "max_tokens": 4, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion" and r.json()["usage"]["completion_tokens"] == 4


def test_streaming_matches_non_streaming(client):
    full = client.post("/v1/chat/completions", json=chat_body("a1")).json()["choices"][0]["message"][
        "content"
    ]
    deltas, finish, usage = [], None, None
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json=chat_body("a1", stream=True, stream_options={"include_usage": True}),
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        if chunk["choices"]:
            deltas.append(chunk["choices"][0]["delta"].get("content") or "")
            finish = chunk["choices"][0]["finish_reason"] or finish
        else:
            usage = chunk["usage"]
    assert "".join(deltas) == full and finish == "length" and usage["completion_tokens"] == 6


def test_models_and_health(client):
    assert client.get("/health").json()["status"] == "ok"
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[:2] == ["tiny", "a1"]


def test_health_is_503_while_loading(tiny_llama_dir, adapters):
    app = create_app(
        serve_config(tiny_llama_dir, adapters), Engine(serve_config(tiny_llama_dir, adapters)), load=False
    )
    c = local(app)
    assert c.get("/health").status_code == 503
    assert_error(c.post("/v1/chat/completions", json=chat_body()), 503)


# ------------------------------------------------------------------ errors


def test_bad_requests_get_openai_errors(client):
    r = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(r, 400)
    assert (
        assert_error(client.post("/v1/chat/completions", json=chat_body("nope")), 404)["code"]
        == "model_not_found"
    )
    err = assert_error(client.post("/v1/chat/completions", json=chat_body(max_tokens=10_000)), 400)
    assert err["code"] == "context_length_exceeded"
    assert_error(client.post("/v1/chat/completions", json=chat_body(content="word " * 400)), 400)
    assert (
        assert_error(client.post("/v1/chat/completions", json=chat_body(temperature=5)), 400)["param"]
        == "temperature"
    )
    assert_error(client.post("/v1/chat/completions", json=chat_body(n=2)), 400)
    assert_error(client.post("/v1/chat/completions", json=chat_body(stop=["a", "b", "c", "d", "e"])), 400)
    assert_error(client.post("/v1/chat/completions", json={"model": "tiny", "messages": []}), 400)
    assert_error(
        client.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "bot", "content": "x"}]}
        ),
        400,
    )
    assert_error(client.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b"]}), 400)
    assert_error(client.get("/v1/nothing-here"), 404)
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200  # still alive


def test_stop_strings_cut_the_answer(client):
    full = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 8, "temperature": 0}
    ).json()["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    r = client.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": "abc", "max_tokens": 8, "temperature": 0, "stop": stop},
    ).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["text"] == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(client):
    body = chat_body("a1", temperature=1.0, top_p=0.9, seed=7, max_tokens=8)
    a = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    b = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert a == b


# ------------------------------------------------------------------ auth


def test_api_keys_and_rate_limit(engine, monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_TEST_KEYS", "team-a:secret-key-a,secret-key-b")
    cfg = with_(engine.cfg, {"api_keys_env": "LLAMAFORGE_TEST_KEYS", "rate_limit_per_minute": 2})
    c = local(create_app(cfg, engine))
    assert assert_error(c.get("/v1/models"), 401)["type"] == "authentication_error"
    assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong-key-123"}), 401)
    assert_error(c.post("/v1/chat/completions", json=chat_body()), 401)
    ok = {"Authorization": "Bearer secret-key-a"}
    assert c.get("/v1/models", headers=ok).status_code == 200
    assert c.get("/v1/models", headers=ok).status_code == 200
    r = c.get("/v1/models", headers=ok)
    assert_error(r, 429)
    assert int(r.headers["Retry-After"]) >= 1
    assert c.get("/v1/models", headers={"Authorization": "Bearer secret-key-b"}).status_code == 200  # per key
    assert c.get("/health").status_code == 200  # probes need no key


def test_no_keys_only_on_loopback(engine):
    with pytest.raises(ConfigError, match="without API keys"):
        create_app(with_(engine.cfg, {"host": "0.0.0.0"}), engine)
    create_app(with_(engine.cfg, {"host": "::1"}), engine)


# ------------------------------------------------------------------ adapters


def test_hot_swap_load_use_unload(client, adapters):
    base = client.post("/v1/chat/completions", json=chat_body()).json()["choices"][0]["message"]["content"]
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": str(adapters / "a2")})
    assert r.status_code == 200, r.text
    try:
        assert "a2" in [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert_error(
            client.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": str(adapters / "a2")}),
            400,
        )
        a2 = client.post("/v1/chat/completions", json=chat_body("a2")).json()["choices"][0]["message"][
            "content"
        ]
        a1 = client.post("/v1/chat/completions", json=chat_body("a1")).json()["choices"][0]["message"][
            "content"
        ]
        assert len({base, a1, a2}) == 3
        again = client.post("/v1/chat/completions", json=chat_body()).json()["choices"][0]["message"][
            "content"
        ]
        assert again == base  # the base stays the base with adapters loaded
    finally:
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 200
    assert_error(client.post("/v1/chat/completions", json=chat_body("a2")), 404)
    assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}), 404)


def test_adapter_paths_are_confined_and_safetensors_only(client, adapters, tmp_path):
    outside = make_adapter(Path(client.app.state.server.engine.cfg.model), tmp_path / "evil", seed=3)
    for path in (
        str(outside),
        str(adapters / ".." / outside.parent.name / "evil"),
        str(adapters / "a1" / ".." / ".."),
    ):
        err = assert_error(
            client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}), 400
        )
        assert "outside" in err["message"]
    link = adapters / "link"
    link.symlink_to(outside, target_is_directory=True)
    try:
        assert_error(
            client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(link)}), 400
        )
    finally:
        link.unlink()
    pickled = adapters / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapters / "a1" / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    err = assert_error(
        client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(pickled)}), 400
    )
    assert "safetensors" in err["message"]
    assert_error(
        client.post("/v1/load_lora_adapter", json={"lora_name": "../x", "lora_path": str(adapters / "a1")}),
        400,
    )
    assert "x" not in [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_concurrent_mixed_adapters_match_sequential(engine, adapters):
    import httpx

    app = create_app(engine.cfg, engine)
    client = local(app)
    assert (
        client.post(
            "/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": str(adapters / "a2")}
        ).status_code
        == 200
    )
    jobs = [(m, f"Question {i}: " + "why " * i) for i, m in enumerate(["tiny", "a1", "a2"] * 3)]
    try:
        sequential = [
            client.post("/v1/chat/completions", json=chat_body(m, p, max_tokens=7)).json()["choices"][0][
                "message"
            ]["content"]
            for m, p in jobs
        ]

        async def together():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as ac:
                rs = await asyncio.gather(
                    *[ac.post("/v1/chat/completions", json=chat_body(m, p, max_tokens=7)) for m, p in jobs]
                )
            return [r.json()["choices"][0]["message"]["content"] for r in rs]

        engine.batch_sizes.clear()
        concurrent = asyncio.run(together())
        assert concurrent == sequential
        assert max(engine.batch_sizes) >= 2, list(engine.batch_sizes)  # waiting requests shared a forward
    finally:
        client.post("/v1/unload_lora_adapter", json={"lora_name": "a2"})


def test_full_queue_answers_429(tiny_llama_dir, adapters, engine):
    import httpx

    idle = Engine(serve_config(tiny_llama_dir, adapters, max_queue=1))
    idle.model, idle.tokenizer, idle.template, idle.ready = (
        engine.model,
        engine.tokenizer,
        engine.template,
        True,
    )
    app = create_app(idle.cfg, idle)  # no worker started: the first request waits

    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as ac:
            first = asyncio.create_task(ac.post("/v1/chat/completions", json=chat_body()))
            while idle.num_waiting == 0:
                await asyncio.sleep(0.01)
            second = await ac.post("/v1/chat/completions", json=chat_body())
            first.cancel()
            return second

    r = asyncio.run(go())
    assert_error(r, 429)
    assert int(r.headers["Retry-After"]) >= 1


# ------------------------------------------------------------------ monitoring and safety


def test_metrics_exposition(client):
    client.post("/v1/chat/completions", json=chat_body("a1"))
    text = client.get("/metrics").text
    for name in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert f'vllm:{name}_count{{model_name="a1"}}' in text, name
    assert 'vllm:generation_tokens_total{model_name="a1"}' in text
    assert 'vllm:prompt_tokens_total{model_name="a1"}' in text
    assert "vllm:num_requests_running " in text and "vllm:num_requests_waiting " in text
    assert "process_resident_memory_bytes" in text
    assert metric(text, 'vllm:request_success_total{finished_reason="length",model_name="a1"}') >= 1


def test_audit_log_redacts_and_rotates(engine, tmp_path):
    path = tmp_path / "audit.jsonl"
    cfg = with_(engine.cfg, {"audit": {"path": str(path), "max_bytes": 2048, "backups": 2}})
    c = local(create_app(cfg, engine))
    r = c.post("/v1/chat/completions", json=chat_body("a1", "Mail me at jane.doe@example.com please"))
    assert r.status_code == 200
    line = json.loads(path.read_text().splitlines()[-1])
    assert line["model"] == "a1" and line["key_id"] == "anonymous" and line["finish_reason"] == "length"
    assert line["completion_tokens"] == 6 and line["latency_s"] > 0 and line["redacted"] is True
    assert "jane.doe@example.com" not in path.read_text() and "<EMAIL>" in line["prompt"]
    for _ in range(8):
        c.post("/v1/chat/completions", json=chat_body("tiny", "x " * 60, max_tokens=1))
    assert (tmp_path / "audit.jsonl.1").is_file() and path.stat().st_size <= 2048
    assert not (tmp_path / "audit.jsonl.3").exists()


def test_moderation_blocklist(engine):
    cfg = with_(engine.cfg, {"moderation": {"blocklist": ["forbidden topic", "nuke"]}})
    c = local(create_app(cfg, engine))
    err = assert_error(
        c.post("/v1/chat/completions", json=chat_body(content="Tell me the FORBIDDEN  topic")), 400
    )
    assert_error(
        c.post("/v1/chat/completions", json=chat_body(content="Let's talk about the Forbidden Topic.")), 400
    )
    assert err["code"] == "content_policy_violation"
    assert (
        c.post("/v1/chat/completions", json=chat_body(content="nukes and nuclear")).status_code == 200
    )  # whole words
    assert (
        metric(c.get("/metrics").text, 'vllm:moderation_blocked_total{model_name="tiny",stage="input"}') >= 2
    )


def test_moderation_blocks_output(client, engine):
    answer = client.post("/v1/chat/completions", json=chat_body()).json()["choices"][0]["message"]["content"]
    word = next(w for w in answer.split() if w.isalpha() and len(w) > 2)
    cfg = with_(engine.cfg, {"moderation": {"blocklist": [word]}})
    c = local(create_app(cfg, engine))
    r = c.post("/v1/chat/completions", json=chat_body()).json()["choices"][0]
    assert r["finish_reason"] == "content_filter" and word not in r["message"]["content"]


# ------------------------------------------------------------------ real HTTP server, real OpenAI client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_openai_client_streams_from_adapter_and_disconnect_cancels(engine, tmp_path, monkeypatch):
    openai = pytest.importorskip("openai")
    import httpx

    monkeypatch.setenv("LLAMAFORGE_TEST_KEYS", "ci:sk-test-123456")
    audit = tmp_path / "audit.jsonl"
    cfg = with_(engine.cfg, {"api_keys_env": "LLAMAFORGE_TEST_KEYS", "audit": {"path": str(audit)}})
    with ServerThread(create_app(cfg, engine)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test-123456", max_retries=0)
        stream = client.chat.completions.create(
            model="a1", messages=[{"role": "user", "content": "Hi"}], stream=True, max_tokens=6, temperature=0
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        full = client.chat.completions.create(
            model="a1", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
        )
        assert "".join(pieces) == full.choices[0].message.content and len(pieces) >= 2
        assert [m.id for m in client.models.list().data][:2] == ["tiny", "a1"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong-key-1", max_retries=0).models.list()
        # a client that hangs up mid-stream stops its generation
        with httpx.stream(
            "POST",
            url + "/v1/chat/completions",
            headers={"Authorization": "Bearer sk-test-123456"},
            json=chat_body("a1", stream=True, max_tokens=200),
            timeout=30,
        ) as r:
            next(r.iter_lines())
        deadline = time.time() + 20
        while time.time() < deadline:
            lines = [json.loads(x) for x in audit.read_text().splitlines()] if audit.exists() else []
            if any(x["finish_reason"] == "cancelled" for x in lines):
                break
            time.sleep(0.1)
        cancelled = [x for x in lines if x["finish_reason"] == "cancelled"]
        assert cancelled and cancelled[0]["completion_tokens"] < 200 and cancelled[0]["key_id"] == "ci"


# ------------------------------------------------------------------ vLLM hand-over


def test_moderation_endpoint_is_consulted(engine):
    """A real OpenAI-style moderation service (flags any text containing 'flagme') on loopback."""
    from fastapi import FastAPI

    guard = FastAPI()

    @guard.post("/v1/moderations")
    async def moderate(body: dict):
        flagged = "flagme" in body["input"]
        return {
            "id": "modr-1",
            "model": body.get("model", "guard"),
            "results": [{"flagged": flagged, "categories": {"violence": flagged, "hate": False}}],
        }

    with ServerThread(guard) as url:
        cfg = with_(
            engine.cfg, {"moderation": {"endpoint": url + "/v1/moderations", "endpoint_model": "llama-guard"}}
        )
        c = local(create_app(cfg, engine))
        err = assert_error(c.post("/v1/chat/completions", json=chat_body(content="please flagme now")), 400)
        assert "violence" in err["message"] and err["code"] == "content_policy_violation"
        assert (
            c.post("/v1/chat/completions", json=chat_body(content="a harmless question")).status_code == 200
        )
    down = with_(
        engine.cfg, {"moderation": {"endpoint": url + "/v1/moderations", "fail_closed": True, "timeout_s": 2}}
    )
    assert_error(local(create_app(down, engine)).post("/v1/chat/completions", json=chat_body()), 400)


def test_grafana_dashboard_uses_exposed_metrics(client):
    import re

    root = Path(__file__).resolve().parents[1]
    dashboard = json.loads((root / "examples" / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|count|sum)$", "", m) for e in exprs for m in re.findall(r"(?:vllm:|process_)\w+", e)
    }
    client.post("/v1/chat/completions", json=chat_body())
    exposed = client.get("/metrics").text
    missing = [
        name
        for name in used
        if f"\n# TYPE {name.removesuffix('_total')} " not in exposed and f"\n# TYPE {name} " not in exposed
    ]
    assert not missing and len(used) >= 10


def test_text_completion_stream(client):
    body = {"model": "a1", "prompt": "Once upon", "max_tokens": 5, "temperature": 0}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
