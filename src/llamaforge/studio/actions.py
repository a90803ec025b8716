"""The run page's eval and serve actions, and the chat page (two models side by side).

Registered on the app by app.create_app. Every action runs the same CLI a user would type
(`llamaforge eval`, `llamaforge serve`) inside the workspace, with paths checked to stay there.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse

from llamaforge.errors import ConfigError
from llamaforge.studio import evals, schema_form
from llamaforge.studio import workspace as ws
from llamaforge.studio.gateway import absolute_source

EVAL_CANDIDATES = ("base", "tuned")
SKIP_TASK_DIRS = {".studio", "exports", "evals", "checkpoints", "adapter", "model", "jobs"}
RUN_FILES = {"metrics.jsonl", "rejects.jsonl"}  # a run's own logs are not tasks (its val.jsonl is)


def task_files(workspace: Path, run_dir: Path, depth: int = 3) -> list[str]:
    """jsonl files a user could evaluate on: the run's held-out val.jsonl first, then the workspace's."""
    found: list[str] = []
    if (run_dir / "val.jsonl").is_file():
        found.append(ws.run_id(workspace, run_dir) + "/val.jsonl")

    def walk(folder: Path, level: int) -> None:
        for child in sorted(folder.iterdir()):
            if child.name.startswith(".") or child.name in SKIP_TASK_DIRS:
                continue
            if child.is_dir() and level < depth and not ws.is_run(child):
                walk(child, level + 1)
            elif child.is_file() and child.suffix == ".jsonl" and child.name not in RUN_FILES:
                found.append(child.relative_to(workspace).as_posix())

    walk(workspace, 1)
    return found


def check_task(workspace: Path, text: str) -> Path:
    """The task file, which must be a file inside the workspace."""
    text = text.strip()
    if not text:
        raise ConfigError("task: choose the jsonl file to evaluate on")
    path = (workspace / text).resolve()
    if not path.is_relative_to(workspace):
        raise ConfigError(f"task: {text} is outside the workspace {workspace}")
    if not path.is_file():
        raise ConfigError(f"task: {text} is not a file in the workspace")
    return path


def check_rules(rules: list[str]) -> list[str]:
    """--fail-if rules that parse and read only the two candidates the studio evaluates."""
    from llamaforge.evaluate.rules import parse_rule

    out = []
    for number, text in enumerate(rules, 1):
        if not text.strip():
            continue
        try:
            rule = parse_rule(text.strip())
        except ValueError as exc:
            raise ConfigError(f"fail-if line {number}: {exc}") from None
        for cand, _ in rule.references():
            if cand not in EVAL_CANDIDATES:
                raise ConfigError(
                    f"fail-if line {number}: '{text.strip()}' names candidate '{cand}'; "
                    f"the candidates are {', '.join(EVAL_CANDIDATES)}"
                )
        out.append(text.strip())
    return out


def check_host(text: str) -> str:
    """An IP address to listen on, or localhost (the serve command decides whether it needs keys)."""
    host = (text or "127.0.0.1").strip()
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"host: '{host}' is not an IP address (e.g. 127.0.0.1 or 0.0.0.0)") from None
    return host


def evals_of(workspace: Path, rid: str) -> list[dict]:
    """Eval results in the workspace whose candidates include this run (or its base)."""
    out = []
    for folder in evals.find_evals(workspace):
        data = evals.results(folder)
        specs = [c.get("spec", "") for c in (data.get("run") or {}).get("candidates") or []]
        sources = {s.split("=", 1)[-1].removeprefix("base:").rstrip("/") for s in specs}
        if rid in sources:
            out.append(
                {
                    "id": folder.relative_to(workspace).as_posix(),
                    "failed": (data.get("run") or {}).get("gate_failed"),
                    "gate": bool(data.get("gate")),
                }
            )
    return out


def register(app: FastAPI, studio, page) -> None:
    def completed(rid: str) -> Path:
        run = studio.run_dir(rid)
        if ws.run_info(run).get("status") != "completed":
            raise ConfigError(f"{rid} has not finished: only a completed run has weights to use")
        return run

    # ------------------------------------------------------------------ eval
    @app.post("/api/runs/{rid:path}/eval")
    async def eval_run(request: Request, rid: str):
        run = completed(rid)
        body = await request.json()
        task = check_task(studio.workspace, str(body.get("task") or ""))
        limit = body.get("limit")
        if limit not in (None, ""):
            try:
                limit = int(limit)
            except (TypeError, ValueError):
                raise ConfigError(f"limit: '{limit}' is not a whole number") from None
            if limit < 1:
                raise ConfigError(f"limit: must be at least 1, got {limit}")
        rules = body.get("fail_if") or []
        if isinstance(rules, str):
            rules = rules.splitlines()
        job = studio.jobs.evaluate(
            run, task, limit=limit or None, fail_if=check_rules([str(r) for r in rules])
        )
        return {"job": job.to_dict(studio.workspace)}

    # ------------------------------------------------------------------ serve
    @app.post("/api/runs/{rid:path}/serve")
    async def serve_run(request: Request, rid: str):
        run = completed(rid)
        body = await request.json()
        served = studio.serving.start(run, check_host(str(body.get("host") or "")))
        return studio.serving_dict(served)

    @app.get("/api/serve")
    async def list_served():
        return [studio.serving_dict(await studio.serving.refresh(s)) for s in studio.serving.all()]

    def served_or_404(sid: str):
        served = studio.serving.get(sid)
        if served is None:
            raise HTTPException(404, f"no server {sid} started from this studio")
        return served

    @app.get("/api/serve/{sid}")
    async def served_state(sid: str):
        return studio.serving_dict(await studio.serving.refresh(served_or_404(sid)))

    @app.post("/api/serve/{sid}/stop")
    async def stop_served(sid: str):
        served = served_or_404(sid)
        await asyncio.to_thread(studio.serving.stop, served)
        return studio.serving_dict(served)

    # ------------------------------------------------------------------ chat
    @app.get("/chat", response_class=HTMLResponse)
    async def chat_page(request: Request, run: str = "", served: str = ""):
        finished = [r for r in ws.list_runs(studio.workspace) if r.status == "completed"]
        servers = [await studio.serving.refresh(s) for s in studio.serving.all() if s.running]
        targets = []
        for r in finished:
            targets.append({"value": f"run:{r.name}", "label": f"{r.name} (tuned, {r.method})"})
            targets.append({"value": f"base:{r.name}", "label": f"base of {r.name} ({r.base_model})"})
        for s in servers:
            label = f"served {ws.run_id(studio.workspace, s.run_dir)} at {s.url}"
            targets.append({"value": f"served:{s.id}", "label": label})
        left = f"base:{run}" if run else ""
        right = f"served:{served}" if served else (f"run:{run}" if run else "")
        if served and not run:
            found = studio.serving.get(served)
            left = f"base:{ws.run_id(studio.workspace, found.run_dir)}" if found else ""
        return page(request, "chat.html", targets=targets, left=left, right=right)

    @app.post("/api/chat/open")
    async def chat_open(request: Request):
        """The gateway and model name for one pane: a run (its weights), its base, a base model, or a
        server started from a run page."""
        target = str((await request.json()).get("target") or "")
        kind, _, value = target.partition(":")
        value = value.strip()
        if kind == "served":
            served = served_or_404(value)
            if not served.running:
                raise ConfigError(f"the server of {served.run_dir.name} has exited")
            model = served.run_dir.name  # `llamaforge serve RUN` names the run's weights after its folder
            log = served.audit_path.with_name("feedback.jsonl").relative_to(studio.workspace).as_posix()
            return {
                "gateway": f"/served/{served.id}",
                "model": model,
                "label": f"{model} (served, {served.url})",
                "feedback": log,  # where the thumbs land (the served process audits with text)
            }
        if kind == "run":
            gateway, model = studio.gateways.for_run(studio.run_dir(value))
            return {"gateway": f"/gateway/{gateway.id}", "model": model, "label": f"{value} (tuned)"}
        if kind == "base":
            run = studio.run_dir(value)
            base = ws.run_info(run).get("base_model")
            if not base:
                raise ConfigError(f"{value} has no base model in its run.json yet")
            gateway = studio.gateways.for_base(absolute_source(str(base), studio.workspace))
            model = gateway.engine.base_name
            return {"gateway": f"/gateway/{gateway.id}", "model": model, "label": f"base: {model}"}
        if kind == "model":
            problem = schema_form.model_source_problem(value, studio.workspace) if value else "name a model"
            if problem:
                raise ConfigError(f"base model: {problem}")
            gateway = studio.gateways.for_base(absolute_source(value, studio.workspace))
            model = gateway.engine.base_name
            return {"gateway": f"/gateway/{gateway.id}", "model": model, "label": model}
        raise ConfigError(f"chat target must be run:RUN, base:RUN, model:SOURCE or served:ID, got '{target}'")
