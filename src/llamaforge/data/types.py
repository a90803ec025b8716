"""The one record type every reader produces and every later step consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass
class Message:
    role: Role
    content: str


@dataclass
class Conversation:
    """A chat (system?, user, assistant, ...) or, for raw text, a single assistant message.

    `source` and `line` say where the record came from so that any later error or rejection can
    point back to it; `meta` carries extra fields (task, source name) for stratified splits.
    """

    messages: list[Message]
    source: str = ""
    line: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    raw_text: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conversation:
        messages = [Message(**m) for m in data["messages"]]
        return cls(
            messages=messages,
            source=data.get("source", ""),
            line=data.get("line"),
            meta=dict(data.get("meta") or {}),
            raw_text=bool(data.get("raw_text", False)),
        )


@dataclass
class Rejected:
    """A record that did not make it, kept with its reason: nothing is silently lost."""

    source: str
    line: int | None
    field: str | None
    reason: str
    record: Any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def with_system_prompt(conv: Conversation, system_prompt: str | None) -> Conversation:
    """The conversation with the job's system prompt first, unless it has one (or is raw text)."""
    if not system_prompt or conv.raw_text or (conv.messages and conv.messages[0].role == "system"):
        return conv
    return Conversation([Message("system", system_prompt), *conv.messages], conv.source, conv.line, conv.meta)
