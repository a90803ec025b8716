"""`format: feedback`: the server's feedback.jsonl (serve/feedback.py) as training examples.

Each line is one rating of one answer, joined to its audit record (prompt, response, model,
template). Lines given outside the `since`/`until` window are left out; when an answer was rated
more than once, its last rating counts. What comes out, by `feedback.kind`:

- sft: every correction, as the answer to its prompt.
- binary (KTO): every rated answer, labelled good (up, or a 1-5 rating >= good_from) or bad (down,
  or <= bad_to; ratings between are neutral and left out), and every correction, labelled good.
- pairs (DPO/ORPO): a correction over the answer it corrects, and, for a prompt asked more than
  once, each better-rated answer over each worse-rated one.

The examples are `Conversation`s (prompt + the good or rated answer) so that every curation step
(PII, dedup, decontamination, review) sees them; `meta.feedback` carries the label or the rejected
answer, which the preference reader (train/preference_data.py) reads back. A malformed line becomes
a `Rejected` naming the file, the line and the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llamaforge.data.readers import READERS, check_file
from llamaforge.data.types import Conversation, Message, Rejected
from llamaforge.errors import DataError

_TURN = re.compile(r"^(system|user|assistant): ", re.MULTILINE)


class _Bad(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def parse_time(value: str) -> datetime:
    """An ISO 8601 time as an aware UTC datetime (a time without a zone is read as UTC)."""
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def prompt_messages(prompt: str, chat: bool) -> list[Message]:
    """The audit prompt as turns: the gateway writes a chat as `role: content` lines, one turn per role
    prefix at a line start; a text completion's prompt is one user turn."""
    if not chat:
        return [Message("user", prompt)]
    starts = list(_TURN.finditer(prompt))
    if not starts or starts[0].start() != 0:
        raise _Bad("prompt", "a chat prompt must start with a `role: ` line (system, user or assistant)")
    turns = []
    for i, m in enumerate(starts):
        end = starts[i + 1].start() - 1 if i + 1 < len(starts) else len(prompt)
        turns.append(Message(m.group(1), prompt[m.end() : end]))  # type: ignore[arg-type]
    if turns[-1].role != "user":
        raise _Bad("prompt", f"the prompt must end with a user turn, not {turns[-1].role}")
    return turns


def _text(record: dict, key: str, *, optional: bool = False) -> str | None:
    value = record.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        what = (
            "missing"
            if value is None
            else f"a {type(value).__name__}"
            if not isinstance(value, str)
            else "empty"
        )
        raise _Bad(key, f"'{key}' must be non-empty text, got {what}")
    return value


def _check(record: Any) -> dict:
    """The fields a rating needs, checked; raises _Bad naming the field."""
    if not isinstance(record, dict):
        raise _Bad("", f"a feedback line must be a JSON object, got {type(record).__name__}")
    rating = record.get("rating")
    if rating not in ("up", "down") and not (type(rating) is int and 1 <= rating <= 5):
        raise _Bad("rating", f'rating must be "up", "down" or an integer from 1 to 5, got {rating!r}')
    try:
        when = parse_time(_text(record, "time"))
    except ValueError:
        raise _Bad("time", f"time {record.get('time')!r} is not an ISO 8601 time") from None
    if not isinstance(record.get("chat", True), bool):
        raise _Bad("chat", "chat must be true or false")
    out = {
        "id": _text(record, "id"),
        "rating": rating,
        "time": when,
        "prompt": prompt_messages(_text(record, "prompt"), record.get("chat", True)),
        "response": _text(record, "response"),
        "correction": _text(record, "correction", optional=True),
        "model": record.get("model") if isinstance(record.get("model"), str) else None,
    }
    return out


def rating_label(rating, opts) -> bool | None:
    """Good (True), bad (False) or neutral (None): up/down, or a 1-5 rating against good_from/bad_to."""
    if rating in ("up", "down"):
        return rating == "up"
    return True if rating >= opts.good_from else False if rating <= opts.bad_to else None


def _score(rating) -> int:
    return {"up": 5, "down": 1}.get(rating, rating)


def _example(prompt: list[Message], answer: str, line: int, source: str, info: dict) -> Conversation:
    messages = [Message(m.role, m.content) for m in prompt] + [Message("assistant", answer)]
    return Conversation(messages, source, line, {"feedback": info})


def read_feedback(path: str | Path, opts) -> Iterator[Conversation | Rejected]:
    """The examples of one feedback log within `opts.since`/`opts.until` (FeedbackOptions)."""
    p = Path(path)
    if check_file(p) != "jsonl":
        raise DataError("a feedback log is a .jsonl file (the server's feedback.jsonl)", path=str(p))
    since = parse_time(opts.since) if opts.since else None
    until = parse_time(opts.until) if opts.until else None
    latest: dict[str, tuple[int, dict]] = {}  # answer id -> (line, its last rating in the window)
    for item in READERS["jsonl"](p):
        if item.reason is not None:
            yield Rejected(str(p), item.line, item.field, item.reason, item.record)
            continue
        try:
            rating = _check(item.record)
        except _Bad as bad:
            yield Rejected(str(p), item.line, bad.field or None, bad.reason, item.record)
            continue
        if (since and rating["time"] < since) or (until and rating["time"] >= until):
            continue
        latest[rating["id"]] = (item.line, rating)
    yield from _examples(sorted(latest.values(), key=lambda x: x[0]), str(p), opts)


def _examples(rated: list[tuple[int, dict]], source: str, opts) -> Iterator[Conversation]:
    kind = opts.kind
    by_prompt: dict[tuple, list[tuple[int, dict]]] = {}
    for line, r in rated:
        base = {"kind": kind, "id": r["id"], "rating": r["rating"], "model": r["model"]}
        fixed = r["correction"] is not None and r["correction"].strip() != r["response"].strip()
        if kind == "sft" and fixed:
            yield _example(r["prompt"], r["correction"], line, source, base)
        elif kind == "binary":
            label = rating_label(r["rating"], opts)
            if label is not None:
                yield _example(r["prompt"], r["response"], line, source, {**base, "label": label})
            if fixed:
                yield _example(
                    r["prompt"], r["correction"], line, source, {**base, "label": True, "correction": True}
                )
        elif kind == "pairs":
            if fixed:
                yield _example(
                    r["prompt"], r["correction"], line, source, {**base, "rejected": r["response"]}
                )
            key = tuple((m.role, m.content) for m in r["prompt"])
            by_prompt.setdefault(key, []).append((line, r))
    for answers in by_prompt.values():  # the same prompt, answers rated differently
        for line, better in answers:
            for _, worse in answers:
                if (
                    _score(better["rating"]) > _score(worse["rating"])
                    and better["response"] != worse["response"]
                ):
                    info = {
                        "kind": kind,
                        "id": better["id"],
                        "rejected_id": worse["id"],
                        "rating": better["rating"],
                        "rejected_rating": worse["rating"],
                        "model": better["model"],
                        "rejected": worse["response"],
                    }
                    yield _example(better["prompt"], better["response"], line, source, info)


def preference_record(record: dict) -> dict | None:
    """A prepared feedback example (a Conversation row with meta.feedback) in the preference reader's
    shape: {prompt, chosen, rejected} or {prompt, completion, label}; None for any other record."""
    meta = record.get("meta")
    info = meta.get("feedback") if isinstance(meta, dict) else None
    messages = record.get("messages")
    if not isinstance(info, dict) or not isinstance(messages, list) or not messages:
        return None
    prompt, answer = messages[:-1], messages[-1].get("content") if isinstance(messages[-1], dict) else None
    if "rejected" in info:
        return {"prompt": prompt, "chosen": answer, "rejected": info["rejected"]}
    if "label" in info:
        return {"prompt": prompt, "completion": answer, "label": info["label"]}
    return None
