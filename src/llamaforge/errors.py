"""Errors a user can act on: the CLI prints them without a traceback."""

from __future__ import annotations


class LlamaforgeError(Exception):
    """Base class for errors caused by input, config or environment (not by a bug)."""


class ConfigError(LlamaforgeError):
    pass


class DataError(LlamaforgeError):
    """A data problem, located as precisely as we can: file, line, field."""

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None
    ):
        self.path, self.line, self.field, self.reason = path, line, field, message
        where = ":".join(str(p) for p in (path, line) if p is not None)
        prefix = f"{where}: " if where else ""
        suffix = f" (field '{field}')" if field else ""
        super().__init__(f"{prefix}{message}{suffix}")


class ModelSourceError(LlamaforgeError):
    pass
