"""The OpenAI wire format: request bodies (validated by pydantic, so bad parameters are 400s with the
field named) and the error shape every failure answers with.

Every sampling parameter is bounded here, at the edge, so nothing a request carries can make the
engine raise inside a batch it shares with other requests. Fields of the OpenAI API this server does
not implement (logprobs, tools, response_format, ...) are refused with their name, as vLLM does,
rather than silently ignored; unknown fields are refused too. Strings holding lone surrogates (valid
JSON escapes, but not text) are refused before anything tries to encode them.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (dividing logits by ~0 overflows)

_SURROGATE = re.compile("[\ud800-\udfff]")
_ABS_PATH = re.compile(
    r"(?<![\w.:/])(?:[A-Za-z]:\\|/)(?:[^\s/\\'\"`:;,()\[\]{}]+[/\\])+([^\s/\\'\"`:;,()\[\]{}]*)"
)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def scrub_paths(text: str) -> str:
    """Absolute paths shortened to their last part: an error never shows the server's file layout."""
    return _ABS_PATH.sub(lambda m: "…/" + m.group(1), text)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": scrub_paths(message), "type": type, "param": param, "code": code}}


def _find_surrogate(value: Any, where: str = "") -> str | None:
    """The dotted location of the first string (or key) holding a lone surrogate, or None."""
    if isinstance(value, str):
        return where or "body" if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            name = f"{where}.{k}" if where else str(k)
            if isinstance(k, str) and _SURROGATE.search(k):
                return where or "body"
            if found := _find_surrogate(v, name):
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            if found := _find_surrogate(v, f"{where}.{i}" if where else str(i)):
                return found
    return None


class Strict(BaseModel):
    """Unknown fields refused; NaN/Infinity refused; lone surrogates refused with their location."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_surrogates(cls, data):
        if (where := _find_surrogate(data)) is not None:
            raise ValueError(
                f"{where}: the text holds a lone UTF-16 surrogate (e.g. \\ud800), which is not valid Unicode"
            )
        return data


# ------------------------------------------------------------------ request schemas

# OpenAI fields this server does not implement, and the values that ask for nothing (accepted).
_NEUTRAL: dict[str, tuple] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "parallel_tool_calls": (None, True, False),
}


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingBody(Strict):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0, le=2, description=f"below {GREEDY_BELOW}: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # not implemented: accepted only with the value that asks for nothing, else 400 naming the field
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    parallel_tool_calls: Any = None

    @field_validator(*[f for f in _NEUTRAL if f not in ("best_of", "suffix")], mode="before")
    @classmethod
    def _unsupported(cls, v, info):
        if v not in _NEUTRAL[info.field_name]:
            raise ValueError(f"`{info.field_name}` is not supported by this server (leave it unset)")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings of at most 256 characters")
        return stops

    def effective_temperature(self, default: float) -> float:
        t = default if self.temperature is None else self.temperature
        return 0.0 if t < GREEDY_BELOW else t


class ContentPart(Strict):
    type: str
    text: str = ""

    @field_validator("type")
    @classmethod
    def _text_only(cls, v):
        if v != "text":
            raise ValueError(f"content part type '{v[:40]}' is not supported (text only)")
        return v


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)


class CompletionBody(SamplingBody):
    prompt: str | list[str]
    echo: bool = False
    best_of: Any = None
    suffix: Any = None

    @field_validator("best_of", "suffix", mode="before")
    @classmethod
    def _unsupported_here(cls, v, info):
        if v not in _NEUTRAL[info.field_name]:
            raise ValueError(f"`{info.field_name}` is not supported by this server (leave it unset)")
        return v

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if len(prompts) != 1:
            raise ValueError("send one prompt per request")
        if not prompts[0]:
            raise ValueError("the prompt is empty")
        return prompts[0]

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v


class LoadAdapterBody(Strict):
    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._\-]+$")
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterBody(Strict):
    lora_name: str = Field(min_length=1, max_length=128)
