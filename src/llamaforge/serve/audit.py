"""The audit log: one JSON line per request, rotated by size, PII redacted with the curation detector.

Private to the server's user (created 0600: prompts are often confidential even when redacted) and
bounded: every text field is cut to `max_field_chars`, before redaction (so a 4 MB prompt costs a
bounded redaction and writes a bounded line) but with a margin, so a PII item crossing the cut is
still seen whole by the detector. `record` does blocking work: call it off the event loop.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from llamaforge.serve.config import AuditConfig

log = logging.getLogger(__name__)


def _redactor():
    """The data curation's PII detector (emails, phones, cards, IBANs, keys...), or None if unavailable."""
    try:
        from llamaforge.data.curate.pii import PIIDetector
    except ImportError as exc:
        log.warning("audit: PII redaction is OFF: the curation redactor cannot be imported (%s)", exc)
        return None
    detector = PIIDetector()
    return lambda text: detector.redact(text, detector.detect(text))


class AuditLog:
    def __init__(self, cfg: AuditConfig):
        self.cfg = cfg
        self.path = Path(cfg.path) if cfg.path else None
        self.lock = threading.Lock()
        self.redact = _redactor() if cfg.redact_pii else None
        self.listeners: list = []  # called with each record as written (feedback.py keeps recent answers)
        self.owner_of = None  # key name -> keyed hash, recorded as `owner` (set by feedback.py)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not cfg.redact_pii:
                log.warning(
                    "audit: PII redaction is off (serve.audit.redact_pii=false): prompts are logged verbatim"
                )

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _bound(self, text: str, *, redact: bool) -> str:
        limit = self.cfg.max_field_chars
        cut = text[: limit + 256] if len(text) > limit else text  # a margin: PII crossing the cut stays whole
        if redact and self.redact is not None:
            cut = self.redact(cut)
        if len(text) <= limit and len(cut) <= limit:
            return cut
        return cut[:limit] + f"…[cut: {len(text)} characters]"

    def record(self, **fields) -> None:
        if self.path is None:
            return
        for key in ("prompt", "response"):
            if key in fields and not self.cfg.log_text:
                fields.pop(key)
        for key, value in fields.items():
            if isinstance(value, str):
                fields[key] = self._bound(value, redact=key in ("prompt", "response"))
        fields["redacted"] = self.redact is not None
        if self.owner_of is not None and isinstance(fields.get("key_id"), str):
            fields["owner"] = self.owner_of(fields["key_id"])
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", **fields}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self.lock:
            self._rotate_if_needed(len(line.encode()))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8", errors="replace") as f:
                f.write(line)
            for listener in self.listeners:
                listener(record)

    def _rotate_if_needed(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size + incoming <= self.cfg.max_bytes:
            return
        if self.cfg.backups == 0:
            self.path.unlink()
            return
        for i in range(self.cfg.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
