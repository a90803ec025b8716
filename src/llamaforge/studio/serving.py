"""The run page's serve action: `llamaforge serve RUN` as a subprocess the studio starts and stops.

The server is the command a user would type (same process, same code, same port rules): loopback by
default, any other address only with the API keys the studio itself uses (the serve command refuses
otherwise, and so does this module, before anything starts). The studio reaches it through
/served/<id>/..., a streaming proxy to 127.0.0.1:<port>, so the chat page can talk to it from
wherever the studio is open. The proxy passes only the OpenAI routes the chat uses (not the admin
routes, /metrics or anything else), refuses ids and paths with dot segments or escapes, and signs
every request with the studio's own key, kept here: the page never sees a key.

Each server writes its audit log with text to <workspace>/.studio/feedback/<run>/audit.jsonl, one
folder per run that outlives the server, so the chat's thumbs (POST /v1/feedback) are joined to the
answers and land in feedback.jsonl beside it, ready for `format: feedback`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from llamaforge.errors import ConfigError
from llamaforge.studio.jobs import _child_env
from llamaforge.studio.security import studio_auth

HOP_HEADERS = {b"connection", b"keep-alive", b"transfer-encoding", b"host", b"content-length"}
FORWARDED = {b"content-type", b"accept"}  # Authorization is the studio's own key, set here
# (method, path after /served/<id>/): what the chat page uses; the admin API and /metrics stay closed
PROXIED = {
    ("GET", "health"),
    ("GET", "v1/models"),
    ("POST", "v1/chat/completions"),
    ("POST", "v1/completions"),
    ("POST", "v1/feedback"),
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Served:
    id: str
    run_dir: Path
    host: str
    port: int
    log_path: Path
    argv: list[str]
    process: subprocess.Popen
    audit_path: Path
    started: float = field(default_factory=time.time)
    stop_requested: bool = False
    models: list[str] = field(default_factory=list)  # from /health once it answers
    ready: bool = False

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def state(self) -> str:
        """starting (loading the model) | ready | stopped (from the studio) | exited (on its own)."""
        if not self.running:
            return "stopped" if self.stop_requested else "exited"
        return "ready" if self.ready else "starting"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def to_dict(self, workspace: Path) -> dict:
        return {
            "id": self.id,
            "run": self.run_dir.relative_to(workspace).as_posix(),
            "state": self.state,
            "url": self.url,
            "proxy": f"/served/{self.id}",
            "models": self.models,
            "feedback": self.audit_path.with_name("feedback.jsonl").relative_to(workspace).as_posix(),
            "returncode": self.process.poll(),
            "argv": self.argv,
            "started": self.started,
        }


class ServeManager:
    def __init__(self, workspace: Path, *, api_keys_file: str | None):
        self.workspace = workspace.resolve()
        self.api_keys_file = str(Path(api_keys_file).resolve()) if api_keys_file else None
        self.served: dict[str, Served] = {}
        self._lock = threading.Lock()

    def start(self, run_dir: Path, host: str = "127.0.0.1") -> Served:
        """Serve a completed run; one server per run at a time."""
        studio_auth(host, self.api_keys_file)  # ConfigError for a non-loopback host without API keys
        current = self.for_run(run_dir)
        if current is not None:
            raise ConfigError(
                f"{run_dir.relative_to(self.workspace)} is already served at {current.url} ({current.state})"
            )
        port = free_port()
        rel = run_dir.relative_to(self.workspace).as_posix()
        audit = self.workspace / ".studio" / "feedback" / rel.replace("/", "--") / "audit.jsonl"
        audit.parent.mkdir(parents=True, exist_ok=True)
        args = ["serve", rel, f"serve.audit.path={audit}", "serve.audit.log_text=true"]
        args += ["--host", host, "--port", str(port)]
        if self.api_keys_file:
            args += ["--api-keys-file", self.api_keys_file]
        sid = f"{datetime.now():%Y%m%d-%H%M%S}-{run_dir.name}"
        log_dir = self.workspace / ".studio" / "serve" / sid
        log_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "llamaforge.cli", *args]
        with open(log_dir / "log.txt", "w", encoding="utf-8") as log:
            log.write("$ llamaforge " + " ".join(args) + "\n")
            log.flush()
            process = subprocess.Popen(
                argv,
                cwd=self.workspace,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_child_env(),
                start_new_session=True,
            )
        served = Served(sid, run_dir, host, port, log_dir / "log.txt", argv, process, audit)
        with self._lock:
            self.served[sid] = served
        return served

    async def refresh(self, served: Served) -> Served:
        """Ask the server's /health whether the model has loaded (and which names it serves)."""
        import httpx

        if not served.running:
            served.ready = False
            return served
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                r = await client.get(f"http://127.0.0.1:{served.port}/health", headers=self._auth_header())
            if r.status_code == 200:
                served.ready, served.models = True, list(r.json().get("models") or [])
        except httpx.HTTPError:
            pass  # still starting: the port is not open yet
        return served

    def _auth_header(self) -> dict[str, str]:
        from llamaforge.serve.auth import load_keys

        keys = load_keys(self.api_keys_file, "LLAMAFORGE_API_KEYS")
        key = next(iter(keys), None) if keys else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def get(self, sid: str) -> Served | None:
        with self._lock:
            return self.served.get(sid)

    def all(self) -> list[Served]:
        with self._lock:
            return list(self.served.values())

    def for_run(self, run_dir: Path) -> Served | None:
        return next((s for s in self.all() if s.run_dir == run_dir and s.running), None)

    def stop(self, served: Served, wait: float = 30) -> None:
        """SIGTERM to the server's process group (uvicorn shuts down cleanly), SIGKILL after `wait` s."""
        served.stop_requested = True
        if not served.running:
            return
        os.killpg(served.process.pid, signal.SIGTERM)
        try:
            served.process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            os.killpg(served.process.pid, signal.SIGKILL)
            served.process.wait()

    def shutdown(self) -> None:
        for served in self.all():
            self.stop(served)


def _refusal(raw_path: str, method: str, rest: str) -> str | None:
    """Why a proxied request is refused, or None: only the listed routes, spelled plainly."""
    if "%" in raw_path or "\\" in raw_path or any(seg in (".", "..") for seg in raw_path.split("/")):
        return "escaped characters and dot segments are not allowed in a proxied path"
    if (method, rest) not in PROXIED:
        allowed = ", ".join(f"{m} /{p}" for m, p in sorted(PROXIED, key=lambda r: r[1]))
        return f"{method} /{rest} is not proxied to a served run (only {allowed})"
    return None


async def _error(scope, receive, send, status: int, message: str, kind: str) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse({"error": {"message": message, "type": kind}}, status)(scope, receive, send)


class ServedRouter:
    """ASGI: /served/<id>/<rest> -> http://127.0.0.1:<port>/<rest> of a server this studio started,
    for the routes in PROXIED only, with the studio's key, streamed both ways."""

    def __init__(self, manager: ServeManager):
        self.manager = manager

    async def __call__(self, scope, receive, send) -> None:
        import httpx

        raw = scope.get("raw_path") or scope["path"].encode()
        raw_path = raw.decode("latin-1").split("?", 1)[0]
        parts = raw_path.split("/", 3)  # "", "served", id, rest (undecoded: %2F stays an escape)
        sid, rest = (parts[2] if len(parts) > 2 else ""), (parts[3] if len(parts) > 3 else "")
        served = self.manager.get(sid)
        if served is None or not served.running:
            message = (
                "no such server: start it from the run page" if served is None else "the server has exited"
            )
            await _error(scope, receive, send, 404, message, "not_found_error")
            return
        problem = _refusal(raw_path, scope["method"], rest)
        if problem:
            await _error(scope, receive, send, 403, problem, "permission_error")
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        url = f"http://127.0.0.1:{served.port}/{rest}"
        headers = [(k, v) for k, v in scope["headers"] if k.lower() in FORWARDED]
        headers += [(k.encode(), v.encode()) for k, v in self.manager._auth_header().items()]
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5)) as client:
            request = client.build_request(scope["method"], url, content=bytes(body), headers=headers)
            try:
                response = await client.send(request, stream=True)
            except httpx.ConnectError:
                await _error(scope, receive, send, 503, "the server is still starting", "unavailable")
                return
            try:
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_HEADERS],
                    }
                )
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                await response.aclose()
