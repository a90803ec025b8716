"""The gateway's engines without the C++ build: the llama-server and vLLM command lines and requests,
how `auto` chooses, and the supervision of an engine process (a real child server, killed and restarted)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from llamaforge.errors import ConfigError  # noqa: E402
from llamaforge.serve.config import ServeConfig  # noqa: E402
from llamaforge.serve.engine import GenRequest  # noqa: E402
from llamaforge.serve.engine_process import EngineFailed, EngineProcess  # noqa: E402
from test_serve import adapters, make_adapter  # noqa: E402, F401 - the tiny model's two real adapters


def test_llama_server_command_line(tmp_path):
    from llamaforge.serve.llamacpp import context_per_request, server_argv

    cfg = ServeConfig(max_batch_size=4, max_model_len=512)
    argv = server_argv(
        Path("/opt/llama-server"),
        tmp_path / "m.gguf",
        [tmp_path / "a.gguf", tmp_path / "b.gguf"],
        cfg,
        512,
        2,
    )(4321, "sekret")
    assert argv[:3] == ["/opt/llama-server", "--model", str(tmp_path / "m.gguf")]
    value = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
    assert value("--host") == "127.0.0.1" and value("--port") == "4321" and value("--api-key") == "sekret"
    assert value("--parallel") == "4" and value("--ctx-size") == str(4 * 512) and value("--threads") == "2"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--lora"] == [
        str(tmp_path / "a.gguf"),
        str(tmp_path / "b.gguf"),
    ]
    assert "--lora-init-without-apply" in argv and "--metrics" in argv
    no_lora = server_argv(Path("x"), tmp_path / "m.gguf", [], cfg, 512)(1, "k")
    assert (
        "--lora" not in no_lora and "--lora-init-without-apply" not in no_lora and "--threads" not in no_lora
    )
    assert (
        context_per_request(ServeConfig(), 8192) == 4096 and context_per_request(ServeConfig(), 2048) == 2048
    )
    assert context_per_request(ServeConfig(max_model_len=16384), 8192) == 8192


def test_llama_server_request_selects_one_adapter_per_request():
    from llamaforge.serve.llamacpp import completion_body, finish_reason

    req = GenRequest(prompt_ids=[1, 2, 3], adapter="b", max_tokens=7, temperature=0.0, seed=5)
    body = completion_body(req, 1, 3)
    assert body["prompt"] == [1, 2, 3] and body["n_predict"] == 7 and body["return_tokens"] and body["stream"]
    assert body["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}, {"id": 2, "scale": 0.0}]
    assert body["top_k"] == 0 and body["min_p"] == 0.0 and body["seed"] == 5  # OpenAI sampling only
    base = completion_body(GenRequest(prompt_ids=[1], adapter=None, max_tokens=1), None, 2)
    assert all(entry["scale"] == 0.0 for entry in base["lora"])
    assert "lora" not in completion_body(req, None, 0)
    assert finish_reason({"stop_type": "limit"}) == "length" and finish_reason({"stop_type": "eos"}) == "stop"


def test_vllm_behind_the_gateway(tiny_llama_dir, adapters):  # noqa: F811
    from llamaforge.serve.vllm import completions_body, gateway_argv, gateway_rank

    cfg = ServeConfig(model=str(tiny_llama_dir), max_adapters=3, max_model_len=1024)
    paths = {"a2": str(adapters / "a2")}
    rank = gateway_rank(cfg, list(paths.values()))
    assert rank == 16  # the run's rank 12, rounded up to one vLLM takes
    argv = gateway_argv(cfg, str(tiny_llama_dir), "tiny", paths, rank)(5555, "k")
    value = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
    assert argv[:3] == ["vllm", "serve", str(tiny_llama_dir)] and value("--host") == "127.0.0.1"
    assert value("--port") == "5555" and value("--served-model-name") == "tiny" and "k" not in argv
    assert "--enable-lora" in argv and value("--max-loras") == "3" and value("--max-lora-rank") == "16"
    assert value("--lora-modules") == f"a2={adapters / 'a2'}" and value("--max-model-len") == "1024"
    assert gateway_rank(cfg, []) == 16
    with pytest.raises(ConfigError, match="max_lora_rank=8"):
        gateway_rank(ServeConfig(max_lora_rank=8), [str(adapters / "a2")])
    no_loading = gateway_argv(ServeConfig(allow_adapter_loading=False), "b", "b", {}, 16)(1, "k")
    assert "--enable-lora" not in no_loading
    req = GenRequest(prompt_ids=[4, 5], adapter="a2", max_tokens=3, stop_ids=frozenset({9, 2}))
    body = completions_body(req, "a2")
    assert body["prompt"] == [4, 5] and body["stop_token_ids"] == [2, 9] and body["model"] == "a2"


def test_auto_falls_back_with_a_hint(tiny_llama_dir, adapters, tmp_path, monkeypatch):  # noqa: F811
    from llamaforge.serve import engines

    monkeypatch.setenv("LLAMAFORGE_LLAMA_SERVER", str(tmp_path / "no-such-binary"))
    name, hint = engines.choose(ServeConfig(model=str(tiny_llama_dir)))
    assert name == "transformers" and "make serve-cpu" in hint and "faster" in hint
    dora = make_adapter(tiny_llama_dir, tmp_path / "dora", seed=3, use_dora=True)
    name, hint = engines.choose(ServeConfig(model=str(tiny_llama_dir), adapters={"d": str(dora)}))
    assert name == "transformers" and "not a plain LoRA adapter" in hint
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("LLAMAFORGE_LLAMA_SERVER", str(binary))
    assert engines.choose(ServeConfig(model=str(tiny_llama_dir)))[0] == "llamacpp"
    with pytest.raises(ConfigError, match="make serve-cpu"):
        monkeypatch.setenv("LLAMAFORGE_LLAMA_SERVER", str(tmp_path / "no-such-binary"))
        engines.llamacpp_engine(ServeConfig(model=str(tiny_llama_dir)), exporters=None)


def test_cli_engine_choice(tmp_path):
    from llamaforge.cli import build_parser
    from llamaforge.commands.serve import build_config

    parse = lambda *a: build_config(build_parser().parse_args(["serve", *a]))  # noqa: E731
    assert parse("m").engine == "auto"
    assert parse("m", "serve.gguf_dtype=f32", "--engine", "llamacpp").gguf_dtype == "f32"
    assert parse("m", "--engine", "llamaforge").engine == "transformers"  # the former name
    with pytest.raises(ConfigError, match="gguf_dtype"):
        parse("m", "serve.gguf_dtype=q2")
    from llamaforge.commands.serve import run

    with pytest.raises(
        Exception, match="serve.engine: unknown serving engine 'llamacp'. did you mean 'llamacpp'"
    ):
        run(build_parser().parse_args(["serve", "m", "serve.engine=llamacp"]))


# ------------------------------------------------------------------ the supervised child


def _http_server(port: int, key: str) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def test_engine_process_is_restarted_when_it_dies_and_stopped_with_us(tmp_path):
    downs = []
    proc = EngineProcess(
        "http.server",
        _http_server,
        log_path=tmp_path / "engine.log",
        health_path="/",
        on_down=lambda: downs.append(1),
    )
    proc.start()
    try:
        first_pid = proc.proc.pid
        assert httpx.get(proc.base_url + "/").status_code == 200
        os.kill(first_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not (proc.restarts == 1 and proc.up.is_set()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.restarts == 1 and proc.up.is_set() and downs == [1]
        assert proc.proc.pid != first_pid and httpx.get(proc.base_url + "/").status_code == 200
    finally:
        proc.stop()
    assert proc.proc is None and not proc.up.is_set()
    with pytest.raises(ProcessLookupError):
        os.kill(first_pid, 0)


def test_engine_process_that_cannot_start_says_why(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import sys\nprint('model file is corrupt: tensor 3 of 9')\nsys.exit(3)\n")
    proc = EngineProcess(
        "broken", lambda port, key: [sys.executable, str(script)], log_path=tmp_path / "b.log"
    )
    with pytest.raises(EngineFailed, match="tensor 3 of 9"):
        proc.start()
    proc.stop()
    assert "model file is corrupt" in (tmp_path / "b.log").read_text()


def test_gateway_applies_stop_tokens_stop_strings_and_length(llama3_tokenizer):
    """The engine's tokens become the answer by the gateway's rules, as in the in-process engine."""
    import asyncio

    from llamaforge.serve.gateway_engine import RemoteEngine

    engine = RemoteEngine(ServeConfig(), backend=None)
    engine.tokenizer = llama3_tokenizer
    ids = llama3_tokenizer("Hello world, STOP here and more", add_special_tokens=False)["input_ids"]
    eot = llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")

    async def answer(tokens: list[int], **kw) -> tuple[str, str, int]:
        req = GenRequest(prompt_ids=[1], adapter=None, **{"max_tokens": 50, **kw})
        req.loop, req.events = asyncio.get_running_loop(), asyncio.Queue()
        for token in tokens:  # one token a chunk, as llama-server streams them
            if engine.accept_tokens(req, [token]):
                break
        text, reason = "", None
        while not req.events.empty():
            kind, value = req.events.get_nowait()
            text, reason = (text + value, reason) if kind == "text" else (text, value)
        return text, reason, len(req.token_ids)

    text, reason, _ = asyncio.run(answer(ids, stop=["STOP"]))
    assert (text, reason) == ("Hello world, ", "stop")
    text, reason, n = asyncio.run(answer([*ids[:3], eot, *ids[3:]], stop_ids=frozenset({eot})))
    assert reason == "stop" and n == 3 and text == llama3_tokenizer.decode(ids[:3])
    text, reason, n = asyncio.run(answer(ids, max_tokens=4))
    assert reason == "length" and n == 4 and text == llama3_tokenizer.decode(ids[:4])


def test_gguf_cache_is_keyed_by_content(tmp_path, monkeypatch):
    """A model converts once; the same bytes elsewhere reuse it, changed bytes convert again; K-quants
    without llama-quantize are refused naming the setting."""
    from llamaforge.serve import gguf_cache

    monkeypatch.setenv("LLAMAFORGE_HOME", str(tmp_path / "home"))
    made = []

    def export(model_dir: Path, out: Path, *, dtype: str) -> Path:
        made.append((model_dir.name, dtype))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes((model_dir / "model.safetensors").read_bytes())
        return out

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "model.safetensors").write_bytes(b"weights")
    first = gguf_cache.base_gguf(tmp_path / "a", "f32", export)
    assert gguf_cache.base_gguf(tmp_path / "b", "f32", export) == first and made == [("a", "f32")]
    (tmp_path / "b" / "model.safetensors").write_bytes(b"tuned weights")
    second = gguf_cache.base_gguf(tmp_path / "b", "f32", export)
    assert second != first and second.read_bytes() == b"tuned weights" and len(made) == 2
    with pytest.raises(ConfigError, match="serve.gguf_dtype=q4_k_m needs llama.cpp's llama-quantize"):
        gguf_cache.base_gguf(tmp_path / "a", "q4_k_m", export)
