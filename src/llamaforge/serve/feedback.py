"""`POST /v1/feedback`: a caller rates an answer it got (up / down / 1-5), optionally with a better
answer (`correction`) and a comment; the rating is joined to the answer's audit record and appended
to `feedback.jsonl` beside the audit log, the log that `format: feedback` turns into training data.

- Ownership: the audit record of every answer carries `owner`, an HMAC of the caller's key name under
  a per-server secret (`.feedback-secret` beside the log, 0600), never the key. Only the same owner
  may rate an answer; any other caller is told the id is unknown (404), so ids leak nothing.
- The join: the answer (prompt, response, model or adapter, template) is taken from the audit record,
  already redacted; the correction and comment go through the same redactor.
- Durable: one JSON line per rating, written with O_APPEND and fsync'd before the 200; the file is
  never rewritten or rotated (a later rating of the same id supersedes the earlier one when read).
- Ordered: lookups run on the server's audit thread, so a rating sent right after a streamed answer
  finds the answer's line, which that thread writes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path

from fastapi import Request
from pydantic import Field, ValidationError, field_validator

from llamaforge.serve.guard import caller_of
from llamaforge.serve.protocol import APIError, Strict

MAX_CORRECTION_CHARS = 16_000
MAX_COMMENT_CHARS = 2_000
RECENT_ANSWERS = 4096  # answers kept in memory for the join; older ones are looked up in the audit files


class FeedbackBody(Strict):
    id: str = Field(min_length=1, max_length=64, pattern=r"^(chatcmpl|cmpl)-[0-9a-f]{1,40}$")
    rating: str | int = Field(description="up, down, or 1 (worst) to 5 (best)")
    correction: str | None = Field(None, min_length=1, max_length=MAX_CORRECTION_CHARS)
    comment: str | None = Field(None, max_length=MAX_COMMENT_CHARS)

    @field_validator("rating", mode="before")
    @classmethod
    def _scale(cls, value):
        if value in ("up", "down") or (type(value) is int and 1 <= value <= 5):
            return value
        shown = (
            repr(value)
            if isinstance(value, (str, int, float)) and len(repr(value)) < 40
            else type(value).__name__
        )
        raise ValueError(f'must be "up", "down" or an integer from 1 to 5, got {shown}')


def _secret(folder: Path) -> bytes:
    """The per-server HMAC secret, created once (0600) and kept, so owners survive restarts."""
    path = folder / ".feedback-secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_bytes().strip()
        if len(value) < 32:
            raise OSError(
                f"{path} is damaged (shorter than 32 bytes); remove it to start a new secret"
            ) from None
        return value
    value = secrets.token_hex(32).encode()
    with os.fdopen(fd, "wb") as f:
        f.write(value)
        f.flush()
        os.fsync(f.fileno())
    return value


class FeedbackLog:
    """The answers' index (recent in memory, older in the audit files) and the append-only feedback log."""

    def __init__(self, server):
        self.server, self.audit = server, server.audit
        self.enabled = self.audit.enabled
        self.recent: OrderedDict[str, dict] = OrderedDict()
        self.lock = threading.Lock()
        if not self.enabled:
            self.path = None
            return
        folder = self.audit.path.parent
        self.path = folder / "feedback.jsonl"
        key = _secret(folder)
        self.audit.owner_of = lambda name: hmac.new(key, name.encode(), hashlib.sha256).hexdigest()[:32]
        self.audit.listeners.append(self._remember)

    def _remember(self, record: dict) -> None:
        if not isinstance(record.get("id"), str) or "owner" not in record:
            return
        record = dict(record, template=self._template(record.get("model")))
        with self.lock:
            self.recent[record["id"]] = record
            while len(self.recent) > RECENT_ANSWERS:
                self.recent.popitem(last=False)

    def _template(self, model) -> str | None:
        try:
            return self.server.engine.template_for(model).name
        except Exception:  # noqa: BLE001 - an adapter unloaded since, or an engine without templates
            return None

    def find(self, answer_id: str) -> dict | None:
        """The audit record of an answer: recent ones from memory, older from the log and its backups."""
        with self.lock:
            if answer_id in self.recent:
                return self.recent[answer_id]
        needle = f'"id": "{answer_id}"'
        files = [self.audit.path] + [
            self.audit.path.with_name(f"{self.audit.path.name}.{i}")
            for i in range(1, self.audit.cfg.backups + 1)
        ]
        for file in files:
            try:
                with open(file, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        if needle in line:
                            record = json.loads(line)
                            if record.get("id") == answer_id and "owner" in record:
                                return record
            except FileNotFoundError:
                continue
        return None

    def submit(self, body: FeedbackBody, caller_name: str) -> dict:
        """Check ownership, join, redact, append (fsync'd); the stored record."""
        answer = self.find(body.id)
        if answer is None or not hmac.compare_digest(answer["owner"], self.audit.owner_of(caller_name)):
            raise APIError(
                404,
                f"No answer with id '{body.id}' was given to this API key (only the key that got an answer may rate it)",
                type="not_found_error",
                param="id",
            )
        if answer.get("response") is None:
            raise APIError(
                409,
                "This answer has no recorded text (blocked by moderation, or serve.audit.log_text=false): "
                "there is nothing to rate",
                param="id",
            )
        redact = self.audit.redact or (lambda text: text)
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "id": body.id,
            "owner": answer["owner"],
            "rating": body.rating,
            "correction": redact(body.correction) if body.correction else None,
            "comment": redact(body.comment) if body.comment else None,
            "model": answer.get("model"),
            "template": answer.get("template"),
            "chat": body.id.startswith("chatcmpl-"),
            "prompt": answer.get("prompt"),
            "response": answer.get("response"),
            "finish_reason": answer.get("finish_reason"),
            "answered_at": answer.get("time"),
            "redacted": bool(answer.get("redacted")) and (self.audit.redact is not None),
        }
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        self.server.metrics.feedback.labels(record["model"] or "unknown", str(body.rating)).inc()
        return record


def register(app, server) -> None:
    """Add `POST /v1/feedback` to the app."""
    log = FeedbackLog(server)
    server.feedback = log

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        if not log.enabled:
            raise APIError(
                404,
                "Feedback is off: it is joined to the audit log, and serve.audit.path is not set",
                type="not_found_error",
            )
        try:
            raw = json.loads(await request.body())
        except ValueError:
            raise APIError(400, "The request body is not valid JSON") from None
        try:
            body = FeedbackBody.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
            if first.get("type") == "extra_forbidden":
                message = "unsupported field (expected id, rating, correction, comment)"
            raise APIError(422, f"{where}: {message}", param=where) from None
        caller = caller_of(request.scope)
        done = server._background.submit(log.submit, body, caller.name)  # after pending audit lines
        record = await asyncio.wrap_future(done)
        return {"object": "feedback", "id": record["id"], "rating": record["rating"], "stored": True}
