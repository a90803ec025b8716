"""One-line messages to the user on stderr (kept off stdout, which may carry JSON lines)."""

from __future__ import annotations

import sys

_said: set[str] = set()


def say(message: str, *, once: bool = False) -> None:
    """Print a line on stderr; with `once`, a given line only the first time in this process."""
    if once:
        if message in _said:
            return
        _said.add(message)
    print(message, file=sys.stderr, flush=True)


def warn(message: str, *, once: bool = True) -> None:
    say(f"warning: {message}", once=once)
