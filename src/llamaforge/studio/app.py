"""The studio web app: runs, live curves, the schema-generated job form, job launch and chat.

Pages are rendered on the server (Jinja2 templates in studio/templates); the only script is
studio/static/studio.js (charts as inline SVG, live updates over Server-Sent Events, the form's
validate-as-you-type, streamed chat). Nothing is fetched from another host.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs

import yaml
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from llamaforge.errors import ConfigError
from llamaforge.studio import actions, results_pages, schema_form
from llamaforge.studio import workspace as ws
from llamaforge.studio.gateway import GatewayRouter, Gateways
from llamaforge.studio.jobs import JobManager, default_run_name
from llamaforge.studio.security import COOKIE, StudioGuard, studio_auth
from llamaforge.studio.serving import ServedRouter, ServeManager

HERE = Path(__file__).parent
SORT_KEYS = (
    "name",
    "status",
    "method",
    "base_model",
    "dataset_sha256",
    "step",
    "eval_loss_before",
    "eval_loss_after",
    "started",
    "duration_s",
)
POLL_S = 0.5


def _fmt_time(value: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value)) if value else ""


def _fmt_duration(value: float | None) -> str:
    if value is None:
        return ""
    value = int(round(value))
    return (
        f"{value // 3600}h{value % 3600 // 60:02d}m" if value >= 3600 else f"{value // 60}m{value % 60:02d}s"
    )


def _fmt_loss(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


class Studio:
    """What the routes share: the workspace, its jobs, the chat gateways and the servers it started."""

    def __init__(self, workspace: Path, host: str, api_keys_file: str | None):
        self.workspace = workspace.resolve()
        self.jobs = JobManager(self.workspace)
        self.gateways = Gateways(self.workspace, host=host, api_keys_file=api_keys_file)
        self.serving = ServeManager(self.workspace, api_keys_file=api_keys_file)

    def serving_dict(self, served) -> dict:
        return served.to_dict(self.workspace)

    def run_dir(self, rid: str) -> Path:
        """A run of the workspace, or one a job of this studio is about to create (its page can be
        open before the training process has written anything)."""
        path = ws.resolve_run(self.workspace, rid)
        if path is None:
            pending = (self.workspace / rid).resolve()
            if pending.is_relative_to(self.workspace) and self.jobs.latest_for(pending) is not None:
                return pending
            raise HTTPException(404, f"no run '{rid}' in {self.workspace}")
        return path


def create_app(workspace: str | Path, *, host: str = "127.0.0.1", api_keys_file: str | None = None):
    """The studio as an ASGI app (the guard in front of FastAPI); refuses a non-loopback host without keys."""
    workspace = Path(workspace)
    if not workspace.is_dir():
        raise ConfigError(f"--workspace {workspace} is not a directory")
    auth = studio_auth(host, api_keys_file)
    studio = Studio(workspace, host, api_keys_file)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        studio.jobs.shutdown()
        studio.gateways.shutdown()
        studio.serving.shutdown()

    app = FastAPI(title="llamaforge studio", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.studio = studio
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters.update(when=_fmt_time, duration=_fmt_duration, loss=_fmt_loss)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.mount("/gateway", GatewayRouter(studio.gateways))
    app.mount("/served", ServedRouter(studio.serving))

    def page(request: Request, name: str, **context) -> HTMLResponse:
        context.update(workspace=str(studio.workspace), auth_required=auth.required)
        return templates.TemplateResponse(request, name, context)

    @app.exception_handler(ConfigError)
    async def _config_error(request: Request, exc: ConfigError):
        return JSONResponse({"error": str(exc)}, 400)

    # ------------------------------------------------------------------ login (with API keys only)
    @app.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request):
        return page(request, "login.html", error=None)

    @app.post("/login")
    async def login(request: Request):
        # a urlencoded form read by hand: Starlette's form parser needs python-multipart
        key = parse_qs((await request.body()).decode("utf-8", "replace")).get("key", [""])[0]
        if auth.identify(f"Bearer {key}") is None:
            return page(request, "login.html", error="that key is not one of the API keys of this server")
        response = RedirectResponse("/", 303)
        response.set_cookie(COOKIE, key, httponly=True, samesite="strict")
        return response

    # ------------------------------------------------------------------ runs
    @app.get("/", response_class=HTMLResponse)
    async def runs_page(request: Request, sort: str = "started", order: str = "desc"):
        rows = sorted_runs(studio.workspace, sort, order)
        return page(request, "runs.html", runs=rows, sort=sort, order=order, sort_keys=SORT_KEYS)

    @app.get("/api/runs")
    async def api_runs(sort: str = "started", order: str = "desc"):
        return [r.to_dict() for r in sorted_runs(studio.workspace, sort, order)]

    @app.get("/runs/{rid:path}/config.yaml")
    async def run_config(rid: str):
        run = studio.run_dir(rid)
        return PlainTextResponse(
            ws.config_text(run),
            media_type="application/x-yaml",
            headers={"Content-Disposition": f'attachment; filename="{run.name}.yaml"'},
        )

    @app.get("/runs/{rid:path}", response_class=HTMLResponse)
    async def run_page(request: Request, rid: str):
        run = studio.run_dir(rid)
        metrics, metrics_next = ws.read_metrics(run)
        job = studio.jobs.latest_for(run)
        log_text = job.log_path.read_text(encoding="utf-8", errors="replace") if job else ""
        return page(
            request,
            "run.html",
            rid=rid,
            row=ws.run_row(studio.workspace, run),
            metrics=metrics,
            metrics_next=metrics_next,
            config_text=ws.config_text(run),
            card=ws.data_card(run),
            summary=ws.summary(run),
            rejects=ws.rejects(run, limit=20),
            checkpoints=ws.checkpoints(run),
            warnings=ws.warnings(run, log_text),
            job=job.to_dict(studio.workspace) if job else None,
            tasks=actions.task_files(studio.workspace, run),
            evals=actions.evals_of(studio.workspace, rid),
            served=[studio.serving_dict(s) for s in studio.serving.all() if s.run_dir == run],
        )

    @app.get("/api/runs/{rid:path}/metrics")
    async def api_metrics(rid: str, start: int = 0):
        records, next_line = ws.read_metrics(studio.run_dir(rid), start)
        return {"records": records, "next": next_line}

    @app.get("/api/runs/{rid:path}/rejects")
    async def api_rejects(rid: str, q: str = "", offset: int = 0, limit: int = 50):
        return ws.rejects(studio.run_dir(rid), q, max(0, offset), min(max(1, limit), 500))

    @app.get("/api/runs/{rid:path}/events")
    async def run_events(request: Request, rid: str, start: int = 0):
        """SSE: each new metrics.jsonl record ("metric", id = its line), and the run's row whenever
        run.json or summary.json changes ("status"). Reconnects resume from Last-Event-ID."""
        run = studio.run_dir(rid)
        last_id = request.headers.get("last-event-id")
        line = int(last_id) + 1 if last_id and last_id.isdigit() else max(0, start)

        async def stream():
            nonlocal line
            signature = None
            while not await request.is_disconnected():
                records, next_line = ws.read_metrics(run, line)
                for offset, record in enumerate(records):
                    yield f"id: {line + offset}\nevent: metric\ndata: {json.dumps(record)}\n\n"
                line = next_line
                now = ws.files_signature(run)
                if now != signature:
                    signature = now
                    row = ws.run_row(studio.workspace, run).to_dict()
                    yield f"event: status\ndata: {json.dumps(row)}\n\n"
                yield ": keep-alive\n\n"
                await asyncio.sleep(POLL_S)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/api/runs/{rid:path}/stop")
    async def stop_run(rid: str):
        run = studio.run_dir(rid)
        job = studio.jobs.running_for(run)
        if job is None:
            raise ConfigError(f"no job launched from this studio is running for {rid}")
        studio.jobs.stop(job)
        return {"stopping": job.id}

    @app.post("/api/runs/{rid:path}/resume")
    async def resume_run(rid: str):
        job = studio.jobs.resume(studio.run_dir(rid))
        return {"job": job.to_dict(studio.workspace)}

    @app.post("/api/runs/{rid:path}/export")
    async def export_run(request: Request, rid: str):
        run = studio.run_dir(rid)
        if ws.run_info(run).get("status") != "completed":
            raise ConfigError(f"{rid} has not finished: only a completed run can be exported")
        body = await request.json()
        job = studio.jobs.export(run, str(body.get("format") or "safetensors"))
        return {"job": job.to_dict(studio.workspace)}

    # ------------------------------------------------------------------ new job
    @app.get("/new", response_class=HTMLResponse)
    async def new_job(request: Request):
        sections: dict[str, list] = {}
        for f in schema_form.form_fields():
            sections.setdefault(f.section, []).append(f)
        from llamaforge.planning.throughput import GPUS

        return page(request, "new.html", sections=sections, gpus=[g.name for g in GPUS.values()])

    @app.get("/api/schema")
    async def api_schema():
        return [f.to_dict() for f in schema_form.form_fields()]

    @app.post("/api/jobs/validate")
    async def validate_job(request: Request):
        checked, data, _ = check_job(studio, await request.json())
        return checked_body(checked, data)

    @app.post("/api/jobs")
    async def launch_job(request: Request):
        checked, data, job_yaml = check_job(studio, await request.json(), launching=True)
        if checked.config is None or checked.errors:
            return JSONResponse(checked_body(checked, data), 422)
        job = studio.jobs.launch(checked.config, job_yaml)
        return {"job": job.to_dict(studio.workspace), "run": ws.run_id(studio.workspace, job.run_dir)}

    @app.post("/api/jobs/plan")
    async def plan_job(request: Request):
        """The planner's memory / time / method advice for the form's job on the chosen hardware."""
        body = await request.json()
        checked, data, job_yaml = check_job(studio, body)
        if checked.config is None or checked.errors:
            return JSONResponse(checked_body(checked, data), 422)
        gpu = str(body.get("gpu") or "") or None
        text = await asyncio.to_thread(studio.jobs.plan, job_yaml, gpu, int(body.get("gpus") or 1))
        return {"plan": text}

    @app.get("/api/jobs/{job_id}/log")
    async def job_log(request: Request, job_id: str):
        """SSE: the job's output, line by line (tqdm's carriage returns end lines too), then "end"."""
        job = studio.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")

        async def stream():
            position, pending = 0, ""
            while not await request.is_disconnected():
                running = job.running
                with open(job.log_path, encoding="utf-8", errors="replace") as fh:
                    fh.seek(position)
                    chunk = fh.read()
                    position = fh.tell()
                pending += chunk
                *lines, pending = pending.replace("\r", "\n").split("\n")
                for text in lines:
                    if text.strip():
                        yield f"event: line\ndata: {json.dumps(text)}\n\n"
                if not running and not chunk:
                    if pending.strip():
                        yield f"event: line\ndata: {json.dumps(pending)}\n\n"
                    yield f"event: end\ndata: {json.dumps({'returncode': job.returncode})}\n\n"
                    return
                await asyncio.sleep(POLL_S)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    results_pages.register(app, studio, page)

    actions.register(app, studio, page)

    return StudioGuard(app, auth, host)


def sorted_runs(workspace: Path, sort: str, order: str) -> list[ws.RunRow]:
    if sort not in SORT_KEYS:
        raise HTTPException(400, f"sort must be one of {', '.join(SORT_KEYS)}")
    rows = ws.list_runs(workspace)
    present = [r for r in rows if getattr(r, sort) is not None]
    missing = [r for r in rows if getattr(r, sort) is None]
    present.sort(key=lambda r: getattr(r, sort), reverse=order == "desc")
    return present + missing  # rows without the value last, whichever the order


def check_job(studio: Studio, body: dict, *, launching: bool = False):
    """(schema check, the job mapping, its YAML) for a form's values or pasted YAML."""
    if body.get("yaml") is not None:
        data = schema_form.parse_yaml_text(str(body["yaml"]))
    else:
        values = body.get("values") or {}
        if not isinstance(values, dict):
            raise ConfigError("values must map field keys to their text")
        data = schema_form.form_to_data({str(k): v for k, v in values.items()})
    checked = schema_form.validate(data, "pasted YAML" if body.get("yaml") is not None else "studio form")
    if checked.config is not None:
        checked.errors += schema_form.check_paths(checked.config, studio.workspace)
        if launching and not checked.errors and not checked.config.output.name:
            name = default_run_name(checked.config.model.source, checked.config.method.name)
            data.setdefault("output", {})["name"] = name
            checked.config.output.name = name
    job_yaml = yaml.safe_dump(data, sort_keys=False, allow_unicode=True) if data else "{}\n"
    return checked, data, job_yaml


def checked_body(checked, data: dict) -> dict:
    return {
        "valid": checked.config is not None and not checked.errors,
        "errors": checked.errors,
        "message": checked.message or "\n".join(e["message"] for e in checked.errors),
        "yaml": yaml.safe_dump(data, sort_keys=False, allow_unicode=True) if data else "{}\n",
    }
