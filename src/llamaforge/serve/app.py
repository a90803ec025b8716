"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions (streamed or not), models,
health, hot-swapped LoRA adapters (vLLM's endpoint names), Prometheus metrics.

Every failure a client can cause answers an OpenAI-style JSON error with a 4xx code; nothing a
request does can stop the server or touch another request. Host, key, rate and size checks run
before FastAPI reads a byte of the body (guard.py); bodies are validated at the edge
(protocol.py); the completion flow is in completion.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamaforge.errors import LlamaforgeError
from llamaforge.serve import canary, feedback
from llamaforge.serve.audit import AuditLog
from llamaforge.serve.auth import Auth, load_keys
from llamaforge.serve.completion import complete
from llamaforge.serve.config import ServeConfig
from llamaforge.serve.encoding import encode_chat, encode_text
from llamaforge.serve.engine import Engine, GenRequest
from llamaforge.serve.guard import Guard, caller_of
from llamaforge.serve.metrics import Metrics
from llamaforge.serve.moderation import Moderator
from llamaforge.serve.protocol import (
    APIError,
    ChatBody,
    CompletionBody,
    LoadAdapterBody,
    SamplingBody,
    UnloadAdapterBody,
    error_body,
    scrub_paths,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the app


class Server:
    """Everything one app needs: engine, auth, metrics, audit, moderation."""

    def __init__(self, cfg: ServeConfig, engine: Engine | None = None, metrics: Metrics | None = None):
        self.cfg = cfg
        self.metrics = metrics or (
            engine.metrics if engine and engine.metrics else Metrics(cfg.metrics_prefix)
        )
        self.engine = engine or Engine(cfg, self.metrics)
        self.engine.metrics = self.metrics
        self.auth = Auth(load_keys(cfg.api_keys_file, cfg.api_keys_env), cfg.host, cfg.rate_limit_per_minute)
        self.audit = AuditLog(cfg.audit)
        self.moderator = Moderator(cfg.moderation)
        self._background = ThreadPoolExecutor(1, thread_name_prefix="llamaforge-audit")  # keeps line order

    def record_later(self, fn, *args) -> None:
        """Blocking bookkeeping (an audit line) off the event loop, without waiting for it."""
        self._background.submit(_logged, fn, *args)

    def check_ready(self) -> None:
        if not self.engine.ready or not self.routes.restored.is_set():
            raise APIError(
                503,
                "The model is still loading"
                if not self.engine.load_error
                else f"The model failed to load: {self.engine.load_error}",
                type="server_error",
            )

    @property
    def max_prompt_chars(self) -> int:
        return self.cfg.max_prompt_chars or 16 * self.engine.max_model_len

    def check_prompt_size(self, chars: int, param: str) -> None:
        """Refuse a prompt that cannot fit before spending CPU on tokenizing it."""
        if chars > self.max_prompt_chars:
            raise APIError(
                400,
                f"The prompt has {chars} characters, over the limit of {self.max_prompt_chars} "
                "(serve.max_prompt_chars)",
                param=param,
                code="context_length_exceeded",
            )

    def prepare(self, body: SamplingBody, prompt_ids: list[int], model: str, tenant: str) -> GenRequest:
        engine = self.engine
        limit = engine.max_model_len
        if not prompt_ids:
            raise APIError(400, "The prompt is empty (no tokens)", param="prompt")
        wanted = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if len(prompt_ids) >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"has {len(prompt_ids)} tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        if wanted is not None and len(prompt_ids) + wanted > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt_ids) + wanted} tokens ({len(prompt_ids)} in the messages, {wanted} in "
                "the completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        max_tokens = wanted or min(self.cfg.default_max_tokens, limit - len(prompt_ids))
        template = engine.template_for(model)
        return GenRequest(
            prompt_ids=prompt_ids,
            adapter=None if model == engine.base_name else model,
            max_tokens=max_tokens,
            temperature=body.effective_temperature(self.cfg.default_temperature),
            top_p=body.top_p,
            seed=body.seed,
            stop=list(body.stop or []),
            stop_ids=frozenset(template.stop_token_ids),
            model_name=model,
            tenant=tenant,
        )

    def route(self, body: SamplingBody, caller) -> str:
        """The loaded model that answers: the canary table's choice for this caller, checked."""
        return self.resolve_model(self.routes.choose(body.model, f"{caller.name}\x00{body.user or ''}"))

    def resolve_model(self, name: str) -> str:
        if name not in self.engine.model_names():
            raise APIError(
                404,
                f"The model `{name}` does not exist. Loaded: {', '.join(self.engine.model_names())}",
                param="model",
                code="model_not_found",
            )
        return name


def create_app(cfg: ServeConfig, engine: Engine | None = None, *, load: bool = True) -> FastAPI:
    """The app. With `load`, the engine loads in a background thread at startup (/health says 503 until done)."""
    server = Server(cfg, engine)

    async def lifespan(app: FastAPI):
        if load and not server.engine.ready:
            threading.Thread(target=_load_quietly, args=(server,), daemon=True).start()
        elif server.engine.ready:
            canary.restore(server)
        yield

    app = FastAPI(title="llamaforge", lifespan=lifespan, default_response_class=SafeJSONResponse)
    app.state.server = server
    app.add_middleware(Guard, auth=server.auth, metrics=server.metrics, max_bytes=cfg.max_request_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        body = error_body(exc.message, exc.type, exc.param, exc.code)
        return SafeJSONResponse(body, exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        server.metrics.rejected.labels("invalid").inc()
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return SafeJSONResponse(
                error_body("The request body is not valid JSON", "invalid_request_error"), 400
            )
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        msg = "; ".join(_describe(e) for e in errors[:10])
        return SafeJSONResponse(error_body(msg, "invalid_request_error", loc[0] if loc else None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return SafeJSONResponse(error_body(str(exc.detail), kind), exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error")
        return SafeJSONResponse(error_body(f"Internal error: {type(exc).__name__}", "server_error"), 500)

    feedback.register(app, server)  # POST /v1/feedback
    canary.register(app, server)  # server.routes and /v1/routes

    @app.get("/health")
    async def health():
        if not server.engine.ready or not server.routes.restored.is_set():
            error = server.engine.load_error
            status = "loading" if not error else "failed"
            return SafeJSONResponse({"status": status, "error": error and scrub_paths(error)}, 503)
        return {"status": "ok", "models": server.engine.model_names()}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        server.check_ready()
        created, base = int(time.time()), server.engine.base_name

        def card(name: str, parent: str | None) -> dict:
            # `root` is the name too: the server's folders are nobody's business
            return {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "llamaforge",
                "root": name,
                "parent": parent,
            }

        return {
            "object": "list",
            "data": [card(base, None), *(card(a, base) for a in server.engine.adapters)],
        }

    def require_adapter_loading() -> None:
        server.check_ready()
        if not cfg.allow_adapter_loading:
            raise APIError(
                403,
                "Adapter loading is disabled (serve.allow_adapter_loading=false)",
                type="permission_error",
            )

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterBody):
        require_adapter_loading()
        try:
            await asyncio.to_thread(server.engine.load_adapter, body.lora_name, body.lora_path)
        except LlamaforgeError as exc:
            raise APIError(400, str(exc), param="lora_path") from None
        except Exception as exc:  # noqa: BLE001 - a broken adapter folder is the client's problem
            detail = f"{type(exc).__name__}: {exc}"
            raise APIError(400, f"could not load adapter: {detail[:600]}", param="lora_path") from None
        return {"status": "ok", "message": f"Success: LoRA adapter '{body.lora_name}' added successfully."}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterBody):
        require_adapter_loading()
        try:
            await asyncio.to_thread(server.engine.unload_adapter, body.lora_name)
        except KeyError:
            raise APIError(
                404,
                f"The LoRA adapter '{body.lora_name}' is not loaded",
                param="lora_name",
                code="model_not_found",
            ) from None
        return {"status": "ok", "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        from llamaforge.data.types import Message

        server.check_ready()
        caller = caller_of(request.scope)
        model = server.route(body, caller)
        messages = [Message(m.role, m.text()) for m in body.messages]
        server.check_prompt_size(sum(len(m.content) for m in messages), "messages")
        prompt_text = "\n".join(f"{m.role}: {m.content}" for m in messages)
        template = server.engine.template_for(model)
        encode = functools.partial(encode_chat, template, messages)
        return await complete(server, request, body, model, encode, prompt_text, caller, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        server.check_ready()
        caller = caller_of(request.scope)
        model = server.route(body, caller)
        server.check_prompt_size(len(body.prompt), "prompt")
        encode = functools.partial(encode_text, server.engine.tokenizer, body.prompt)
        return await complete(server, request, body, model, encode, body.prompt, caller, chat=False)

    return app


class SafeJSONResponse(JSONResponse):
    """JSON that never fails to encode (non-ASCII escaped), whatever text ends up in it."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _describe(error: dict) -> str:
    """One validation error as `field: what is wrong`, never echoing the value sent."""
    where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
    if error.get("type") == "extra_forbidden":
        return f"{where}: unsupported field (not part of this API)"
    return f"{where}: {str(error.get('msg', 'invalid')).removeprefix('Value error, ')}"


def _logged(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - bookkeeping must not kill its thread
        log.exception("audit record failed")


def _load_quietly(server: Server) -> None:
    try:
        server.engine.load()
    except Exception:  # noqa: BLE001 - reported by /health
        log.exception("model loading failed")
        return
    canary.restore(server)  # the routes of the last run, once their adapters can load again
