"""Helpers over `Conversation`: the prompt and answer texts that curation steps look at."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llamaforge.data.types import Conversation, Message


def prompt_text(conv: Conversation) -> str:
    """Every non-assistant message (system and user turns), joined."""
    if conv.raw_text:
        return ""
    return "\n".join(m.content for m in conv.messages if m.role != "assistant")


def answer_text(conv: Conversation) -> str:
    """Every assistant message joined (the text of a raw-text record)."""
    return "\n".join(m.content for m in conv.messages if m.role == "assistant")


def user_text(conv: Conversation) -> str:
    return "\n".join(m.content for m in conv.messages if m.role == "user")


def map_messages(conv: Conversation, fn: Callable[[str], str]) -> None:
    """Apply `fn` to every message's content, in place."""
    for m in conv.messages:
        m.content = fn(m.content)


def make_conversation(
    prompt: str,
    answer: str,
    *,
    system: str | None = None,
    source: str = "",
    line: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Conversation:
    msgs = ([Message("system", system)] if system else []) + [
        Message("user", prompt),
        Message("assistant", answer),
    ]
    return Conversation(messages=msgs, source=source, line=line, meta=dict(meta or {}))


@dataclass(slots=True)
class Item:
    """A record on its way through the pipeline: its input position and cached views of it."""

    idx: int
    conv: Conversation
    reject: tuple[str, str, str | None] | None = None  # (step, reason, field)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        v = self.cache.get("prompt")
        if v is None:
            v = self.cache["prompt"] = prompt_text(self.conv)
        return v

    @property
    def answer(self) -> str:
        v = self.cache.get("answer")
        if v is None:
            v = self.cache["answer"] = answer_text(self.conv)
        return v

    def invalidate(self) -> None:
        self.cache.pop("prompt", None)
        self.cache.pop("answer", None)

    def text(self, on: str) -> str:
        if on == "prompt":
            return self.prompt
        if on == "answer":
            return self.answer
        return f"{self.prompt}\n{self.answer}"

    def rejected(self, step: str, reason: str, fld: str | None = None) -> None:
        if self.reject is None:
            self.reject = (step, reason, fld)
