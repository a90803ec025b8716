"""`llamaforge promote`: put a run's adapter in front of users only when it beats what is served.

1. Load the run's adapter on the server under a fresh name (`NAME-RUN-TIME`), no traffic routed to it.
2. Ask both the served NAME (through the routing table, as users get it) and the new adapter every
   prompt of the job's eval task, greedy, through the server itself: the comparison measures what
   the gateway serves, whatever engine sits behind it.
3. Score both with the job's metrics and put them side by side (evaluate/compare: intervals,
   deltas); the gate is a `--fail-if` rule over `served` and `candidate` (evaluate/rules): when it
   holds, the new adapter is unloaded and the route is left exactly as it was.
4. Otherwise route `canary` of NAME's callers to it (a stable hash per caller), or all of them.

Every step is appended to `<run>/promote.jsonl` (O_APPEND, fsync) as it happens, so an interrupted
promotion still says how far it went.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llamaforge.errors import LlamaforgeError

LOG_FILE = "promote.jsonl"


class PromotionError(LlamaforgeError):
    pass


def log_step(run_dir: Path | None, step: str, **fields) -> dict:
    """Append one step to the run's promote.jsonl (fsync'd); the record."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": step, **fields}
    if run_dir is not None:
        fd = os.open(run_dir / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    return record


class ServerClient:
    """The few gateway calls a promotion makes, with the admin key; errors name the call and the answer."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 600.0):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.url = url

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        try:
            r = self.http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise PromotionError(f"{method} {self.url}{path}: {type(exc).__name__}: {exc}") from None
        if r.status_code >= 400:
            try:
                detail = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                detail = r.text[:300]
            raise PromotionError(f"{method} {self.url}{path}: {r.status_code} {detail}")
        return r.json()

    def models(self) -> list[str]:
        return [m["id"] for m in self.call("GET", "/v1/models")["data"]]

    def route(self, name: str) -> dict:
        routes = {r["name"]: r for r in self.call("GET", "/v1/routes")["data"]}
        return routes.get(name) or {
            "name": name,
            "stable": name,
            "candidate": None,
            "share": 0.0,
            "previous": [],
        }

    def answer(self, model: str, prompt: list, max_tokens: int, user: str) -> str:
        body = {"model": model, "messages": prompt, "temperature": 0, "max_tokens": max_tokens, "user": user}
        return self.call("POST", "/v1/chat/completions", body)["choices"][0]["message"]["content"] or ""


def task_examples(run, task_file: str | None):
    """The eval task: --task FILE, else the job's evaluation.task, else the run's validation split."""
    from llamaforge.evaluate.tasks import TaskExample, load_task

    cfg = run.config().evaluation.task
    if task_file:
        cfg = cfg.model_copy(update={"path": task_file})
    if cfg.path:
        return load_task(cfg).examples, cfg.path
    convs = run.val_conversations()
    examples = [
        TaskExample(list(c.messages[:-1]), c.messages[-1].content) for c in convs if len(c.messages) >= 2
    ]
    if not examples:
        raise PromotionError(
            f"{run.dir}: no eval task (evaluation.task.path) and an empty val.jsonl: pass --task"
        )
    return examples, str(run.dir / "val.jsonl")


def generate(client: ServerClient, model: str, examples, max_tokens: int, workers: int = 4) -> list[str]:
    prompts = [[{"role": m.role, "content": m.content} for m in ex.prompt] for ex in examples]
    with ThreadPoolExecutor(workers) as pool:  # the gateway batches concurrent requests
        return list(pool.map(lambda p: client.answer(model, p, max_tokens, "llamaforge-promote"), prompts))


def compare_on_server(client: ServerClient, served: str, candidate: str, run, task_file: str | None):
    """The side-by-side table of what NAME serves now and the candidate, on the job's task."""
    from llamaforge.evaluate.compare import compare
    from llamaforge.evaluate.metrics import compute_metrics

    evaluation = run.config().evaluation
    examples, path = task_examples(run, task_file)
    references = [ex.reference for ex in examples]
    max_tokens = evaluation.generation.max_new_tokens
    outputs = {
        "served": generate(client, served, examples, max_tokens),
        "candidate": generate(client, candidate, examples, max_tokens),
    }
    scores = {k: compute_metrics(v, references, evaluation.scoring) for k, v in outputs.items()}
    table = compare(scores, bootstrap_samples=evaluation.scoring.bootstrap_samples, seed=0)
    return table, path, len(examples)


def promote(
    run_dir: str | Path,
    *,
    server: str,
    name: str,
    gate: list[str],
    canary: float | None = None,
    api_key: str | None = None,
    task_file: str | None = None,
) -> dict:
    """Evaluate, gate, load and route (see the module docstring); the outcome and the table."""
    from llamaforge.evaluate.rules import evaluate_rules, parse_rule
    from llamaforge.runs import Run

    rules = [parse_rule(g) for g in gate]  # a typo fails before anything is loaded
    run = Run.open(run_dir)
    if not run.is_adapter:
        raise PromotionError(f"{run.dir}: only adapter runs can be hot-loaded (this run saved a whole model)")
    client = ServerClient(server, api_key)
    route = client.route(name)
    served = route["stable"]
    if route["candidate"]:
        raise PromotionError(
            f"'{name}' already has a candidate on canary ({route['candidate']}, share {route['share']}): "
            "promote it (--full) or roll it back (--rollback) first"
        )
    if served not in client.models():
        raise PromotionError(f"'{name}' is not served by {server} (loaded: {', '.join(client.models())})")
    adapter = f"{name}-{run.dir.name}-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}"
    log_step(
        run.dir, "start", server=server, name=name, served=served, candidate=adapter, gate=gate, canary=canary
    )
    client.call(
        "POST", "/v1/load_lora_adapter", {"lora_name": adapter, "lora_path": str(run.weights_dir.resolve())}
    )
    log_step(run.dir, "load", adapter=adapter)
    try:
        table, task, n = compare_on_server(client, name, adapter, run, task_file)
    except BaseException:
        client.call("POST", "/v1/unload_lora_adapter", {"lora_name": adapter})
        log_step(run.dir, "unload", adapter=adapter, reason="evaluation failed")
        raise
    results = evaluate_rules(rules, table)
    failed = [r for r in results if r.failed]
    values = {m: {c: table.value(c, m) for c in table.candidates} for m in table.metrics}
    log_step(run.dir, "evaluate", task=task, examples=n, metrics=values, gate=[r.describe() for r in results])
    outcome = {
        "name": name,
        "served": served,
        "candidate": adapter,
        "table": table,
        "rules": results,
        "run_dir": run.dir,
    }
    if failed:
        client.call("POST", "/v1/unload_lora_adapter", {"lora_name": adapter})
        log_step(run.dir, "gate_failed", failed=[r.describe() for r in failed], unloaded=adapter)
        return {**outcome, "status": "gate_failed"}
    share = 1.0 if canary is None else canary
    client.call("POST", "/v1/routes", {"name": name, "candidate": adapter, "share": share})
    log_step(run.dir, "canary", candidate=adapter, share=share)
    if canary is None:
        client.call("POST", "/v1/routes/promote", {"name": name})
        log_step(run.dir, "promote", stable=adapter, previous=route["stable"])
        return {**outcome, "status": "promoted"}
    return {**outcome, "status": "canary", "share": share}


def finish(
    server: str, name: str, *, rollback: bool, api_key: str | None = None, run_dir: str | None = None
) -> dict:
    """Promote NAME's canary fully, or roll back (drop the canary, else restore the previous stable)."""
    client = ServerClient(server, api_key)
    before = client.route(name)
    after = client.call("POST", "/v1/routes/rollback" if rollback else "/v1/routes/promote", {"name": name})
    step = "rollback" if rollback else "promote"
    log_step(Path(run_dir) if run_dir else None, step, server=server, name=name, before=before, after=after)
    return {"status": step, "before": before, "after": after}
