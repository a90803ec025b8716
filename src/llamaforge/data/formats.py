"""Record formats: alpaca, ShareGPT, OpenAI messages and raw text, into one `Conversation` type.

`read_source` yields a `Conversation` for every good record and a `Rejected` (file, line, field,
reason, raw record) for every bad one, so nothing is silently lost; `strict=True` raises a
`DataError` at the first bad record instead. A file that cannot be read at all (missing, a
directory, no permission, unknown extension) is always a `DataError`. The file types, their
line numbers and what is streamed are in `readers.py` (.jsonl/.csv/.parquet stream; a .json
array is read whole: use .jsonl for files larger than memory).

The field checks (`field_text`, `message_content`, `turn_role`, `check_turns`, `InvalidField`,
`type_name`) are public: preference records (train/preference_data.py) are read with the same rules
and the same messages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from llamaforge.data.jsonsafe import json_problem, snippet
from llamaforge.data.readers import EXTENSIONS, READERS, RawItem, check_file
from llamaforge.data.types import Conversation, Message, Rejected
from llamaforge.errors import DataError

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "MESSAGE_ROLES",
    "InvalidField",
    "check_turns",
    "detect_format",
    "field_text",
    "message_content",
    "read_source",
    "turn_role",
    "type_name",
    "write_jsonl",
]

FORMATS: tuple[str, ...] = ("alpaca", "sharegpt", "messages", "text")
# The alpaca instruction and its optional input become one user message, joined by this.
INPUT_SEPARATOR = "\n\n"

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*\}\}")
_MISSING = object()


class InvalidField(Exception):
    """A record-level problem: becomes a Rejected (or a DataError in strict mode)."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


# --------------------------------------------------------------------------------------------- API


def detect_format(record: Any) -> str | None:
    """The format a record's keys suggest: messages, sharegpt, alpaca, text, or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def read_source(
    path: str | Path,
    format: str = "auto",
    *,
    strict: bool = False,
    variables: dict[str, Any] | None = None,
    feedback: Any = None,
) -> Iterator[Conversation | Rejected]:
    """Stream the records of one file as Conversations (good) and Rejected (bad).

    format: "auto" detects it from the first record whose keys are recognisable (messages ->
    messages, conversations -> sharegpt, instruction + output -> alpaca, text -> text) and holds it
    for the rest of the file; an explicit format is used as is.
    variables: None leaves `{{name}}` placeholders untouched; a dict (even an empty one) fills
    them, and a record with a placeholder that has no value is rejected, naming it.
    The file-level checks run now, at the call; records are read as the iterator is consumed.
    """
    p = Path(path)
    if format == "feedback":  # the server's feedback log (data/feedback.py); `feedback`: FeedbackOptions
        from llamaforge.data.feedback import read_feedback
        from llamaforge.schema import FeedbackOptions

        items = read_feedback(p, feedback or FeedbackOptions())
        return _raise_first(items) if strict else items
    if format != "auto" and format not in FORMATS:
        raise DataError(
            f"unknown data format {format!r}; expected auto or one of {', '.join(FORMATS)}", path=str(p)
        )
    kind = check_file(p)
    if kind == "text" and format not in ("auto", "text"):
        raise DataError(
            f"a {p.suffix} file is raw text; format {format!r} does not apply (use text or auto)", path=str(p)
        )
    items = _convert(READERS[kind](p), str(p), None if format == "auto" else format, variables)
    return _raise_first(items) if strict else items


def write_jsonl(path: str | Path, rows: Iterable[Conversation | Rejected | dict[str, Any]]) -> int:
    """Write rows (Conversation, Rejected or plain dicts) as JSON Lines, UTF-8; returns the count."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            data = row if isinstance(row, dict) else row.to_dict()
            f.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n


def _raise_first(items: Iterator[Conversation | Rejected]) -> Iterator[Conversation | Rejected]:
    for item in items:
        if isinstance(item, Rejected):
            raise DataError(item.reason, path=item.source, line=item.line, field=item.field)
        yield item


# ---------------------------------------------------------------------------------- record level


def _convert(
    items: Iterator[RawItem], source: str, fmt: str | None, variables: dict[str, Any] | None
) -> Iterator[Conversation | Rejected]:
    detected_at: int | None = None
    seen = 0
    for item in items:
        seen += 1
        record = item.record
        if item.reason is not None:
            yield Rejected(source, item.line, item.field, item.reason, record)
            continue
        problem = json_problem(record)
        if not isinstance(record, dict):
            reason = f"a record must be an object with named fields, got {type_name(record)}"
            yield Rejected(
                source, item.line, None, reason, snippet(record) if problem and problem[2] else record
            )
            continue
        if problem is not None:  # NaN, a lone surrogate, a timestamp or bytes cell, absurd nesting
            field, reason, too_deep = problem
            yield Rejected(source, item.line, field, reason, snippet(record) if too_deep else record)
            continue
        if fmt is None:
            fmt = detect_format(record)
            if fmt is None:
                keys = ", ".join(map(str, record)) or "none"
                reason = (
                    f"cannot tell the format from the fields ({keys}); expected 'messages', 'conversations', "
                    "'instruction' + 'output' or 'text' (or set the format explicitly)"
                )
                yield Rejected(source, item.line, None, reason, record)
                continue
            detected_at = item.line
        try:
            conv = _CONVERTERS[fmt](record, variables)
        except InvalidField as exc:
            reason = exc.reason
            other = detect_format(record)
            if detected_at is not None and other not in (None, fmt):
                reason = f"the record looks like {other}, but this file is {fmt} (detected at line {detected_at}): {reason}"
            yield Rejected(source, item.line, exc.field, reason, record)
            continue
        conv.source, conv.line = source, item.line
        yield conv
    if seen == 0:
        yield Rejected(source, None, None, "empty file: no records", None)


def type_name(value: Any) -> str:
    """The JSON name of a value's type, for messages ("null", "a list", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _fill(text: str, field: str, variables: dict[str, Any] | None) -> str:
    if variables is None:
        return text
    missing: list[str] = []

    def sub(m: re.Match[str]) -> str:
        if m.group(1) in variables:
            return str(variables[m.group(1)])
        missing.append(m.group(1))
        return m.group(0)

    out = PLACEHOLDER.sub(sub, text)
    if missing:
        given = ", ".join(sorted(variables)) or "none"
        raise InvalidField(field, f"placeholder {{{{{missing[0]}}}}} has no value (variables given: {given})")
    return out


def field_text(value: Any, field: str, variables: dict[str, Any] | None, *, allow_empty: bool = False) -> str:
    """Check that value is text (non-blank unless allow_empty) and fill its placeholders."""
    if value is _MISSING:
        raise InvalidField(field, f"missing field '{field}'")
    if not isinstance(value, str):
        raise InvalidField(field, f"'{field}' must be text, got {type_name(value)}")
    value = _fill(value, field, variables)
    if not allow_empty and not value.strip():
        raise InvalidField(field, f"'{field}' is {'empty' if not value else 'whitespace only'}")
    return value


def _optional_text(record: dict[str, Any], key: str, variables: dict[str, Any] | None) -> str | None:
    """An optional text field: absent, null or blank all mean 'not given'."""
    value = record.get(key)
    if value is None:
        return None
    value = field_text(value, key, variables, allow_empty=True)
    return value if value.strip() else None


def _meta(record: dict[str, Any], used: Iterable[str]) -> dict[str, Any]:
    used = set(used)
    return {str(k): v for k, v in record.items() if k not in used}


def check_turns(turns: list[tuple[str, str, str]]) -> list[Message]:
    """turns: (role, content, field of the role). System only first; then user/assistant alternate; end on assistant."""
    expected = "user"
    for i, (role, _, field) in enumerate(turns):
        if role == "system":
            if i != 0:
                raise InvalidField(field, "a system turn is only allowed as the first turn")
            continue
        if role != expected:
            raise InvalidField(
                field,
                f"expected a {expected} turn, got {role}: turns must alternate user/assistant after an "
                "optional first system turn",
            )
        expected = "assistant" if role == "user" else "user"
    if turns[-1][0] != "assistant":
        raise InvalidField(
            turns[-1][2], f"the conversation must end with an assistant turn, not {turns[-1][0]}"
        )
    return [Message(role, content) for role, content, _ in turns]  # type: ignore[arg-type]


def _from_alpaca(record: dict[str, Any], variables: dict[str, Any] | None) -> Conversation:
    instruction = field_text(record.get("instruction", _MISSING), "instruction", variables)
    extra = _optional_text(record, "input", variables)
    output = field_text(record.get("output", _MISSING), "output", variables)
    system = _optional_text(record, "system", variables)
    messages = [Message("system", system)] if system else []
    history = record.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise InvalidField(
                "history", f"'history' must be a list of [user, assistant] pairs, got {type_name(history)}"
            )
        for i, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise InvalidField(f"history[{i}]", f"'history[{i}]' must be a [user, assistant] pair")
            messages.append(Message("user", field_text(pair[0], f"history[{i}][0]", variables)))
            messages.append(Message("assistant", field_text(pair[1], f"history[{i}][1]", variables)))
    user = f"{instruction}{INPUT_SEPARATOR}{extra}" if extra else instruction
    messages += [Message("user", user), Message("assistant", output)]
    return Conversation(messages, meta=_meta(record, ("instruction", "input", "output", "system", "history")))


def _turn_list(record: dict[str, Any], key: str) -> list[Any]:
    turns = record.get(key, _MISSING)
    if turns is _MISSING:
        raise InvalidField(key, f"missing field '{key}'")
    if not isinstance(turns, list):
        raise InvalidField(key, f"'{key}' must be a list of turns, got {type_name(turns)}")
    if not turns:
        raise InvalidField(key, f"'{key}' is empty")
    return turns


def turn_role(turn: dict[str, Any], key: str, base: str, roles: dict[str, str]) -> tuple[str, str]:
    """(the role `turn[key]` names, mapped through `roles`; the field it came from)."""
    field = f"{base}.{key}"
    value = turn.get(key, _MISSING)
    if value is _MISSING:
        raise InvalidField(field, f"missing field '{field}'")
    if not isinstance(value, str):
        raise InvalidField(field, f"'{field}' must be text, got {type_name(value)}")
    role = roles.get(value.strip().lower())
    if role is None:
        raise InvalidField(field, f"unknown role {value!r}; expected one of {', '.join(roles)}")
    return role, field


def _from_sharegpt(record: dict[str, Any], variables: dict[str, Any] | None) -> Conversation:
    turns: list[tuple[str, str, str]] = []
    system = _optional_text(record, "system", variables)
    if system:
        turns.append(("system", system, "system"))
    for i, turn in enumerate(_turn_list(record, "conversations")):
        base = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise InvalidField(
                base, f"'{base}' must be an object with 'from' and 'value', got {type_name(turn)}"
            )
        # the usual {from, value}; {role, content} turns are accepted too
        role_key, text_key = (
            ("role", "content") if "from" not in turn and "role" in turn else ("from", "value")
        )
        role, role_field = turn_role(turn, role_key, base, SHAREGPT_ROLES)
        if role == "system" and system and i == 0:
            raise InvalidField(
                role_field, "a system prompt is given twice: in 'system' and as the first turn"
            )
        turns.append(
            (role, field_text(turn.get(text_key, _MISSING), f"{base}.{text_key}", variables), role_field)
        )
    return Conversation(check_turns(turns), meta=_meta(record, ("conversations", "system")))


def message_content(value: Any, field: str, variables: dict[str, Any] | None) -> str:
    """OpenAI content: a string, or a list of {type: "text", text} parts (joined)."""
    if not isinstance(value, list):
        return field_text(value, field, variables)
    parts = []
    for j, part in enumerate(value):
        pfield = f"{field}[{j}]"
        if not isinstance(part, dict):
            raise InvalidField(pfield, f"'{pfield}' must be a {{type, text}} part, got {type_name(part)}")
        if part.get("type", "text") != "text":
            raise InvalidField(
                f"{pfield}.type", f"only text parts are supported, got type {part.get('type')!r}"
            )
        parts.append(field_text(part.get("text", _MISSING), f"{pfield}.text", variables, allow_empty=True))
    text = "".join(parts)
    if not text.strip():
        raise InvalidField(field, f"'{field}' is {'empty' if not text else 'whitespace only'}")
    return text


def _from_messages(record: dict[str, Any], variables: dict[str, Any] | None) -> Conversation:
    turns: list[tuple[str, str, str]] = []
    for i, turn in enumerate(_turn_list(record, "messages")):
        base = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise InvalidField(
                base, f"'{base}' must be an object with 'role' and 'content', got {type_name(turn)}"
            )
        role, role_field = turn_role(turn, "role", base, MESSAGE_ROLES)
        turns.append(
            (role, message_content(turn.get("content", _MISSING), f"{base}.content", variables), role_field)
        )
    meta = _meta(record, ("messages",))
    feedback = meta.get("meta", {}).get("feedback") if isinstance(meta.get("meta"), dict) else None
    if isinstance(feedback, dict) and feedback.get("label") is False:
        raise InvalidField(
            "meta.feedback.label",
            "a feedback example rated bad is not an answer to learn: train it with method.objective kto",
        )
    return Conversation(check_turns(turns), meta=meta)


def _from_text(record: dict[str, Any], variables: dict[str, Any] | None) -> Conversation:
    text = field_text(record.get("text", _MISSING), "text", variables)
    return Conversation([Message("assistant", text)], meta=_meta(record, ("text",)), raw_text=True)


_CONVERTERS: dict[str, Callable[[dict[str, Any], dict[str, Any] | None], Conversation]] = {
    "alpaca": _from_alpaca,
    "sharegpt": _from_sharegpt,
    "messages": _from_messages,
    "text": _from_text,
}
