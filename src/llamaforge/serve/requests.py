"""A generation request as the engines see it, and what the gateway needs to name models and refuse
work: kept apart from the in-process engine so the child-process engines share them without it."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

_ids = itertools.count()


def display_name(source: str) -> str:
    """The name a model source is served as: a local folder's own name, never the server's path to it."""
    path = Path(source).expanduser()
    return path.resolve().name if path.is_absolute() or path.exists() else source


class QueueFull(Exception):
    """The waiting queue is at `max_queue`: the caller answers 429."""


@dataclass
class GenRequest:
    prompt_ids: list[int]
    adapter: str | None  # None: the base model
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()
    model_name: str = ""
    tenant: str = ""  # the API key's name: prefix-cache entries are never shared across tenants
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # set by the engine
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    started: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None


# What every engine does with the tokens it is given: the same latency metrics, stop strings and
# streaming, so an answer reads the same whichever engine decoded it.


def observe_token(req: GenRequest, metrics) -> None:
    """A token arrived: time to first token, else the inter-token latency (vLLM's metric names)."""
    now = time.monotonic()
    if req.first_token is None:
        req.first_token = now
        if metrics:
            metrics.ttft.labels(req.model_name).observe(now - req.arrival)
    elif metrics:
        metrics.itl.labels(req.model_name).observe(now - req.last_token)
    req.last_token = now


def cut_at_stop_string(req: GenRequest) -> bool:
    """Cut `req.text` before the first stop string it now holds; True when one was found."""
    for s in req.stop:
        cut = req.text.find(s, max(0, req.sent - len(s)))
        if cut != -1:
            req.text = req.text[:cut]
            return True
    return False


def take_streamable(req: GenRequest, *, final: bool) -> str:
    """The text not yet streamed that may go out now (all of it when `final`; otherwise not half a
    UTF-8 character nor what may be the start of a stop string), marked as sent."""
    text = req.text
    if not final:
        text = text.rstrip("\ufffd")  # half a UTF-8 character: wait for the rest
        hold = max((len(s) - 1 for s in req.stop), default=0)  # a stop string may be forming
        text = text[: max(req.sent, len(text) - hold)]
    if len(text) <= req.sent:
        return ""
    delta, req.sent = text[req.sent :], len(text)
    return delta
