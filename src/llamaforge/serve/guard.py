"""Checks that run before any work a request asks for: Host (DNS rebinding), API key, rate limit and
body size, in that order, as one ASGI middleware.

Running them ahead of FastAPI means an unauthenticated client learns nothing about the body schema
(401 before any 400), a body over `serve.max_request_bytes` is refused with 413 from its
Content-Length or as soon as the bytes read pass the bound (never parsed), and `/docs` and
`/openapi.json` need a key like every other route. Only `/health` and `/metrics` are open (probes
and scrapers carry no key). Loading and unloading adapters takes an admin key (403 otherwise).
"""

from __future__ import annotations

import json

from llamaforge.serve.auth import Auth, Caller
from llamaforge.serve.metrics import Metrics
from llamaforge.serve.protocol import error_body

OPEN_PATHS = frozenset({"/health", "/metrics"})
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


def caller_of(scope) -> Caller:
    """The caller the guard identified for this request."""
    return scope["state"]["caller"]


class Guard:
    def __init__(self, app, auth: Auth, metrics: Metrics, max_bytes: int):
        self.app, self.auth, self.metrics, self.max_bytes = app, auth, metrics, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self.auth.host_allowed(headers.get("host")):
            self.metrics.rejected.labels("bad_host").inc()
            return await _answer(
                send,
                403,
                "This server has no API keys and answers only loopback host names; the Host header names "
                "another host (set API keys to serve other names)",
                "permission_error",
            )
        if scope["path"] not in OPEN_PATHS:
            caller = self.auth.identify(headers.get("authorization"))
            if caller is None:
                self.metrics.rejected.labels("unauthorized").inc()
                return await _answer(
                    send,
                    401,
                    "Invalid or missing API key: send `Authorization: Bearer <key>`",
                    "authentication_error",
                    code="invalid_api_key",
                )
            if self.auth.limiter is not None and (wait := self.auth.limiter.take(caller.name)) > 0:
                self.metrics.rejected.labels("rate_limited").inc()
                return await _answer(
                    send,
                    429,
                    f"Rate limit reached for this key; retry in {wait:.1f} s",
                    "rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"retry-after": str(max(1, round(wait + 0.5)))},
                )
            if scope["path"] in ADMIN_PATHS and not caller.admin:
                self.metrics.rejected.labels("forbidden").inc()
                return await _answer(
                    send,
                    403,
                    "This API key may not load or unload adapters: that takes an admin key "
                    "(`name:key:admin` in the keys file)",
                    "permission_error",
                )
            scope.setdefault("state", {})["caller"] = caller
        length = headers.get("content-length", "")
        if length and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._too_large(send)
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await self._read(receive)
            if body is None:
                return await self._too_large(send)
            receive = _replay(body, receive)
        return await self.app(scope, receive, send)

    async def _read(self, receive) -> bytes | None:
        """The whole body, or None once it passes the bound (the rest is never read)."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(parts)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _too_large(self, send):
        self.metrics.rejected.labels("too_large").inc()
        return await _answer(
            send,
            413,
            f"The request body is larger than {self.max_bytes} bytes (serve.max_request_bytes)",
            "invalid_request_error",
            code="request_too_large",
        )


def _replay(body: bytes, receive):
    """The body already read, then the real channel (so a later disconnect is still seen)."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


async def _answer(send, status: int, message: str, kind: str, code: str | None = None, headers=None) -> None:
    payload = json.dumps(error_body(message, kind, None, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    if status == 413:
        raw.append((b"connection", b"close"))  # the unread body stays unread
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
