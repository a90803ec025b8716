"""Serving engines side by side: (a) the gateway + llama.cpp, (b) llama-server alone on the same GGUF,
(c) the gateway's in-process transformers engine; and how often llama.cpp's greedy answers agree with
the transformers engine's.

Speed: for each engine, single-stream decode tokens/s and time to first token (streamed, one client),
then aggregate output tokens/s with 1, 4 and 16 concurrent clients (non-streamed). Every engine gets
the same chat requests through its OpenAI API (llama-server alone formats them with the GGUF's chat
template, which is the run's). Loopback only; never asserts on time. JSON in
bench/results/serve_engines.json, and a table with the machine line.

Agreement (`--agreement N`): N fixed prompts, greedy, through the gateway on llama.cpp (f32 GGUF, and
`--dtype`) and on the transformers engine: the share of prompts whose first 16 tokens are the same.

    python bench/serve_engines.py RUN_OR_MODEL [--dtype q8_0] [--max-tokens 128] [--levels 1 4 16]
        [--agreement 50] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

TOPICS = [
    "the moon",
    "volcanoes",
    "honey bees",
    "the Roman empire",
    "photosynthesis",
    "chess",
    "the piano",
    "rainbows",
    "glaciers",
    "coffee",
    "the internet",
    "dolphins",
    "the Sahara",
    "electricity",
    "bread",
    "the Olympic games",
    "penguins",
    "gravity",
    "the printing press",
    "tea",
    "earthquakes",
    "owls",
    "the Nile",
    "recycling",
    "bicycles",
    "Mars",
    "jazz",
    "sleep",
    "tomatoes",
    "lighthouses",
    "the heart",
    "kites",
    "the Amazon rainforest",
    "vaccines",
    "origami",
    "whales",
    "clocks",
    "the alphabet",
    "snow",
    "bridges",
    "mushrooms",
    "the violin",
    "deserts",
    "maps",
    "elephants",
    "soap",
    "the telescope",
    "tides",
    "wool",
    "thunderstorms",
]
PROMPTS = [f"Tell me one interesting fact about {t}." for t in TOPICS]  # 50 fixed prompts
LONG = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."


def exporters():
    from llamaforge.export.gguf import export_gguf
    from llamaforge.export.gguf_lora import export_lora_gguf

    return export_gguf, lambda adapter, base, out: export_lora_gguf(adapter, base, out, dtype="f32")


class Gateway:
    """The gateway (uvicorn in a thread) on the llama.cpp or transformers engine."""

    def __init__(self, model: str, engine: str, dtype: str = "q8_0", parallel: int = 16):
        from llamaforge.serve.config import ServeConfig

        self.cfg = ServeConfig(
            model=model,
            served_model_name="base",
            gguf_dtype=dtype,
            precision="fp32",
            max_batch_size=parallel,
            max_model_len=1024,
            api_keys_env="LLAMAFORGE_BENCH_NO_KEYS",
        )
        self.kind = engine

    def __enter__(self) -> str:
        import threading

        import uvicorn

        from llamaforge.serve.app import create_app
        from llamaforge.serve.engine import Engine
        from llamaforge.serve.engine_process import free_port
        from llamaforge.serve.engines import llamacpp_engine

        self.engine = llamacpp_engine(self.cfg, exporters()) if self.kind == "llamacpp" else Engine(self.cfg)
        app = create_app(self.cfg, self.engine)  # gives the engine the app's metrics, then load
        self.engine.load()
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        time.sleep(0.5)
        self.engine.shutdown()


class LlamaServerAlone:
    """llama-server on the gateway's GGUF and LoRA files (applied at scale 1: the run's adapter is what
    answers), asked directly with its own key and its own chat template (the GGUF's)."""

    def __init__(self, gateway_engine):
        self.backend, self.engine = gateway_engine.backend, gateway_engine

    def __enter__(self) -> LlamaServerAlone:
        from llamaforge.catalog import home
        from llamaforge.serve.engine_process import EngineProcess

        argv = self.backend._argv(self.engine, self.backend.files)
        alone = lambda port, key: [a for a in argv(port, key) if a != "--lora-init-without-apply"]  # noqa: E731
        self.process = EngineProcess(
            "llama-server (alone)", alone, log_path=home() / "logs" / "bench-alone.log"
        )
        self.process.start()
        self.url, self.headers = self.process.base_url, self.process.headers
        return self

    def __exit__(self, *exc) -> None:
        self.process.stop()


async def _stream_one(client, url: str, headers: dict, model: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(
                (c.get("delta") or {}).get("content") for c in chunk.get("choices") or []
            ):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft_s": (first or end) - start, "tokens": tokens, "decode_s": end - (first or end)}


async def _one(client, url: str, headers: dict, model: str, prompt: str, max_tokens: int) -> int:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    r = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


async def measure(
    url: str, headers: dict, model: str, max_tokens: int, levels: list[int], repeats: int
) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        await _one(client, url, headers, model, "Hello", 4)  # warm-up
        singles = [await _stream_one(client, url, headers, model, LONG, max_tokens) for _ in range(repeats)]
        decode = sum(s["tokens"] - 1 for s in singles) / max(1e-9, sum(s["decode_s"] for s in singles))
        out = {
            "decode_tok_s": round(decode, 2),
            "ttft_s": round(sorted(s["ttft_s"] for s in singles)[len(singles) // 2], 4),
            "aggregate_tok_s": {},
        }
        for n in levels:
            start = time.perf_counter()
            counts = await asyncio.gather(
                *(
                    _one(
                        client,
                        url,
                        headers,
                        model,
                        PROMPTS[k % len(PROMPTS)] + " Explain at length.",
                        max_tokens,
                    )
                    for k in range(n)
                )
            )
            out["aggregate_tok_s"][str(n)] = round(sum(counts) / (time.perf_counter() - start), 2)
    return out


def agreement(model: str, dtypes: list[str], n: int, tokens: int = 16) -> dict:
    """Share of the first n PROMPTS whose first `tokens` greedy tokens agree (llama.cpp vs transformers)."""
    import httpx

    def answers(url: str) -> list[list[int]]:
        from llamaforge.models import load_tokenizer

        tok = load_tokenizer(model if not Path(model, "run.json").is_file() else _base_of(model))
        got = []
        for prompt in PROMPTS[:n]:
            body = {
                "model": _served_name(model),
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": tokens,
                "temperature": 0,
            }
            text = httpx.post(url + "/v1/chat/completions", json=body, timeout=600).json()["choices"][0][
                "message"
            ]["content"]
            got.append(tok(text, add_special_tokens=False)["input_ids"])
        return got

    with Gateway(model, "transformers", parallel=8) as url:
        reference = answers(url)
    result = {}
    for dtype in dtypes:
        with Gateway(model, "llamacpp", dtype=dtype, parallel=8) as url:
            ours = answers(url)
        same = sum(a[:tokens] == b[:tokens] for a, b in zip(ours, reference))
        result[dtype] = {"agree": same, "of": n, "rate": round(same / n, 3)}
    return result


def _served_name(model: str) -> str:
    """What to ask for: the run's adapter when the model is an adapter run, else the base."""
    from llamaforge.runs import Run, is_run_dir

    return Path(model).resolve().name if is_run_dir(model) and Run.open(model).is_adapter else "base"


def _base_of(run: str) -> str:
    from llamaforge.runs import Run

    r = Run.open(run)
    return r.base_model if r.is_adapter else str(r.weights_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", nargs="?", default="smollm2-135m-instruct", help="a run directory or model source"
    )
    parser.add_argument("--dtype", default="q8_0", help="GGUF type for llama.cpp (serve.gguf_dtype)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3, help="single-stream requests averaged")
    parser.add_argument(
        "--agreement", type=int, default=0, metavar="N", help="also the greedy agreement on N prompts"
    )
    parser.add_argument(
        "--engines",
        nargs="*",
        default=["gateway+llamacpp", "llama-server", "transformers"],
        help="which to time (none: only --agreement)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 16 tokens, 1 and 2 clients, 1 repeat"
    )
    parser.add_argument("--out", default=str(HERE / "results" / "serve_engines.json"))
    args = parser.parse_args()
    if args.quick:
        args.max_tokens, args.levels, args.repeats = 16, [1, 2], 1
        args.agreement = min(args.agreement, 4)
    import machine

    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    box = machine.describe("fp32")
    print(box.line())
    results = {}
    served = _served_name(args.model)
    if "gateway+llamacpp" in args.engines or "llama-server" in args.engines:
        gateway = Gateway(args.model, "llamacpp", args.dtype)
        with gateway as url:
            if "gateway+llamacpp" in args.engines:
                results["gateway+llamacpp"] = asyncio.run(
                    measure(url, {}, served, args.max_tokens, args.levels, args.repeats)
                )
            if "llama-server" in args.engines:
                gateway.engine.process.stop()  # one engine on the cores at a time
                with LlamaServerAlone(gateway.engine) as alone:
                    results["llama-server"] = asyncio.run(
                        measure(alone.url, alone.headers, served, args.max_tokens, args.levels, args.repeats)
                    )
    if "transformers" in args.engines:
        with Gateway(args.model, "transformers") as url:
            results["transformers"] = asyncio.run(
                measure(url, {}, served, args.max_tokens, args.levels, args.repeats)
            )
    record = {
        "machine": box.record(),
        "model": args.model,
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "engines": results,
    }
    if args.agreement:
        record["agreement_first_16_tokens"] = agreement(args.model, ["f32", args.dtype], args.agreement)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(table(record))
    print(f"JSON: {out}")
    return 0


def table(record: dict) -> str:
    levels = sorted({k for r in record["engines"].values() for k in r["aggregate_tok_s"]}, key=int)
    head = (
        "| engine | decode tok/s (1 stream) | TTFT s | "
        + " | ".join(f"{n} clients tok/s" for n in levels)
        + " |"
    )
    rows = [head, "|" + "---|" * (3 + len(levels))]
    for name, r in record["engines"].items():
        cells = [str(r["aggregate_tok_s"].get(n, "")) for n in levels]
        rows.append(f"| {name} | {r['decode_tok_s']} | {r['ttft_s']} | " + " | ".join(cells) + " |")
    for dtype, a in (record.get("agreement_first_16_tokens") or {}).items():
        rows.append(
            f"\ngreedy agreement with the transformers engine, {dtype}: {a['agree']}/{a['of']} ({a['rate']:.0%})"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
