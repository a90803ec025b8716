"""The gateway in front of a real llama-server (skipped, saying why, when it is not built: `make serve-cpu`).

On the tiny Llama with real peft adapters: an adapter hot-loaded while 8 clients stream (none fails,
the new one answers, /metrics shows both, the engine's own metrics are folded in), and the engine
process killed mid-answer (503, then the gateway's next requests are answered again).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from llamaforge.serve.app import create_app  # noqa: E402
from llamaforge.serve.llamacpp import find_binary  # noqa: E402
from test_serve import ServerThread, adapters, serve_config  # noqa: E402, F401

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        find_binary() is None, reason="llama.cpp's llama-server is not built (make serve-cpu)"
    ),
]


def exporters():
    from llamaforge.export.gguf import export_gguf
    from llamaforge.export.gguf_lora import export_lora_gguf

    return export_gguf, lambda adapter, base, out: export_lora_gguf(adapter, base, out, dtype="f32")


@pytest.fixture(scope="module")
def gateway(tiny_llama_dir, adapters):  # noqa: F811
    from llamaforge.serve.engines import llamacpp_engine

    cfg = serve_config(
        tiny_llama_dir, adapters, gguf_dtype="f32", max_batch_size=8, engine_threads=1, max_model_len=512
    )
    engine = llamacpp_engine(cfg, exporters())
    app = create_app(cfg, engine)
    with ServerThread(app) as url:
        deadline = time.monotonic() + 300
        while not engine.ready:
            assert not engine.load_error, engine.load_error
            assert time.monotonic() < deadline, "the gateway did not become ready"
            time.sleep(0.2)
        yield url, engine
    engine.shutdown()


def chat(url: str, model: str, content: str, max_tokens: int = 24, **kw) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return httpx.post(url + "/v1/chat/completions", json={"temperature": 0, **body, **kw}, timeout=120)


def test_answers_like_the_transformers_engine(gateway, tiny_llama_dir, adapters):  # noqa: F811
    """Same template, same greedy tokens (f32 GGUF, the tiny model): the first tokens agree."""
    from llamaforge.serve.engine import Engine

    url, _ = gateway
    reference = Engine(serve_config(tiny_llama_dir, adapters))
    reference.load()
    try:
        with ServerThread(create_app(reference.cfg, reference)) as ref_url:
            same = 0
            for i, prompt in enumerate(["Hello there", "What is 2+2?", "Name a colour.", "Say hi"]):
                model = "a1" if i % 2 else "tiny"
                ours = chat(url, model, prompt, max_tokens=6).json()
                theirs = chat(ref_url, model, prompt, max_tokens=6).json()
                assert ours["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"]  # one template
                same += ours["choices"][0]["message"]["content"] == theirs["choices"][0]["message"]["content"]
    finally:
        reference.shutdown()
    assert same >= 3, f"only {same}/4 greedy answers agree"


def test_adapter_hot_loaded_while_8_clients_stream(gateway, adapters):  # noqa: F811
    url, engine = gateway
    failures, done, stop = [], [], threading.Event()

    def client(k: int) -> None:
        while not stop.is_set():
            body = {
                "model": "a1" if k % 2 else "tiny",
                "messages": [{"role": "user", "content": f"client {k} says hello"}],
                "max_tokens": 24,
                "stream": True,
            }
            try:
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
                    text = "".join(r.iter_lines())
                if r.status_code != 200 or "error" in text or "[DONE]" not in text:
                    failures.append((r.status_code, text[-300:]))
                done.append(k)
            except httpx.HTTPError as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    while len(done) < 8:
        time.sleep(0.05)
    before = len(done)
    r = httpx.post(
        url + "/v1/load_lora_adapter",
        json={"lora_name": "a2", "lora_path": str(adapters / "a2")},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures[:3]
    assert len(done) > before  # requests went on being answered around the swap
    a2 = chat(url, "a2", "Hello there")
    base = chat(url, "tiny", "Hello there")
    assert a2.status_code == 200 and a2.json()["model"] == "a2"
    assert a2.json()["choices"][0]["message"]["content"] != base.json()["choices"][0]["message"]["content"]
    metrics = httpx.get(url + "/metrics").text
    assert 'model_name="a1"' in metrics
    assert 'model_name="a2"' in metrics and "llamacpp:" in metrics  # ours and the engine's
    assert "vllm:lora_adapters_loaded 2.0" in metrics
    # unloading forgets it at once; loading it again selects the file the engine already holds
    pid = engine.process.proc.pid
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 200
    assert chat(url, "a2", "Hi").status_code == 404
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": str(adapters / "a2")})
    assert r.status_code == 200 and engine.process.proc.pid == pid  # no restart needed
    assert (
        chat(url, "a2", "Hello there").json()["choices"][0]["message"]["content"]
        == (a2.json()["choices"][0]["message"]["content"])
    )


def test_engine_killed_mid_answer_gives_503_then_recovers(gateway):
    url, engine = gateway
    restarts = engine.process.restarts
    result = {}

    def go() -> None:
        result["r"] = chat(url, "tiny", "Write a long story", max_tokens=400)

    t = threading.Thread(target=go)
    t.start()
    deadline = time.monotonic() + 30
    while engine._running == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(engine.process.proc.pid, signal.SIGKILL)
    t.join(timeout=60)
    r = result["r"]
    assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
    after = chat(url, "tiny", "Hello again", max_tokens=4)  # waits in the gateway for the restart
    assert after.status_code == 200 and engine.process.restarts == restarts + 1


def test_default_model_with_an_adapter_agrees_with_the_transformers_engine(tmp_path):
    """50 fixed prompts, greedy, the run's template: llama.cpp (f32 GGUF + LoRA GGUF) gives the transformers
    engine's first 16 tokens on at least 90% of them."""
    import json
    import sys
    from pathlib import Path

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llamaforge.catalog import resolve

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import serve_engines

    base = resolve("smollm2-135m-instruct")
    run = tmp_path / "runs" / "tuned"
    torch.manual_seed(7)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)  # a delta the size training leaves
    model.save_pretrained(run / "adapter")
    (run / "run.json").write_text(
        json.dumps({"base_model": str(base), "method": "lora", "weights": "adapter", "template": "auto"})
    )
    result = serve_engines.agreement(str(run), ["f32"], 50)
    print(result)
    assert result["f32"]["rate"] >= 0.9, result
