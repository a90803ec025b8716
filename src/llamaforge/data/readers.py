"""File readers: .json, .jsonl, .csv, .parquet, .txt/.md -> raw records with their line numbers.

Each reader yields `RawItem`s: a parsed record (a dict for well-formed input) or, with `reason`
set, a problem found before the record could be parsed (malformed JSON, bytes that are not UTF-8,
a CSV row of the wrong width). Turning records into Conversations is `formats.py`'s job.

Memory: .jsonl, .csv and .parquet are streamed (one line / row / batch at a time). A .json array
and a .txt/.md file are read whole: a JSON array cannot be split without parsing it, but its
records are still decoded one at a time with `raw_decode` so that each keeps its line number.

Well-formed text the parser still cannot turn into values (a number of thousands of digits,
nesting thousands of levels deep) is a problem of that record alone: the readers go on with the
next one. Only regular files are read: a FIFO, socket or device is refused before any read.

"Line" is the 1-based line where a record starts (for .csv the header is line 1); for .parquet it
is the row index + 1; a .txt/.md file is one record at line 1. Bytes that are not UTF-8 are
reported with their byte offset in the file.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaforge.errors import DataError

# extension -> reader
EXTENSIONS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}
_SURROGATE = re.compile("[\udc80-\udcff]")  # an undecodable byte, kept by errors="surrogateescape"
_JSON_WS = re.compile(r"[ \t\n\r]*")
_BOM = codecs.BOM_UTF8


@dataclass
class RawItem:
    """One raw record from a file reader, or (reason set) a problem found before parsing it."""

    line: int | None
    record: Any
    reason: str | None = None
    field: str | None = None


def check_file(p: Path) -> str:
    """The reader kind for a data file; DataError if it is missing, a directory, unreadable or of an unknown type."""
    if not p.exists():
        raise DataError("data file not found", path=str(p))
    if p.is_dir():
        raise DataError("is a directory, not a data file", path=str(p))
    require_regular(p)
    kind = EXTENSIONS.get(p.suffix.lower())
    if kind is None:
        supported = ", ".join(sorted(EXTENSIONS))
        raise DataError(
            f"unknown file type {p.suffix or '(no extension)'!r}; supported: {supported}", path=str(p)
        )
    try:
        with p.open("rb"):
            pass
    except OSError as exc:
        raise DataError(f"cannot read the file: {exc.strerror or exc}", path=str(p)) from None
    return kind


def require_regular(p: Path, what: str = "a data file") -> None:
    """Refuse a FIFO, socket or device: reading one can block forever or never end."""
    if not p.is_file():
        kind = (
            "a FIFO (named pipe)"
            if p.is_fifo()
            else "a socket"
            if p.is_socket()
            else "a device"
            if p.is_char_device() or p.is_block_device()
            else "not a regular file"
        )
        raise DataError(f"is {kind}, not {what}: only regular files are read", path=str(p))


def undecodable(exc: Exception) -> str:
    """Why the JSON parser gave up on a record that is well-formed text (too deep, a huge number)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply to read (thousands of levels)"
    text = str(exc)
    if "integer string conversion" in text:
        return f"a number too long to read ({text.split(';')[0].split(': ', 1)[-1]})"
    return f"cannot be read as JSON: {text}"


def _value_end(text: str, pos: int) -> int:
    """Where the JSON value starting at `pos` ends, from its brackets and strings only: lets a .json
    array skip one record the parser could not turn into values and go on with the next."""
    depth, i, n = 0, pos, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c in "[{":
            depth += 1
        elif c in "]}":
            if depth <= 1:
                return i + 1 if depth == 1 else i
            depth -= 1
        elif c == "," and depth == 0:
            return i
        i += 1
    return n


def _bad_bytes(text: str, match: re.Match[str], base_offset: int) -> str:
    """Reason for an undecodable byte: its value and byte offset in the file."""
    offset = base_offset + len(text[: match.start()].encode("utf-8", "surrogateescape"))
    byte = ord(match.group()) - 0xDC00
    return f"not valid UTF-8: byte 0x{byte:02x} at byte offset {offset}"


def _clean(text: str) -> str:
    """Text safe to keep in a Rejected (and to write as UTF-8): bad bytes become U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def _decode_whole(p: Path) -> tuple[str, int]:
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the file: {exc.strerror or exc}", path=str(p)) from None
    bom = len(_BOM) if data.startswith(_BOM) else 0
    return data[bom:].decode("utf-8", "surrogateescape"), bom


def _line_text(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return _clean(text[start : end if end >= 0 else len(text)].rstrip("\r"))


def _json_items(p: Path) -> Iterator[RawItem]:
    """A .json file: a top-level array of records (or JSON objects one after another)."""
    text, bom = _decode_whole(p)
    decoder = json.JSONDecoder()
    n = len(text)

    def skip(i: int) -> int:
        return _JSON_WS.match(text, i).end()  # type: ignore[union-attr]

    line, counted = 1, 0

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    pos = skip(0)
    if pos == n:
        return
    in_array = text[pos] == "["
    if not in_array and text[pos] != "{":
        yield RawItem(
            line_at(pos), _line_text(text, pos), "a .json file must hold an array of records [ {...}, ... ]"
        )
        return
    close = -1  # position of the array's closing bracket
    if in_array:
        pos = skip(pos + 1)
        if text.startswith("]", pos):
            close, pos = pos, n  # an empty array: no records
    while pos < n:
        start = pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            reason = f"malformed JSON: {exc.msg} (line {exc.lineno} column {exc.colno}); the rest of the file was not read"
            yield RawItem(exc.lineno, _line_text(text, exc.pos), reason)
            return
        except (ValueError, RecursionError) as exc:  # well-formed, but too deep or a number too long
            end = _value_end(text, pos)
            yield RawItem(line_at(start), _clean(text[start : min(end, start + 2000)]), undecodable(exc))
            pos = skip(end)
            if in_array and pos < n and text[pos] == ",":
                pos = skip(pos + 1)
            elif in_array and pos < n and text[pos] == "]":
                close, pos = pos, n
            continue
        bad = _SURROGATE.search(text, start, end)
        if bad:
            yield RawItem(line_at(start), _clean(text[start:end]), _bad_bytes(text, bad, bom))
        else:
            yield RawItem(line_at(start), record)
        pos = skip(end)
        if not in_array:
            continue
        if pos < n and text[pos] == ",":
            pos = skip(pos + 1)
        elif pos < n and text[pos] == "]":
            close, pos = pos, n
        else:
            where = line_at(min(pos, n))
            got = "the end of the file" if pos >= n else repr(text[pos])
            yield RawItem(
                where,
                _line_text(text, min(pos, n - 1)),
                f"malformed JSON: expected ',' or ']' after a record, got {got}",
            )
            return
    if close >= 0:  # anything after the closing bracket
        tail = skip(close + 1)
        if tail < n:
            yield RawItem(
                line_at(tail), _line_text(text, tail), "malformed JSON: extra data after the closing ']'"
            )


def _jsonl_items(p: Path) -> Iterator[RawItem]:
    """A .jsonl file, line by line: blank lines are skipped, every other line is one record."""
    try:
        f = p.open("rb")
    except OSError as exc:
        raise DataError(f"cannot read the file: {exc.strerror or exc}", path=str(p)) from None
    with f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(_BOM):
                raw, start = raw[len(_BOM) :], start + len(_BOM)
            text = raw.decode("utf-8", "surrogateescape")
            if not text.strip():
                continue
            bad = _SURROGATE.search(text)
            if bad:
                yield RawItem(lineno, _clean(text.rstrip("\r\n")), _bad_bytes(text, bad, start))
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawItem(lineno, text.rstrip("\r\n"), f"malformed JSON: {exc.msg} at column {exc.colno}")
                continue
            except (ValueError, RecursionError) as exc:  # well-formed, but too deep or a number too long
                yield RawItem(lineno, text[:2000].rstrip("\r\n"), undecodable(exc))
                continue
            yield RawItem(lineno, record)


def _csv_items(p: Path) -> Iterator[RawItem]:
    """A .csv file with a header row; each row becomes {column: cell} (cells are always text)."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long documents in one cell
    consumed: list[tuple[int, str]] = []  # (byte offset, text) of the lines read for the current row

    def lines(f: Any) -> Iterator[str]:
        offset = 0
        for i, raw in enumerate(f):
            start, offset = offset, offset + len(raw)
            if i == 0 and raw.startswith(_BOM):
                raw, start = raw[len(_BOM) :], start + len(_BOM)
            text = raw.decode("utf-8", "surrogateescape")
            consumed.append((start, text))
            yield text

    try:
        f = p.open("rb")
    except OSError as exc:
        raise DataError(f"cannot read the file: {exc.strerror or exc}", path=str(p)) from None
    with f:
        reader = csv.reader(lines(f))
        try:
            header = next(reader, None)
            while header is not None and not any(h.strip() for h in header):  # blank lines before it
                consumed.clear()
                header = next(reader, None)
            if header is None:
                return
            header_text = "".join(t for _, t in consumed)
            bad = _SURROGATE.search(header_text)
            if bad:
                reason = _bad_bytes(header_text, bad, consumed[0][0]) + " (in the header)"
                yield RawItem(reader.line_num, _clean(header_text), reason)
                return
            header = [h.strip() for h in header]
            consumed.clear()
            last_line = reader.line_num
            for row in reader:
                line, last_line = last_line + 1, reader.line_num
                raw_text, base = "".join(t for _, t in consumed), consumed[0][0]
                consumed.clear()
                if not row or not any(cell.strip() for cell in row):
                    continue  # blank line
                bad = _SURROGATE.search(raw_text)
                if bad:
                    yield RawItem(line, _clean(raw_text.rstrip("\r\n")), _bad_bytes(raw_text, bad, base))
                elif len(row) != len(header):
                    reason = f"the row has {len(row)} cell(s) but the header has {len(header)} columns"
                    yield RawItem(line, raw_text.rstrip("\r\n"), reason)
                else:
                    yield RawItem(line, dict(zip(header, row, strict=True)))
        except csv.Error as exc:
            yield RawItem(
                reader.line_num,
                _clean("".join(t for _, t in consumed)),
                f"malformed CSV: {exc}; the rest of the file was not read",
            )


def _parquet_items(p: Path) -> Iterator[RawItem]:
    """A .parquet file, streamed batch by batch; line = row index + 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            try:
                records = batch.to_pylist()
            except (ValueError, OverflowError, pa.ArrowException):  # e.g. a timestamp past year 9999
                records = None
            for i in range(batch.num_rows):
                row += 1
                yield RawItem(row, records[i]) if records is not None else _parquet_row(batch, i, row)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"not a readable Parquet file: {exc}", path=str(p)) from None


def _parquet_row(batch: Any, i: int, row: int) -> RawItem:
    """One row of a batch that did not convert as a whole: the cell that fails becomes the reason."""
    record = {}
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        try:
            record[name] = column[i].as_py()
        except (ValueError, OverflowError) as exc:
            return RawItem(
                row, None, f"column '{name}' ({column.type}) has no Python value: {exc}", field=name
            )
    return RawItem(row, record)


def _text_items(p: Path) -> Iterator[RawItem]:
    """A .txt/.md file: the whole file is one raw-text record."""
    text, bom = _decode_whole(p)
    if not text.strip():
        return
    bad = _SURROGATE.search(text)
    if bad:
        yield RawItem(
            text.count("\n", 0, bad.start()) + 1, {"text": _clean(text)}, _bad_bytes(text, bad, bom)
        )
        return
    yield RawItem(1, {"text": text})


READERS: dict[str, Callable[[Path], Iterator[RawItem]]] = {
    "json": _json_items,
    "jsonl": _jsonl_items,
    "csv": _csv_items,
    "parquet": _parquet_items,
    "text": _text_items,
}


def read_items(path: str | Path) -> Iterator[RawItem]:
    """Check the file now (DataError if unreadable) and return a lazy iterator over its raw records."""
    p = Path(path)
    return READERS[check_file(p)](p)
