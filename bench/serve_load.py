"""Load test of `llamaforge serve` on loopback: concurrent clients (1, 4, 16) with mixed adapters.

Starts the server in this process (uvicorn on 127.0.0.1, a free port) on the default model with two
LoRA adapters made here (random, small B: outputs differ from the base but stay fluent enough), then
for each concurrency level runs that many streaming clients, each picking the base or an adapter in
turn, until `--requests` per level are done or `--seconds` pass. Reports requests/s, output tokens/s,
p50/p95 time to first token and latency, errors and lost requests, and the prefix cache's hit rate
(prompt tokens whose prefill was skipped); writes bench/results/serve_load.json. With
`--system-prompt-tokens N` every request starts with the same N-token system prompt (the case the
prefix cache is for); compare `--prefix-cache-tokens 0` to see what it saves. Loopback only, bounded in
time and count; never asserts on time.

    python bench/serve_load.py [--model smollm2-135m-instruct] [--levels 1 4 16] [--max-tokens 32]
        [--system-prompt-tokens 300] [--prefix-cache-tokens 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about autumn leaves.",
    "Explain what a neural network is to a child.",
    "List four colours of the rainbow.",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot.",
    "Summarise the plot of Cinderella in two sentences.",
]


def make_adapters(model_source: str, root: Path) -> dict[str, str]:
    import torch
    from peft import LoraConfig, get_peft_model

    from llamaforge.models import load_model

    out = {}
    for i, name in enumerate(("support", "legal")):
        torch.manual_seed(100 + i)
        base, _ = load_model(model_source)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.02)
        model.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


RULES = (
    "You are the customer support assistant of Northwind Outfitters. Answer in the customer's language, "
    "be concise and friendly, never promise refunds, escalate safety issues, and cite the policy section. "
)


def system_prompt(tokenizer, tokens: int) -> str:
    """A system prompt of about `tokens` tokens (the rules repeated, cut at a token boundary)."""
    if tokens <= 0:
        return ""
    ids = tokenizer(RULES * (tokens // 20 + 2), add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int, system: str = "") -> dict:
    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, tokens, finish = None, 0, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}", "model": model}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk["choices"]:
                    if c["delta"].get("content") and first is None:
                        first = time.perf_counter() - start
                    finish = c.get("finish_reason") or finish
    except Exception as exc:  # noqa: BLE001 - a benchmark counts failures, it does not stop on them
        return {"error": f"{type(exc).__name__}: {exc}", "model": model}
    if finish is None:
        return {"error": "stream ended without a finish reason", "model": model}
    return {"ttft": first, "latency": time.perf_counter() - start, "tokens": tokens, "model": model}


async def run_level(
    url: str,
    clients: int,
    models: list[str],
    max_requests: int,
    seconds: float,
    max_tokens: int,
    system: str = "",
) -> dict:
    import httpx

    results: list[dict] = []
    issued = 0
    deadline = time.perf_counter() + seconds

    async def client_loop(cid: int, client):
        nonlocal issued
        while issued < max_requests and time.perf_counter() < deadline:
            i = issued
            issued += 1
            model = models[(i + cid) % len(models)]
            prompt = PROMPTS[i % len(PROMPTS)]
            results.append(await one_request(client, url, model, prompt, max_tokens, system))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*[client_loop(c, client) for c in range(clients)])
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients,
        "requests": len(results),
        "ok": len(ok),
        "errors": len(errors),
        "error_samples": errors[:3],
        "lost": issued - len(results),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "output_tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": pct([r["ttft"] for r in ok if r["ttft"] is not None], 50),
        "ttft_p95_s": pct([r["ttft"] for r in ok if r["ttft"] is not None], 95),
        "latency_p50_s": pct([r["latency"] for r in ok], 50),
        "latency_p95_s": pct([r["latency"] for r in ok], 95),
        "mean_output_tokens": round(statistics.mean([r["tokens"] for r in ok]), 1) if ok else 0,
        "by_model": {m: sum(1 for r in ok if r["model"] == m) for m in models},
    }


def prefix_counts(metrics) -> tuple[float, float]:
    """(hit, queried) prompt tokens so far, over all models, from the server's own counters."""
    totals = {"prefix_cache_hits": 0.0, "prefix_cache_queries": 0.0}
    for family in metrics.registry.collect():
        for sample in family.samples:
            for name in totals:
                if sample.name.endswith(name + "_total"):
                    totals[name] += sample.value
    return totals["prefix_cache_hits"], totals["prefix_cache_queries"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument(
        "--requests", type=int, default=0, help="requests per level (default: 3 x clients, min 6)"
    )
    ap.add_argument("--seconds", type=float, default=120, help="time bound per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--precision", default="auto")
    ap.add_argument(
        "--system-prompt-tokens", type=int, default=0, help="a shared system prompt of N tokens (0: none)"
    )
    ap.add_argument(
        "--prefix-cache-tokens", type=int, default=4096, help="serve.prefix_cache_tokens (0: off)"
    )
    ap.add_argument("--out", default=str(HERE / "results" / "serve_load.json"))
    args = ap.parse_args()

    import uvicorn

    from llamaforge.serve.app import create_app
    from llamaforge.serve.config import ServeConfig
    from machine import describe

    machine = describe(args.precision)
    print(machine.line(), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    t0 = time.perf_counter()
    adapters = make_adapters(args.model, tmp)
    cfg = ServeConfig(
        model=args.model,
        adapters=adapters,
        adapter_dirs=[str(tmp)],
        precision=args.precision,
        max_batch_size=16,
        max_queue=256,
        prefix_cache_tokens=args.prefix_cache_tokens,
        host="127.0.0.1",
        port=free_port(),
        api_keys_env="LLAMAFORGE_BENCH_NO_KEYS",
    )
    app = create_app(cfg)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    engine = app.state.server.engine
    while not (server.started and engine.ready):
        if engine.load_error:
            raise SystemExit(f"model failed to load: {engine.load_error}")
        time.sleep(0.1)
    print(f"server up in {time.perf_counter() - t0:.1f} s: {engine.model_names()}")
    url = f"http://127.0.0.1:{cfg.port}"
    models = engine.model_names()
    system = system_prompt(engine.tokenizer, args.system_prompt_tokens)
    metrics = app.state.server.metrics

    asyncio.run(run_level(url, 2, models, 2, 60, 4, system))  # warm-up, not reported
    rows = []
    for clients in args.levels:
        engine.batch_sizes.clear()
        n = args.requests or max(6, 3 * clients)
        hits0, queries0 = prefix_counts(metrics)
        row = asyncio.run(run_level(url, clients, models, n, args.seconds, args.max_tokens, system))
        row["mean_batch_size"] = round(statistics.mean(engine.batch_sizes), 2) if engine.batch_sizes else 0
        hits, queries = prefix_counts(metrics)
        row["prefix_hit_rate"] = round((hits - hits0) / (queries - queries0), 3) if queries > queries0 else 0
        rows.append(row)
        print(f"  {clients:>2} clients: {row['ok']}/{row['requests']} ok, {row['output_tokens_per_s']} tok/s")
    server.should_exit = True

    base = rows[0]["output_tokens_per_s"] or float("nan")
    print(f"\n{machine.line()}")
    print(
        f"{'clients':>7} {'req':>4} {'err':>3} {'lost':>4} {'req/s':>6} {'out tok/s':>9} {'x1':>5} "
        f"{'ttft p50':>8} {'ttft p95':>8} {'lat p50':>7} {'lat p95':>7} {'batch':>5} {'prefix hit':>10}"
    )
    for r in rows:
        print(
            f"{r['clients']:>7} {r['requests']:>4} {r['errors']:>3} {r['lost']:>4} {r['requests_per_s']:>6.2f} "
            f"{r['output_tokens_per_s']:>9.1f} {r['output_tokens_per_s'] / base:>5.2f} "
            f"{r['ttft_p50_s'] or 0:>8.2f} {r['ttft_p95_s'] or 0:>8.2f} {r['latency_p50_s'] or 0:>7.2f} "
            f"{r['latency_p95_s'] or 0:>7.2f} {r['mean_batch_size']:>5} {r['prefix_hit_rate']:>10.1%}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "adapters": list(adapters),
                "max_tokens": args.max_tokens,
                "precision": machine.precision,
                "system_prompt_tokens": args.system_prompt_tokens,
                "prefix_cache_tokens": args.prefix_cache_tokens,
                "machine": {**machine.record(), "arch": platform.machine()},
                "note": "server and clients share this process and the machine's CPU",
                "levels": rows,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
