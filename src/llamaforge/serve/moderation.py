"""Moderation of prompts and answers: a built-in blocklist (whole words, any case) and, when set,
any OpenAI-compatible moderation endpoint (`POST {"input": text}` -> `results[0].flagged`), such as
a Llama Guard deployment behind an OpenAI-style shim.

The blocklist matches text after NFKC normalisation, with format characters (zero-width joiners and
spaces, soft hyphens, BOMs, tag characters) and variation selectors removed and case folded, so
`ｎｕｋｅ`, `nu\u200dke` and `nu\u00adke` are all `nuke`. Moderation never fails open by accident: an
error in the blocklist refuses the text, and an unreachable or garbled endpoint refuses it too
unless `fail_closed` is explicitly off. Streamed answers pass through `OutputWindow`, which holds
text back until moderation has seen it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import sys
import unicodedata

from llamaforge.serve.config import ModerationConfig

log = logging.getLogger(__name__)


@functools.cache
def _invisible_table() -> dict[int, None]:
    drop = {c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"}
    drop |= set(range(0xFE00, 0xFE10)) | set(range(0xE0100, 0xE01F0))  # variation selectors
    return dict.fromkeys(drop)


def normalize(text: str) -> str:
    """The form the blocklist matches: NFKC, no format characters or variation selectors, case folded."""
    return unicodedata.normalize("NFKC", text).translate(_invisible_table()).casefold()


class Moderator:
    def __init__(self, cfg: ModerationConfig):
        self.cfg = cfg
        words = [normalize(w).strip() for w in cfg.blocklist]
        words = [w for w in words if w]
        self.pattern = (
            re.compile(
                r"(?<!\w)(?:" + "|".join(r"\s+".join(map(re.escape, w.split())) for w in words) + r")(?!\w)"
            )
            if words
            else None
        )
        # raw characters a streamed answer holds back: a blocked word may still be forming in them
        # (spelled with invisible characters between its letters it is longer than itself)
        self.hold_chars = 4 * max((len(w) for w in words), default=0)

    @property
    def active(self) -> bool:
        return self.pattern is not None or bool(self.cfg.endpoint)

    def blocklisted(self, text: str) -> str | None:
        """None when no blocked term occurs; any failure refuses (never fails open)."""
        if self.pattern is None:
            return None
        try:
            m = self.pattern.search(normalize(text))
        except Exception as exc:  # noqa: BLE001 - moderation must refuse, not crash or let text through
            log.exception("blocklist check failed")
            return f"moderation failed ({type(exc).__name__})"
        return f"blocklisted term '{m.group(0)}'" if m else None

    async def check(self, text: str) -> str | None:
        """None when allowed, else why it was blocked (blocklist off the event loop, then the endpoint)."""
        reason = await asyncio.to_thread(self.blocklisted, text)
        if reason or not self.cfg.endpoint:
            return reason
        return await self._endpoint(text)

    async def _endpoint(self, text: str) -> str | None:
        import httpx

        headers = {}
        if self.cfg.endpoint_api_key_env and os.environ.get(self.cfg.endpoint_api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.cfg.endpoint_api_key_env]}"
        body = {"input": text, **({"model": self.cfg.endpoint_model} if self.cfg.endpoint_model else {})}
        try:
            async with httpx.AsyncClient(timeout=self.cfg.timeout_s) as client:
                resp = await client.post(self.cfg.endpoint, json=body, headers=headers)
                resp.raise_for_status()
                result = resp.json()["results"][0]
                flagged = result.get("flagged")
                if not isinstance(flagged, bool):
                    raise ValueError("`flagged` is not a boolean")
        except Exception as exc:  # noqa: BLE001 - an unreachable guard is a policy decision, not a crash
            log.warning("moderation endpoint failed: %s", exc)
            return f"moderation endpoint unavailable ({type(exc).__name__})" if self.cfg.fail_closed else None
        if flagged:
            categories = result.get("categories")
            cats = sorted(str(k) for k, v in categories.items() if v) if isinstance(categories, dict) else []
            return "flagged by the moderation endpoint" + (f": {', '.join(cats)}" if cats else "")
        return None


class OutputWindow:
    """A streamed answer's text, released only once moderation has seen it.

    The blocklist sees the whole answer so far at every piece; the last `hold_chars` characters stay
    back, since a blocked word may be forming there. With an endpoint, the answer so far is sent every
    `stream_window_chars` characters and only text it has passed is released; `finish` checks the
    whole answer before the rest leaves."""

    def __init__(self, moderator: Moderator):
        self.moderator, self.text = moderator, ""
        self.released = self.passed = 0  # characters sent to the client / passed by the endpoint
        self.endpoint = bool(moderator.cfg.endpoint)

    async def push(self, piece: str) -> tuple[str, str | None]:
        """(text now safe to send, why the answer is blocked or None)."""
        self.text += piece
        if reason := await asyncio.to_thread(self.moderator.blocklisted, self.text):
            return "", reason
        if self.endpoint and len(self.text) - self.passed >= self.moderator.cfg.stream_window_chars:
            if reason := await self.moderator.check(self.text):
                return "", reason
            self.passed = len(self.text)
        safe = len(self.text) - self.moderator.hold_chars
        if self.endpoint:
            safe = min(safe, self.passed)
        return self._release(safe), None

    async def finish(self) -> tuple[str, str | None]:
        if reason := await self.moderator.check(self.text):
            return "", reason
        return self._release(len(self.text)), None

    def _release(self, upto: int) -> str:
        if upto <= self.released:
            return ""
        out, self.released = self.text[self.released : upto], upto
        return out
