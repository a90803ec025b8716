"""The gateway's engine when a real engine server (llama-server, vLLM) does the decoding.

It stands where serve/engine.py's in-process Engine stands (the same attributes and methods app.py
and completion.py use), so keys, limits, audit, moderation and metrics stay in the gateway. The
gateway tokenizes with the run's template and sends token ids; the engine's tokens come back and
the gateway applies stop tokens and stop strings and streams the text, as the in-process engine does.

Requests wait in the gateway (bounded by serve.max_queue) while the engine process is down or being
restarted; a request the engine was answering when it died ends with a 503 error, never a hang.
Adapter loads are confined and checked here before the engine sees a path. The backend (llamacpp.py,
vllm.py) says how to start the engine, build its requests and read its answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import Protocol

import httpx

from llamaforge.errors import ConfigError
from llamaforge.serve.adapters import Adapter, check_adapter_path, check_lora_config, lora_config
from llamaforge.serve.config import ServeConfig
from llamaforge.serve.engine_process import EngineProcess
from llamaforge.serve.requests import (
    GenRequest,
    QueueFull,
    cut_at_stop_string,
    display_name,
    observe_token,
    take_streamable,
)

log = logging.getLogger(__name__)


class EngineUnavailable(str):
    """An error event text that answers 503 (the engine process died or did not come back in time)."""

    status = 503


class Backend(Protocol):
    name: str

    def start(self, engine: RemoteEngine) -> EngineProcess: ...
    def request(self, engine: RemoteEngine, req: GenRequest) -> tuple[str, dict]: ...
    def read(self, engine: RemoteEngine, req: GenRequest, chunk: dict) -> bool: ...
    def add_adapter(self, engine: RemoteEngine, adapter: Adapter) -> None: ...
    def remove_adapter(self, engine: RemoteEngine, name: str) -> None: ...
    def rename_metrics(self, text: str) -> str: ...


class RemoteEngine:
    def __init__(self, cfg: ServeConfig, backend: Backend, metrics=None):
        self.cfg, self.backend, self.metrics = cfg, backend, metrics
        self.tokenizer = self.template = None
        self.base_name = cfg.served_model_name or display_name(cfg.model)
        self.base_dir: Path | None = None  # the base model's folder (what the engine loads)
        self.startup: dict[str, str] = {}
        self.adapters: dict[str, Adapter] = {}
        self.ready = False
        self.load_error: str | None = None
        self.max_model_len = cfg.max_model_len or 2048
        self.process: EngineProcess | None = None
        self._lock = threading.Lock()
        self._swap = threading.Lock()  # one adapter load/unload at a time
        self._waiting = self._running = 0
        self._draining = False
        self._clients: dict[int, httpx.AsyncClient] = {}
        self._tasks: set[asyncio.Task] = set()
        self._engine_metrics = b""
        self._meta_base = None
        self._stopped = False

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        """Resolve the run, load the tokenizer and template, start the engine process; then ready."""
        from llamaforge.models import load_tokenizer, local_path
        from llamaforge.runs import Run, is_run_dir
        from llamaforge.templates import get_template, load_template

        try:
            source, self.startup, weights = self.cfg.model, dict(self.cfg.adapters), None
            if is_run_dir(source):
                run = Run.open(source)
                if run.is_adapter:
                    self.startup.setdefault(run.dir.resolve().name, str(run.weights_dir))
                    source = run.base_model
                    shown = display_name(source)
                else:
                    source = weights = str(run.weights_dir)
                    shown = run.dir.resolve().name
                if not self.cfg.served_model_name:
                    self.base_name = shown
            self.base_dir = Path(local_path(source))
            if not self.base_dir.is_dir():
                raise ConfigError(f"{source}: the {self.backend.name} engine needs a local model folder")
            self.tokenizer = load_tokenizer(str(self.base_dir))
            self.template = get_template(self.cfg.template, self.tokenizer)
            if weights:
                self.template = load_template(Path(weights), self.tokenizer)
            config = json.loads((self.base_dir / "config.json").read_text())
            limit = int(config.get("max_position_embeddings") or 2048)
            self.max_model_len = min(self.cfg.max_model_len or limit, limit)
            if len(self.startup) > self.cfg.max_adapters:
                raise ConfigError(
                    f"{len(self.startup)} adapters to load at start, over serve.max_adapters={self.cfg.max_adapters}"
                )
            for name, path in self.startup.items():
                self.adapters[name] = self.check_adapter(name, path, check_dirs=False)
            self.process = self.backend.start(self)
            if self.metrics:
                self.metrics.adapters_loaded.set(len(self.adapters))
                self.metrics.engine_exposition = lambda: self._engine_metrics
            threading.Thread(target=self._scrape, name="engine-metrics", daemon=True).start()
            self.ready = True
            log.info(
                "serving %s on %s with adapters: %s",
                self.base_name,
                self.backend.name,
                ", ".join(self.adapters) or "none",
            )
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            raise

    def shutdown(self) -> None:
        self._stopped = True
        if self.process is not None:
            self.process.stop()

    # ------------------------------------------------------------------ adapters
    def check_adapter(self, name: str, path: str, *, check_dirs: bool = True) -> Adapter:
        """Confined to serve.adapter_dirs, a LoRA config that fits the base (rank, target modules)."""
        from llamaforge.templates import load_template

        if name == self.base_name or name in self.adapters:
            raise ConfigError(f"a model named '{name}' is already loaded")
        real = check_adapter_path(path, self.cfg.adapter_dirs, check_dirs=check_dirs)
        config = lora_config(real, path)
        check_lora_config(config, path, self._meta_model(), self.cfg.max_lora_rank)
        template = (
            load_template(real, self.tokenizer)
            if (real / "llamaforge_template.json").is_file()
            else self.template
        )
        return Adapter(name, str(real), template, int(config.get("r", 8)), bool(config.get("use_dora")))

    def _meta_model(self):
        """The base's module tree without weights (for the target-module check)."""
        if self._meta_base is None:
            from accelerate import init_empty_weights
            from transformers import AutoConfig, AutoModelForCausalLM

            with init_empty_weights():
                self._meta_base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.base_dir))
        return self._meta_base

    def load_adapter(self, name: str, path: str) -> Adapter:
        with self._swap:
            if len(self.adapters) >= self.cfg.max_adapters:
                raise ConfigError(
                    f"{len(self.adapters)} adapters are loaded, the most serve.max_adapters allows: unload one first"
                )
            adapter = self.check_adapter(name, path)
            self.backend.add_adapter(self, adapter)  # on failure the engine serves what it served before
            self.adapters[name] = adapter
        if self.metrics:
            self.metrics.adapters_loaded.set(len(self.adapters))
        return adapter

    def unload_adapter(self, name: str) -> None:
        with self._swap:
            if name not in self.adapters:
                raise KeyError(name)
            self.backend.remove_adapter(self, name)
            del self.adapters[name]
        if self.metrics:
            self.metrics.adapters_loaded.set(len(self.adapters))

    def drained(self, action) -> None:
        """Run `action` with no request at the engine: new ones wait in the gateway, running ones finish."""
        with self._lock:
            self._draining = True
        try:
            while True:
                with self._lock:
                    if self._running == 0:
                        break
                time.sleep(0.02)
            action()
        finally:
            with self._lock:
                self._draining = False

    def template_for(self, model_name: str):
        return self.adapters[model_name].template if model_name in self.adapters else self.template

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    # ------------------------------------------------------------------ requests
    @property
    def num_waiting(self) -> int:
        return self._waiting

    def submit(self, req: GenRequest) -> GenRequest:
        req.loop = asyncio.get_running_loop()
        req.events = asyncio.Queue()
        with self._lock:
            if self._waiting >= self.cfg.max_queue:
                raise QueueFull()
            self._waiting += 1
            self._gauges()
        task = req.loop.create_task(self._serve(req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return req

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.set_queue(self._running, self._waiting)

    async def _serve(self, req: GenRequest) -> None:
        if not await self._admit(req):
            return
        try:
            await self._generate(req)
        except Exception as exc:  # noqa: BLE001 - the request ends with an error, the gateway goes on
            if isinstance(exc, (httpx.HTTPError, OSError)):
                self.fail(
                    req, EngineUnavailable(f"the {self.backend.name} engine went away: {type(exc).__name__}")
                )
            else:
                log.exception("request %s failed", req.id)
                self.fail(req, f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._running -= 1
                self._gauges()

    async def _admit(self, req: GenRequest) -> bool:
        """Wait until the engine is up and not draining, then count the request as running; False when it
        was cancelled or answered with an error instead (engine gone for good, or not back in time)."""
        deadline = time.monotonic() + self.cfg.engine_wait_s
        try:
            while True:
                if req.cancelled:
                    self.finish(req, "cancelled")
                    return False
                process = self.process
                if process is not None and process.error:
                    self.fail(req, EngineUnavailable(process.error))
                    return False
                with self._lock:
                    # `alive()` too: a process that just died is still "up" until the watcher notices
                    up = process is not None and process.up.is_set() and process.alive()
                    if up and not self._draining:
                        self._running += 1  # under the lock that `drained` counts with
                        return True
                if time.monotonic() > deadline:
                    self.fail(
                        req,
                        EngineUnavailable(f"the {self.backend.name} engine is not available; retry later"),
                    )
                    return False
                await asyncio.sleep(0.02)
        finally:
            with self._lock:
                self._waiting -= 1
                self._gauges()

    def _client(self) -> httpx.AsyncClient:
        loop = id(asyncio.get_running_loop())
        if loop not in self._clients:
            limits = httpx.Limits(max_connections=self.cfg.max_queue + 16, max_keepalive_connections=32)
            self._clients[loop] = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits)
        return self._clients[loop]

    async def _generate(self, req: GenRequest) -> None:
        if req.adapter is not None and req.adapter not in self.adapters:
            self.fail(req, f"the adapter '{req.adapter}' was unloaded")
            return
        req.started = time.monotonic()
        if self.metrics:
            self.metrics.queue_time.labels(req.model_name).observe(req.started - req.arrival)
        path, body = self.backend.request(self, req)
        process = self.process
        async with self._client().stream(
            "POST", process.base_url + path, json=body, headers=process.headers
        ) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:500]
                if resp.status_code >= 500:
                    self.fail(req, EngineUnavailable(f"engine error {resp.status_code}: {detail}"))
                else:
                    self.fail(req, f"engine refused the request ({resp.status_code}): {detail}")
                return
            async for line in resp.aiter_lines():
                if req.cancelled:
                    self.finish(req, "cancelled")
                    return
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if self.backend.read(self, req, json.loads(line[6:])):
                    return
        if req.finish_reason is None:  # the stream ended without a last chunk: the engine died
            self.fail(req, EngineUnavailable(f"the {self.backend.name} engine stopped mid-answer"))

    # ------------------------------------------------------------------ answers
    def emit(self, req: GenRequest, event: tuple) -> None:
        req.events.put_nowait(event)  # on the request's own loop: _serve runs there

    def fail(self, req: GenRequest, message: str) -> None:
        if req.finish_reason is None:
            req.finish_reason = "error"
            self.emit(req, ("error", message))

    def finish(self, req: GenRequest, reason: str) -> None:
        if req.finish_reason is None:
            self.flush(req, final=True)
            req.finish_reason = reason
            self.emit(req, ("done", reason))

    def accept_tokens(self, req: GenRequest, tokens: list[int]) -> bool:
        """Record the engine's tokens with the gateway's stop tokens and strings; True when done."""
        for token in tokens:
            observe_token(req, self.metrics)
            if token in req.stop_ids:
                self.finish(req, "stop")
                return True
            req.token_ids.append(token)
        if not tokens:
            return False
        req.text = self.tokenizer.decode(req.token_ids, skip_special_tokens=True)
        return self._check_text(req)

    def accept_text(self, req: GenRequest, delta: str, token_ids: list[int]) -> bool:
        """For engines that answer text (vLLM): it applied the stop tokens; the stop strings are checked here."""
        if delta or token_ids:
            observe_token(req, self.metrics)
        req.token_ids.extend(token_ids)
        req.text += delta
        return self._check_text(req)

    def _check_text(self, req: GenRequest) -> bool:
        if cut_at_stop_string(req):
            self.finish(req, "stop")
            return True
        if len(req.token_ids) >= req.max_tokens:
            self.finish(req, "length")
            return True
        self.flush(req, final=False)
        return False

    def flush(self, req: GenRequest, *, final: bool) -> None:
        delta = take_streamable(req, final=final)
        if delta:
            self.emit(req, ("text", delta))

    # ------------------------------------------------------------------ engine metrics
    def _scrape(self) -> None:
        """Keep a copy of the engine's Prometheus metrics (renamed apart from ours) for /metrics."""
        with httpx.Client(timeout=2.0) as client:
            while not self._stopped and self.process is not None and not self.process.error:
                process = self.process
                if process.up.is_set():
                    try:
                        resp = client.get(process.base_url + "/metrics", headers=process.headers)
                        if resp.status_code == 200:
                            self._engine_metrics = self.backend.rename_metrics(resp.text).encode()
                    except httpx.HTTPError:
                        pass
                time.sleep(1.0)
