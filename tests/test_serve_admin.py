"""Hostile traffic against `llamaforge serve` (issue 15), part 2: adapter administration. Loads are
transactional, every file of an adapter is confined, configs are checked against the base, only
admin keys administer, the number of adapters is capped, and DoRA rows never share a forward."""
# ruff: noqa: F811 - the shared fixtures are imported from test_serve

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from llamaforge.errors import ConfigError  # noqa: E402
from llamaforge.serve.adapters import loaded_names  # noqa: E402
from llamaforge.serve.app import create_app  # noqa: E402
from llamaforge.serve.auth import parse_keys  # noqa: E402
from llamaforge.serve.engine import _ANY, Engine, GenRequest  # noqa: E402
from test_serve import (  # noqa: E402, F401
    adapters,
    assert_error,
    chat_body,
    engine,
    local,
    make_adapter,
    serve_config,
    with_,
)


def answer(client, model: str) -> str:
    r = client.post("/v1/chat/completions", json=chat_body(model))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def load(client, name: str, path: Path, **headers):
    return client.post(
        "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, headers=headers
    )


def broken_copy(adapters: Path, name: str, how: str) -> Path:
    """A copy of a1 that peft fails to load after registering it."""
    out = adapters / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(adapters / "a1", out)
    if how == "rank":  # issue example: the config's rank does not match the weights
        config = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    else:  # weights cut in half
        weights = out / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return out


@pytest.mark.parametrize("how", ["rank", "truncated"])
def test_a_failed_load_leaves_nothing_and_unload_keeps_a_loaded_adapter_active(engine, adapters, how):
    c = local(create_app(engine.cfg, engine))
    base, a1 = answer(c, "tiny"), answer(c, "a1")
    assert load(c, "a2", adapters / "a2").status_code == 200
    try:
        err = assert_error(load(c, "bad", broken_copy(adapters, "bad-" + how, how)), 400)
        assert "could not load adapter" in err["message"]
        assert loaded_names(engine.model) == {"a1", "a2"} and "bad" not in engine.adapters
        assert "bad" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
    finally:
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 200
    assert engine.model.active_adapter == "a1"  # never the half-loaded one
    assert answer(c, "a1") == a1 and answer(c, "tiny") == base
    assert load(c, "bad", adapters / "a2").status_code == 200  # the name is free again
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "bad"}).status_code == 200


def test_a_failed_first_load_leaves_the_base_bare(tiny_llama_dir, adapters):
    from peft.tuners.tuners_utils import BaseTunerLayer

    bare = Engine(with_(serve_config(tiny_llama_dir, adapters), {"adapters": {}}))
    bare.load()
    try:
        c = local(create_app(bare.cfg, bare))
        before = answer(c, "tiny")
        for how in ("rank", "truncated"):
            assert_error(load(c, "bad", broken_copy(adapters, "first-" + how, how)), 400)
            assert not any(isinstance(m, BaseTunerLayer) for m in bare.model.modules())
            assert not hasattr(bare.model, "peft_config") and answer(c, "tiny") == before
        assert load(c, "a1", adapters / "a1").status_code == 200
        assert answer(c, "tiny") == before
    finally:
        bare.shutdown()


def test_every_file_of_an_adapter_is_confined(engine, adapters, tmp_path):
    c = local(create_app(engine.cfg, engine))
    outside = make_adapter(Path(engine.cfg.model), tmp_path / "outside", seed=5)
    (outside / "llamaforge_template.json").write_text(json.dumps({"name": "x", "jinja": "{{ x }}"}))
    for i, name in enumerate(
        ["adapter_model.safetensors", "adapter_config.json", "llamaforge_template.json"]
    ):
        folder = adapters / f"links-{i}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(adapters / "a1", folder)
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to(outside / name)  # issue example: weights linking out of an allowed folder
        err = assert_error(load(c, f"links{i}", folder), 400)
        assert "links outside" in err["message"] and name in err["message"]
        assert f"links{i}" not in engine.adapters
    inside = adapters / "linked-inside"  # a link that stays inside the allowed folders is fine
    shutil.rmtree(inside, ignore_errors=True)
    inside.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (inside / name).symlink_to(adapters / "a2" / name)
    assert load(c, "inside", inside).status_code == 200
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "inside"}).status_code == 200


@pytest.mark.parametrize(
    "change, field",
    [
        ({"r": 0}, "r="),
        ({"r": 100_000}, "serve.max_lora_rank"),
        ({"r": "4"}, "r="),
        ({"rank_pattern": {"q_proj": 10_000}}, "rank_pattern"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"target_modules": ["q_proj", "no_such_proj"]}, "no_such_proj"),
        ({"target_modules": ".*nothing_matches"}, "matches no module"),
        ({"target_modules": []}, "target_modules"),
        ({"use_dora": "yes"}, "use_dora"),
        ({"peft_type": "PREFIX_TUNING"}, "only LoRA"),  # peft_type
    ],
)
def test_adapter_configs_are_checked_against_the_base(engine, adapters, change, field):
    folder = adapters / "checked"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(adapters / "a1", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    err = assert_error(load(local(create_app(engine.cfg, engine)), "checked", folder), 400)
    assert field in err["message"] and "adapter_config.json" in err["message"]
    assert "checked" not in engine.adapters and loaded_names(engine.model) == set(engine.adapters)


def test_unreadable_adapter_configs_are_400s(engine, adapters):
    c = local(create_app(engine.cfg, engine))
    for i, text in enumerate(["{not json", "[1, 2]", "\udcff".encode("utf-8", "surrogateescape")]):
        folder = adapters / f"unreadable-{i}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(adapters / "a1", folder)
        path = folder / "adapter_config.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        assert "adapter_config.json" in assert_error(load(c, f"u{i}", folder), 400)["message"]


def test_only_admin_keys_administer_adapters(engine, adapters, monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_TEST_KEYS", "user:key-user-1,boss:key-boss-1:admin")
    c = local(create_app(with_(engine.cfg, {"api_keys_env": "LLAMAFORGE_TEST_KEYS"}), engine))
    user, boss = {"Authorization": "Bearer key-user-1"}, {"Authorization": "Bearer key-boss-1"}
    assert assert_error(load(c, "a2", adapters / "a2", **user), 403)["type"] == "permission_error"
    assert_error(c.post("/v1/unload_lora_adapter", json={"lora_name": "a1"}, headers=user), 403)
    assert_error(c.post("/v1/load_lora_adapter", content=b"{bad", headers=user), 403)  # before the body
    assert_error(load(c, "a2", adapters / "a2"), 401)
    assert "a1" in engine.adapters and "a2" not in engine.adapters
    assert load(c, "a2", adapters / "a2", **boss).status_code == 200
    assert (
        c.post("/v1/chat/completions", json=chat_body("a2"), headers=user).status_code == 200
    )  # use is open
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}, headers=boss).status_code == 200


def test_key_lines_with_and_without_admin():
    keys = parse_keys(["plain-key-123", "alice:key-alice-1", "root:key-root-12:admin", "odd:key:with:colons"])
    assert keys["plain-key-123"].admin is False and keys["plain-key-123"].name.startswith("key-")
    assert keys["key-alice-1"].name == "alice" and not keys["key-alice-1"].admin
    assert keys["key-root-12"].name == "root" and keys["key-root-12"].admin
    assert keys["key:with:colons"].name == "odd" and not keys["key:with:colons"].admin
    with pytest.raises(ConfigError, match="shorter than 8"):
        parse_keys(["boss:short:admin"])


def test_the_number_of_adapters_is_capped(engine, adapters, tiny_llama_dir):
    app = create_app(with_(engine.cfg, {"max_adapters": 2}), engine)
    c = local(app)
    engine.cfg = with_(engine.cfg, {"max_adapters": 2})

    async def race():  # two loads for the last place at once: exactly one gets it
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as ac:
            bodies = [{"lora_name": n, "lora_path": str(adapters / "a2")} for n in ("r1", "r2")]
            return await asyncio.gather(*[ac.post("/v1/load_lora_adapter", json=b) for b in bodies])

    try:
        assert sorted(r.status_code for r in asyncio.run(race())) == [200, 400]
        winner = next(n for n in ("r1", "r2") if n in engine.adapters)
        assert len(engine.adapters) == 2 and loaded_names(engine.model) == {"a1", winner}
        err = assert_error(load(c, "third", adapters / "a2"), 400)
        assert "serve.max_adapters" in err["message"] and "third" not in engine.adapters
    finally:
        for name in ("r1", "r2"):
            c.post("/v1/unload_lora_adapter", json={"lora_name": name})
        engine.cfg = with_(engine.cfg, {"max_adapters": 8})
    pair = {"x": str(adapters / "a1"), "y": str(adapters / "a2")}
    many = with_(serve_config(tiny_llama_dir, adapters), {"max_adapters": 1, "adapters": pair})
    with pytest.raises(ConfigError, match="serve.max_adapters=1"):
        Engine(many).load()


def test_dora_rows_never_share_a_forward(engine, adapters, tiny_llama_dir):
    dora = adapters / "dora"
    if not dora.exists():
        make_adapter(tiny_llama_dir, dora, seed=9, use_dora=True)
    app = create_app(engine.cfg, engine)
    c = local(app)
    assert load(c, "d", dora).status_code == 200
    try:
        assert engine.adapters["d"].dora
        jobs = [(m, f"Question {i}: " + "how " * i) for i, m in enumerate(["tiny", "d", "a1"] * 2)]
        sequential = [
            c.post("/v1/chat/completions", json=chat_body(m, p)).json()["choices"][0]["message"]["content"]
            for m, p in jobs
        ]

        async def together():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as ac:
                return await asyncio.gather(
                    *[ac.post("/v1/chat/completions", json=chat_body(m, p)) for m, p in jobs]
                )

        rs = asyncio.run(together())
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        assert [r.json()["choices"][0]["message"]["content"] for r in rs] == sequential
        # the batch taken from a mixed queue: DoRA rows alone, everything else together
        waiting = [GenRequest([1], a, 1) for a in ("d", None, "a1", "d")]
        with engine._cond:
            engine._waiting.extend(waiting)
            first = engine._pop(_ANY, 8)
            second = engine._pop(_ANY, 8)
            engine._running -= len(first) + len(second)
        assert [r.adapter for r in first] == ["d", "d"] and [r.adapter for r in second] == [None, "a1"]
    finally:
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "d"}).status_code == 200
