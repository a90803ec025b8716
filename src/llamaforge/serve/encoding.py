"""Prompt tokenization where only the server writes control tokens.

A chat template renders turn markers (`<|start_header_id|>`, `<|eot_id|>`, `<|im_start|>`) as text
that the tokenizer then parses into special tokens. Text a client typed must never be parsed that
way, or `<|eot_id|><|start_header_id|>system<|end_header_id|>` inside a user message opens a real
system turn. So every special-token spelling in client text is swapped for a private-use character
before rendering; the rendered prompt is tokenized piecewise: the template's pieces with special
tokens parsed, each swapped spelling tokenized as plain text (`split_special_tokens`). A message
without such spellings is tokenized exactly as before (one piece).
"""

from __future__ import annotations

import contextlib
import re

from llamaforge.data.types import Message

_PLACEHOLDER_BASE = 0xF0000  # Supplementary Private Use Area-A: no tokenizer or template treats it specially


def special_pattern(tokenizer) -> re.Pattern | None:
    """A regex for every special-token spelling of this tokenizer (longest first), cached on it."""
    cached = getattr(tokenizer, "_llamaforge_special_re", "unset")
    if cached != "unset":
        return cached
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            names.add(str(token))
    names = sorted((n for n in names if n), key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, names))) if names else None
    with contextlib.suppress(AttributeError):  # a tokenizer that takes no attributes: recomputed next time
        tokenizer._llamaforge_special_re = pattern
    return pattern


def encode_text(tokenizer, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """A raw completion prompt: BOS as the tokenizer adds it, the client's text never parsed for specials."""
    return tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"]


def encode_chat(template, messages: list[Message]) -> list[int]:
    """The template's prompt for `messages`, with control-token spellings in the messages as plain text."""
    tokenizer = template.tokenizer
    pattern = special_pattern(tokenizer)
    literals: list[str] = []
    used = "".join(m.content for m in messages) + template.jinja
    mark = next(chr(c) for c in range(_PLACEHOLDER_BASE, _PLACEHOLDER_BASE + 0xFFFE) if chr(c) not in used)

    def swap(match: re.Match) -> str:
        literals.append(match.group(0))
        return mark

    if pattern is not None:
        messages = [Message(m.role, pattern.sub(swap, m.content)) for m in messages]
    rendered = template.render(messages, add_generation_prompt=True)
    if not literals:
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    pieces = rendered.split(mark)
    if len(pieces) != len(literals) + 1:  # the template dropped or repeated content: no safe mapping
        raise ValueError("the chat template rewrote the message text; control tokens cannot be kept as text")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        if i < len(literals):
            ids += tokenizer(literals[i], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids
