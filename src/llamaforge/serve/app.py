"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions (streamed or not), models,
health, hot-swapped LoRA adapters (vLLM's endpoint names), Prometheus metrics.

Every failure a client can cause answers an OpenAI-style JSON error with a 4xx code; nothing a
request does can stop the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamaforge.errors import LlamaforgeError
from llamaforge.serve.audit import AuditLog
from llamaforge.serve.auth import Auth, load_keys
from llamaforge.serve.config import ServeConfig
from llamaforge.serve.engine import Engine, GenRequest, QueueFull
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

    def authorize(self, request: Request) -> str:
        key_id = self.auth.identify(request.headers.get("authorization"))
        if key_id is None:
            self.metrics.rejected.labels("unauthorized").inc()
            raise APIError(
                401,
                "Invalid or missing API key: send `Authorization: Bearer <key>`",
                type="authentication_error",
                code="invalid_api_key",
            )
        if self.auth.limiter is not None:
            wait = self.auth.limiter.take(key_id)
            if wait > 0:
                self.metrics.rejected.labels("rate_limited").inc()
                raise APIError(
                    429,
                    f"Rate limit reached for this key; retry in {wait:.1f} s",
                    type="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(max(1, round(wait + 0.5)))},
                )
        return key_id

    def check_ready(self) -> None:
        if not self.engine.ready:
            raise APIError(
                503,
                "The model is still loading"
                if not self.engine.load_error
                else f"The model failed to load: {self.engine.load_error}",
                type="server_error",
            )

    def prepare(self, body: SamplingBody, prompt_ids: list[int], model: str) -> GenRequest:
        engine = self.engine
        limit = engine.max_model_len
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
        temperature = self.cfg.default_temperature if body.temperature is None else body.temperature
        return GenRequest(
            prompt_ids=prompt_ids,
            adapter=None if model == engine.base_name else model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=list(body.stop or []),
            stop_ids=frozenset(template.stop_token_ids),
            model_name=model,
        )

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
            threading.Thread(target=_load_quietly, args=(server.engine,), daemon=True).start()
        yield

    app = FastAPI(title="llamaforge", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(
            error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        server.metrics.rejected.labels("invalid").inc()
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(
                error_body("The request body is not valid JSON", "invalid_request_error"), 400
            )
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in errors)
        return JSONResponse(error_body(msg, "invalid_request_error", ".".join(loc) or None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"Internal error: {type(exc).__name__}", "server_error"), 500)

    @app.get("/health")
    async def health():
        if not server.engine.ready:
            return JSONResponse(
                {
                    "status": "loading" if not server.engine.load_error else "failed",
                    "error": server.engine.load_error,
                },
                503,
            )
        return {"status": "ok", "models": server.engine.model_names()}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        server.check_ready()
        created = int(time.time())
        data = [
            {
                "id": server.engine.base_name,
                "object": "model",
                "created": created,
                "owned_by": "llamaforge",
                "root": server.engine.base_name,
                "parent": None,
            }
        ]
        data += [
            {
                "id": a.name,
                "object": "model",
                "created": created,
                "owned_by": "llamaforge",
                "root": a.path,
                "parent": server.engine.base_name,
            }
            for a in server.engine.adapters.values()
        ]
        return {"object": "list", "data": data}

    def require_adapter_loading(request: Request) -> None:
        server.authorize(request)
        server.check_ready()
        if not cfg.allow_adapter_loading:
            raise APIError(
                403,
                "Adapter loading is disabled (serve.allow_adapter_loading=false)",
                type="permission_error",
            )

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterBody, request: Request):
        require_adapter_loading(request)
        try:
            await asyncio.to_thread(server.engine.load_adapter, body.lora_name, body.lora_path)
        except LlamaforgeError as exc:
            raise APIError(400, str(exc), param="lora_path") from None
        except Exception as exc:  # noqa: BLE001 - a broken adapter folder is the client's problem
            raise APIError(
                400, f"could not load adapter: {type(exc).__name__}: {exc}", param="lora_path"
            ) from None
        return {"status": "ok", "message": f"Success: LoRA adapter '{body.lora_name}' added successfully."}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterBody, request: Request):
        require_adapter_loading(request)
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

        key_id = server.authorize(request)
        server.check_ready()
        model = server.resolve_model(body.model)
        messages = [Message(m.role, m.text()) for m in body.messages]
        prompt_text = "\n".join(f"{m.role}: {m.content}" for m in messages)
        template = server.engine.template_for(model)
        try:
            prompt_ids = template.encode_prompt(messages)
        except Exception as exc:  # noqa: BLE001 - e.g. a template that refuses this role order
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
        return await _complete(server, request, body, model, prompt_ids, prompt_text, key_id, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        key_id = server.authorize(request)
        server.check_ready()
        model = server.resolve_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "send one prompt per request", param="prompt")
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompt_ids = server.engine.tokenizer(prompts[0], add_special_tokens=True)["input_ids"]
        return await _complete(server, request, body, model, prompt_ids, prompts[0], key_id, chat=False)

    return app


def _load_quietly(engine: Engine) -> None:
    try:
        engine.load()
    except Exception:  # noqa: BLE001 - reported by /health
        log.exception("model loading failed")


# ------------------------------------------------------------------ completion flow


async def _complete(
    server: Server,
    request: Request,
    body: SamplingBody,
    model: str,
    prompt_ids: list[int],
    prompt_text: str,
    key_id: str,
    *,
    chat: bool,
):
    reason = await server.moderator.check(prompt_text) if server.moderator.active else None
    created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if reason:
        server.metrics.moderation.labels(model, "input").inc()
        server.audit.record(
            id=rid,
            key_id=key_id,
            model=model,
            prompt=prompt_text,
            response=None,
            blocked=reason,
            finish_reason="content_filter",
            prompt_tokens=len(prompt_ids),
            completion_tokens=0,
        )
        raise APIError(
            400,
            f"{server.cfg.moderation.refusal} (refused by moderation: {reason})",
            code="content_policy_violation",
        )
    req = server.prepare(body, prompt_ids, model)
    try:
        server.engine.submit(req)
    except QueueFull:
        server.metrics.rejected.labels("queue_full").inc()
        retry = max(1, round(server.engine.num_waiting / max(1, server.cfg.max_batch_size)))
        raise APIError(
            429,
            "The server is busy: too many requests waiting. Retry later.",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(retry)},
        ) from None
    meta = dict(id=rid, created=created, model=model, chat=chat, key_id=key_id, prompt_text=prompt_text)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _stream(server, request, req, meta, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    text, finish = await _collect(request, req)
    if finish == "error":
        raise APIError(500, f"generation failed: {text}", type="server_error")
    blocked = None
    if server.cfg.moderation.check_output and server.moderator.active:
        blocked = await server.moderator.check(req.text)
        if blocked:
            server.metrics.moderation.labels(model, "output").inc()
            text, finish = server.cfg.moderation.refusal, "content_filter"
    usage = _usage(req)
    _finished(server, req, meta, finish, blocked)
    obj = "chat.completion" if chat else "text_completion"
    choice = (
        {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
        if chat
        else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    )
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage}


def _usage(req: GenRequest) -> dict:
    return {
        "prompt_tokens": len(req.prompt_ids),
        "completion_tokens": len(req.token_ids),
        "total_tokens": len(req.prompt_ids) + len(req.token_ids),
        # OpenAI's (and vLLM's) field for prompt tokens served from the prefix cache
        "prompt_tokens_details": {"cached_tokens": req.cached_tokens},
    }


def _finished(server: Server, req: GenRequest, meta: dict, finish: str, blocked: str | None) -> None:
    seconds = time.monotonic() - req.arrival
    if finish != "cancelled":
        server.metrics.finished(req.model_name, finish, len(req.prompt_ids), len(req.token_ids), seconds)
    server.audit.record(
        id=meta["id"],
        key_id=meta["key_id"],
        model=req.model_name,
        prompt=meta["prompt_text"],
        response=req.text,
        prompt_tokens=len(req.prompt_ids),
        completion_tokens=len(req.token_ids),
        latency_s=round(seconds, 4),
        ttft_s=round(req.first_token - req.arrival, 4) if req.first_token else None,
        finish_reason=finish,
        blocked=blocked,
        stream=meta.get("stream", False),
    )


async def _collect(request: Request, req: GenRequest) -> tuple[str, str]:
    """Wait for the whole answer; a client that hangs up cancels its generation."""
    parts = []
    while True:
        try:
            kind, value = await asyncio.wait_for(req.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                req.cancelled = True
                return "".join(parts), "cancelled"
            continue
        if kind == "text":
            parts.append(value)
        elif kind == "error":
            return value, "error"
        else:
            return req.text, value


async def _stream(server: Server, request: Request, req: GenRequest, meta: dict, include_usage: bool):
    chat, model = meta["chat"], meta["model"]
    meta["stream"] = True
    obj = "chat.completion.chunk" if chat else "text_completion"
    moderate = server.cfg.moderation.check_output and server.moderator.pattern is not None

    def chunk(delta_text: str | None, finish: str | None = None, role: bool = False) -> str:
        if chat:
            delta = (
                {"role": "assistant", "content": ""}
                if role
                else ({"content": delta_text} if delta_text else {})
            )
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
        payload = {
            "id": meta["id"],
            "object": obj,
            "created": meta["created"],
            "model": model,
            "choices": [choice],
        }
        if include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n"

    finish, blocked = None, None
    try:
        if chat:
            yield chunk(None, role=True)
        sent = ""
        while finish is None:
            kind, value = await req.events.get()
            if kind == "text":
                if moderate and (blocked := server.moderator.blocklisted(sent + value)):
                    req.cancelled = True  # output moderation: stop here, nothing more leaves the server
                    server.metrics.moderation.labels(model, "output").inc()
                    finish = "content_filter"
                    break
                sent += value
                yield chunk(value)
            elif kind == "error":
                finish = "error"
                yield f"data: {json.dumps(error_body(f'generation failed: {value}', 'server_error'))}\n\n"
            else:
                finish = value
        if finish != "error":
            yield chunk(None, finish=finish)
        if include_usage:
            usage = {
                "id": meta["id"],
                "object": obj,
                "created": meta["created"],
                "model": model,
                "choices": [],
                "usage": _usage(req),
            }
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if finish is None:  # the client went away mid-stream: stop generating for it
            req.cancelled = True
            finish = "cancelled"
        _finished(server, req, meta, finish, blocked)
