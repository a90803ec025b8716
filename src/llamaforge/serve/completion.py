"""One completion, from a validated body to the answer: bounds, tokenization and moderation off the
event loop, queueing, then the answer collected or streamed, moderated, audited.

CPU work that grows with the prompt (tokenizing, the blocklist, PII redaction for the audit line)
runs in worker threads, so a huge prompt never keeps `/health` or other clients waiting. A client
that hangs up, streaming or not, cancels its generation at once (a watcher waits for the
disconnect; polling between tokens would never see it while tokens keep coming).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import StreamingResponse

from llamaforge.serve.moderation import OutputWindow
from llamaforge.serve.protocol import APIError, SamplingBody, error_body
from llamaforge.serve.requests import GenRequest, QueueFull


async def complete(
    server,
    request: Request,
    body: SamplingBody,
    model: str,
    encode: Callable[[], list[int]],
    prompt_text: str,
    caller,
    *,
    chat: bool,
):
    """Moderate, tokenize (`encode`, in a thread), queue and answer one request (a dict, or a
    StreamingResponse when streaming). Moderation comes first: a refused prompt is never tokenized."""
    created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    reason = await server.moderator.check(prompt_text) if server.moderator.active else None
    if reason:
        server.metrics.moderation.labels(model, "input").inc()
        await asyncio.to_thread(
            server.audit.record,
            id=rid,
            key_id=caller.name,
            model=model,
            prompt=prompt_text,
            response=None,
            blocked=reason,
            finish_reason="content_filter",
            prompt_chars=len(prompt_text),
            completion_tokens=0,
        )
        raise APIError(
            400,
            f"{server.cfg.moderation.refusal} (refused by moderation: {reason})",
            code="content_policy_violation",
        )
    try:
        prompt_ids = await asyncio.to_thread(encode)
    except Exception as exc:  # noqa: BLE001 - e.g. a chat template that refuses this role order
        raise APIError(
            400, f"cannot tokenize the prompt: {exc}", param="messages" if chat else "prompt"
        ) from None
    req = server.prepare(body, prompt_ids, model, caller.name)
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
    meta = dict(id=rid, created=created, model=model, chat=chat, key_id=caller.name, prompt_text=prompt_text)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(server, req, meta, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    text, finish = await _collect(request, req)
    if finish == "cancelled":
        await asyncio.to_thread(_finished, server, req, meta, finish, None)
        return None  # nobody is listening
    if finish == "error":
        await asyncio.to_thread(_finished, server, req, meta, finish, None)
        # 503 when the engine process went away (gateway_engine.EngineUnavailable): worth a retry
        raise APIError(getattr(text, "status", 500), f"generation failed: {text}", type="server_error")
    blocked = None
    moderate = server.cfg.moderation.check_output and server.moderator.active
    if moderate and (blocked := await server.moderator.check(req.text)):
        server.metrics.moderation.labels(model, "output").inc()
        text, finish = server.cfg.moderation.refusal, "content_filter"
    await asyncio.to_thread(_finished, server, req, meta, finish, blocked)
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
    obj = "chat.completion" if chat else "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(req),
    }


def usage(req: GenRequest) -> dict:
    return {
        "prompt_tokens": len(req.prompt_ids),
        "completion_tokens": len(req.token_ids),
        "total_tokens": len(req.prompt_ids) + len(req.token_ids),
        # OpenAI's (and vLLM's) field for prompt tokens served from the prefix cache (this tenant's only)
        "prompt_tokens_details": {"cached_tokens": req.cached_tokens},
    }


def _finished(server, req: GenRequest, meta: dict, finish: str, blocked: str | None) -> None:
    """Metrics and the audit line (blocking: redaction and file writes; run it in a thread)."""
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


async def _watch_disconnect(request: Request, req: GenRequest) -> None:
    """Wait for the client to hang up, then cancel its generation."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            req.cancelled = True
            return


async def _collect(request: Request, req: GenRequest) -> tuple[str, str]:
    """Wait for the whole answer; a client that hangs up cancels its generation."""
    watcher = asyncio.create_task(_watch_disconnect(request, req))
    parts = []
    try:
        while True:
            events = asyncio.ensure_future(req.events.get())
            done, _ = await asyncio.wait({events, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if events not in done:
                events.cancel()
                return "".join(parts), "cancelled"
            kind, value = events.result()
            if kind == "text":
                parts.append(value)
            elif kind == "error":
                return value, "error"
            else:
                return req.text, value
    finally:
        watcher.cancel()


async def _stream(server, req: GenRequest, meta: dict, include_usage: bool):
    chat, model = meta["chat"], meta["model"]
    meta["stream"] = True
    obj = "chat.completion.chunk" if chat else "text_completion"
    moderate = server.cfg.moderation.check_output and server.moderator.active
    window = OutputWindow(server.moderator) if moderate else None

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
        while finish is None:
            kind, value = await req.events.get()
            if kind == "text":
                if window is not None:
                    value, blocked = await window.push(value)
                if blocked:
                    break
                if value:
                    yield chunk(value)
            elif kind == "error":
                finish = "error"
                yield f"data: {json.dumps(error_body(f'generation failed: {value}', 'server_error'))}\n\n"
            else:
                finish = value
                if window is not None:
                    rest, blocked = await window.finish()
                    if rest and not blocked:
                        yield chunk(rest)
        if blocked:  # output moderation: stop here, nothing more leaves the server
            req.cancelled = True
            server.metrics.moderation.labels(model, "output").inc()
            finish = "content_filter"
        if finish != "error":
            yield chunk(None, finish=finish)
        if include_usage:
            payload = {
                "id": meta["id"],
                "object": obj,
                "created": meta["created"],
                "model": model,
                "choices": [],
            }
            yield f"data: {json.dumps({**payload, 'usage': usage(req)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if finish is None:  # the client went away mid-stream: stop generating for it
            req.cancelled = True
            finish = "cancelled"
        # no awaiting here (the stream may be closing on a cancelled task): the audit line goes to a thread
        server.record_later(_finished, server, req, meta, finish, blocked)
