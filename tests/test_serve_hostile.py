"""Hostile traffic against `llamaforge serve` (issue 15), part 1: poison pills, limits before work and
tenant isolation. One request never harms another, and nothing a client sends gets a 5xx.

Each class has its examples from the issue and more cases of the same class."""
# ruff: noqa: F811 - the shared fixtures are imported from test_serve

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from llamaforge.serve.app import create_app  # noqa: E402
from llamaforge.serve.engine import Engine, GenRequest  # noqa: E402
from test_serve import adapters, assert_error, chat_body, engine, local, with_  # noqa: E402, F401


def completion(prompt="Once upon a time", model="tiny", **kw) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, **kw}


def gather(app, requests: list[tuple[str, str, dict | bytes]], headers=None) -> list[httpx.Response]:
    """Send requests concurrently through the ASGI app (as one loopback client would)."""

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", headers=headers) as ac:
            calls = [
                ac.request(method, path, json=body)
                if isinstance(body, dict)
                else ac.request(method, path, content=body, headers={"Content-Type": "application/json"})
                for method, path, body in requests
            ]
            return await asyncio.gather(*calls)

    return asyncio.run(go())


# ------------------------------------------------------------------ 1. poison pills

PILLS = [  # (raw JSON body fragment merged into a completion, the field the 400 must name)
    ('"prompt": ""', "prompt"),  # issue example
    (f'"seed": {2**64}', "seed"),  # issue example
    (f'"seed": {-(2**63) - 1}', "seed"),
    ('"top_p": 0', "top_p"),
    ('"top_p": 1.5', "top_p"),
    ('"top_p": NaN', "top_p"),
    ('"temperature": Infinity', "temperature"),
    ('"temperature": -0.5', "temperature"),
    ('"max_tokens": 0', "max_tokens"),
    (f'"max_tokens": {2**70}', "max_tokens"),
    ('"n": 3', "n"),
    ('"stop": ["a", "b", "c", "d", "e"]', "stop"),
    ('"stop": [""]', "stop"),
    ('"stop": "' + "x" * 300 + '"', "stop"),
    ('"prompt": []', "prompt"),
    ('"prompt": [1, 2, 3]', "prompt"),
    ('"seed": 1.5', "seed"),
    ('"stream_options": {"include_usage": true, "bogus": 1}', "stream_options"),
]


@pytest.mark.parametrize("fragment, field", PILLS, ids=[f"{p[1]}-{i}" for i, p in enumerate(PILLS)])
def test_poison_pills_are_400s_and_never_touch_a_healthy_request(client_app, fragment, field):
    app, reference = client_app
    pill = json.dumps(completion(prompt="Poison", model="tiny"))[:-1] + ", " + fragment + "}"
    pill = pill.replace('"prompt": "Poison", ', "") if fragment.startswith('"prompt"') else pill
    healthy = completion()
    bad, good = gather(
        app, [("POST", "/v1/completions", pill.encode()), ("POST", "/v1/completions", healthy)]
    )
    err = assert_error(bad, 400)
    assert err["param"] == field, err
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == reference


def test_a_tiny_temperature_is_greedy(client_app):
    app, reference = client_app
    for t in (1e-40, 5e-324, 9.9e-6):  # issue example, the smallest float, just under the bound
        r = local(app).post("/v1/completions", json=completion(temperature=t, seed=3))
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference


@pytest.fixture(scope="module")
def client_app(engine):
    app = create_app(engine.cfg, engine)
    reference = local(app).post("/v1/completions", json=completion()).json()["choices"][0]["text"]
    return app, reference


def run_rows(engine: Engine, rows: list[GenRequest]) -> list[tuple[str, str]]:
    """Submit `rows` while the worker is held, so they start in one batch; each row's final event."""

    async def go():
        with engine._swapping("(held by the test)"):
            for r in rows:
                engine.submit(r)
        finals = []
        for r in rows:
            while (event := await r.events.get())[0] not in ("done", "error"):
                pass
            finals.append(event)
        return finals

    return asyncio.run(go())


def healthy_row() -> GenRequest:
    return GenRequest([128000, 9906, 1917, 11, 1268], None, 6, model_name="tiny")


@pytest.mark.parametrize(
    "poison",
    [
        dict(prompt_ids=[10**7]),  # a token id past the vocabulary: the batched forward itself raises
        dict(seed=2**64),  # the generator cannot take it
        dict(temperature=float("nan")),  # sampling raises
        dict(prompt_ids=[]),  # nothing to prefill
    ],
    ids=["out-of-vocab", "seed-overflow", "nan-temperature", "empty-prompt"],
)
def test_an_engine_error_stays_with_its_row(engine, poison):
    alone = run_rows(engine, [healthy_row()])
    solo = healthy_row()
    run_rows(engine, [solo])
    healthy = healthy_row()
    bad = GenRequest(**{**dict(prompt_ids=[128000, 40, 1093], adapter=None, max_tokens=6), **poison})
    finals = run_rows(engine, [bad, healthy])
    assert finals[0][0] == "error" and finals[1] == alone[0] == ("done", "length")
    assert healthy.token_ids == solo.token_ids and len(healthy.token_ids) == 6
    after = healthy_row()
    assert run_rows(engine, [after]) == alone and after.token_ids == solo.token_ids  # the worker lives on


def test_a_failed_decode_step_rebuilds_each_row_alone(engine, caplog):
    """A decode forward that raises (here: a KV cache whose first layer lost a head dimension) is
    recovered by rebuilding every row's cache alone; a row that still fails (a NaN temperature) is the
    only one to end in error, and the others finish exactly as without the fault."""
    from llamaforge.serve.batch import Batch

    idle = Engine(engine.cfg)  # the same model, no worker: steps driven by hand
    idle.model, idle.tokenizer, idle.template, idle.adapters = (
        engine.model,
        engine.tokenizer,
        engine.template,
        engine.adapters,
    )
    loop = asyncio.new_event_loop()

    def rows(n: int) -> list[GenRequest]:
        out = [
            GenRequest([128000, 9906 + i, 1917, 374][: 3 + i % 2], "a1" if i % 2 else None, 8)
            for i in range(n)
        ]
        for r in out:
            r.loop, r.events = loop, asyncio.Queue()
        return out

    def decode_all(batch: Batch, fault_at: int | None = None) -> None:
        step = 0
        with idle._model_lock, torch.inference_mode():
            while batch.rows:
                if step == fault_at:
                    layer = batch.cache.layers[0]
                    layer.keys, layer.values = layer.keys[..., 1:], layer.values[..., 1:]
                batch = idle._step(batch)
                step += 1
            idle._base_mode_off()

    try:
        clean = rows(3)
        with idle._model_lock, torch.inference_mode():
            first = idle._prefill(clean)
        decode_all(first)
        faulty = rows(3)
        with idle._model_lock, torch.inference_mode():
            batch = idle._prefill(faulty)
        faulty[1].temperature = float("nan")  # this row fails again when rebuilt alone
        decode_all(batch, fault_at=2)
    finally:
        loop.close()
    assert [r.finish_reason for r in clean] == ["length"] * 3
    assert [r.finish_reason for r in faulty] == ["length", "error", "length"]
    assert faulty[0].token_ids == clean[0].token_ids and faulty[2].token_ids == clean[2].token_ids
    assert "rebuilding each alone" in caplog.text  # the fault did raise, and was recovered


# ------------------------------------------------------------------ 3. limits before work


def test_auth_comes_before_the_body(engine, monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_TEST_KEYS", "team:key-team-123")
    app = create_app(
        with_(engine.cfg, {"api_keys_env": "LLAMAFORGE_TEST_KEYS", "max_request_bytes": 4096}), engine
    )
    c = local(app)
    for body in (b"{not json", b'{"model": 5}', b"x" * 100_000, b'{"model": "tiny", "messages": []}'):
        r = c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert assert_error(r, 401)["code"] == "invalid_api_key"
    assert_error(c.post("/v1/load_lora_adapter", content=b"[]"), 401)
    ok = {"Authorization": "Bearer key-team-123"}
    assert_error(c.post("/v1/chat/completions", content=b"{not json", headers=ok), 400)


def test_big_bodies_get_413_before_parsing(engine):
    c = local(create_app(with_(engine.cfg, {"max_request_bytes": 2048}), engine))
    big = json.dumps(chat_body(content="y" * 4000)).encode()
    assert assert_error(c.post("/v1/chat/completions", content=big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted while read, refused at the bound
        for _ in range(100):
            yield b" " * 1024

    assert_error(c.post("/v1/chat/completions", content=chunks()), 413)
    assert_error(c.post("/v1/load_lora_adapter", content=big), 413)
    default = local(create_app(engine.cfg, engine))
    r = default.post("/v1/completions", content=b"{" + b" " * (32 * 2**20) + b"}")  # issue example: 32 MB
    assert_error(r, 413)
    assert default.post("/v1/chat/completions", json=chat_body()).status_code == 200


def test_prompts_are_bounded_before_tokenizing(engine):
    c = local(create_app(with_(engine.cfg, {"max_prompt_chars": 1000}), engine))
    for path, body in [
        ("/v1/completions", completion(prompt="z" * 1001)),
        ("/v1/chat/completions", chat_body(content="z" * 1001)),
        ("/v1/chat/completions", {**chat_body(), "messages": [{"role": "user", "content": "z" * 400}] * 3}),
    ]:
        err = assert_error(c.post(path, json=body), 400)
        assert err["code"] == "context_length_exceeded" and "serve.max_prompt_chars" in err["message"]
    assert (
        local(create_app(engine.cfg, engine)).app.state.server.max_prompt_chars == 16 * engine.max_model_len
    )


@pytest.mark.parametrize("stage", ["tokenize", "moderation", "audit"])
def test_health_answers_while_a_prompt_is_being_processed(engine, tmp_path, monkeypatch, stage):
    """Each CPU-heavy stage of a request is held at a gate; /health must answer meanwhile. Were the
    stage on the event loop, the loop would sit in the gate until it timed out."""
    import llamaforge.serve.app as app_module

    cfg = with_(
        engine.cfg, {"audit": {"path": str(tmp_path / "audit.jsonl")}, "moderation": {"blocklist": ["zzz"]}}
    )
    app = create_app(cfg, engine)
    server = app.state.server
    entered, release, held = threading.Event(), threading.Event(), []

    def gated(fn):
        def wait_then(*args, **kw):
            entered.set()
            held.append(release.wait(timeout=10))  # False: nobody released it (the loop was stuck here)
            return fn(*args, **kw)

        return wait_then

    if stage == "tokenize":
        monkeypatch.setattr(app_module, "encode_chat", gated(app_module.encode_chat))
    elif stage == "moderation":
        monkeypatch.setattr(server.moderator, "blocklisted", gated(server.moderator.blocklisted))
    else:
        monkeypatch.setattr(server.audit, "record", gated(server.audit.record))

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=30) as ac:
            big = asyncio.create_task(ac.post("/v1/chat/completions", json=chat_body(content="word " * 30)))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            health = await ac.get("/health")
            release.set()
            return health, await big

    health, big = asyncio.run(go())
    assert health.status_code == 200 and big.status_code == 200, big.text
    assert held and held[0] is True


# ------------------------------------------------------------------ 4. isolation


def test_the_prefix_cache_is_per_tenant(engine, monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_TEST_KEYS", "alice:key-alice-1,bob:key-bob-123")
    c = local(create_app(with_(engine.cfg, {"api_keys_env": "LLAMAFORGE_TEST_KEYS"}), engine))
    alice, bob = ({"Authorization": f"Bearer {k}"} for k in ("key-alice-1", "key-bob-123"))

    def cached(path: str, body: dict, who: dict) -> int:
        r = c.post(path, json=body, headers=who)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    for path, body in [
        ("/v1/chat/completions", chat_body(content="My secret plan for the merger is as follows. " * 6)),
        ("/v1/completions", completion(prompt="Quarterly numbers, not public yet: " * 8)),
        ("/v1/chat/completions", chat_body("a1", content="Another private question, asked twice. " * 6)),
    ]:
        assert cached(path, body, alice) == 0
        assert cached(path, body, alice) > 0  # alice's own prefix is reused
        assert cached(path, body, bob) == 0  # bob learns nothing about alice's prompts
        assert cached(path, body, bob) > 0
