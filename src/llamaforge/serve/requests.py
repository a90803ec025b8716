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
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None
