"""Records that can be written as strict JSON, and JSON lines that can always be written.

Every output of llamaforge is strict JSON (RFC 8259) in UTF-8: no NaN or Infinity, no lone
surrogates, only JSON types. Two tools keep it so:

- `json_problem(record)`: what keeps a record from being written as strict JSON (a NaN or
  infinite number, a lone surrogate, a value with no JSON form such as a Parquet timestamp or
  binary cell, nesting deeper than `MAX_DEPTH`), with the field it is in. Readers reject such a
  record (file, line, field, reason) rather than convert it: a value silently changed is a value
  the user did not write. A column of timestamps or bytes should be converted to text first.
- `json_line(row)`: one JSON line for a row that *describes* a problem (a rejected record):
  whatever it holds is made writable (NaN -> "NaN", a lone surrogate -> U+FFFD, bytes or a
  timestamp -> its text), so reporting a bad record never fails.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from typing import Any

MAX_DEPTH = 100  # deeper records are rejected: later steps (dataclasses.asdict, json) recurse
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_SNIPPET = reprlib.Repr()
_SNIPPET.maxlevel, _SNIPPET.maxstring, _SNIPPET.maxother = 4, 200, 200


def _field(path: tuple[str | int, ...]) -> str | None:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or None


def _kind(value: Any) -> str:
    name = type(value).__name__
    return {
        "datetime": "a timestamp",
        "date": "a date",
        "time": "a time of day",
        "timedelta": "a duration",
        "bytes": "binary data",
        "bytearray": "binary data",
        "Decimal": "a decimal",
    }.get(name, f"a {name}")


def json_problem(record: Any) -> tuple[str | None, str, bool] | None:
    """(field, reason, too deep) for the first part of `record` that strict JSON cannot hold; None if fine.

    "Too deep" says that the record itself cannot be kept in the reject either (see `snippet`)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(record, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            bad = _LONE_SURROGATE.search(value)
            if bad:
                return (
                    _field(path),
                    (
                        f"a lone surrogate \\u{ord(bad.group()):04x} at character {bad.start()} "
                        "is not valid Unicode"
                    ),
                    False,
                )
        elif value is None or isinstance(value, (bool, int)):
            continue
        elif isinstance(value, float):
            if not math.isfinite(value):
                name = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
                reason = f"the number {name} is not valid JSON (NaN and Infinity are not allowed)"
                return _field(path), reason, False
        elif len(path) >= MAX_DEPTH and isinstance(value, (dict, list, tuple)):
            return _field(path[:1]), f"nested more than {MAX_DEPTH} levels deep", True
        elif isinstance(value, dict):
            bad_key = next((k for k in value if not isinstance(k, str)), None)
            if bad_key is not None:
                return _field(path), f"a key {bad_key!r} that is not text", False
            stack.extend((item, (*path, key)) for key, item in reversed(value.items()))  # fields in order
        elif isinstance(value, (list, tuple)):
            stack.extend((value[i], (*path, i)) for i in range(len(value) - 1, -1, -1))
        else:
            reason = f"{_kind(value)} ({type(value).__name__}) has no JSON form; convert it to text first"
            return _field(path), reason, False
    return None


def snippet(record: Any) -> str:
    """A short, bounded text of any record (for a reject that cannot keep the record itself)."""
    return _SNIPPET.repr(record)


def _writable(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value).replace("inf", "Infinity").replace("nan", "NaN")
    if depth >= MAX_DEPTH + 10:
        return snippet(value)
    if isinstance(value, dict):
        return {_writable(str(k)): _writable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_writable(v, depth + 1) for v in value]
    return _writable(str(value))


def json_line(row: Any) -> str:
    """`row` as one strict JSON line (with the newline), whatever values it holds."""
    try:
        text = json.dumps(row, ensure_ascii=False, allow_nan=False)
        if not _LONE_SURROGATE.search(text):  # json passes lone surrogates through; UTF-8 cannot hold them
            return text + "\n"
    except (ValueError, TypeError, RecursionError):
        pass
    return json.dumps(_writable(row), ensure_ascii=False, allow_nan=False) + "\n"
