"""Step 7, instruction pairs from documents: chunk raw documents (txt, md, html; pdf when `pypdf`
is installed) and ask a teacher model for question/answer pairs about each chunk.

The teacher is an OpenAI-compatible endpoint (`/chat/completions`, httpx), a local model run by
llamaforge itself (`teacher.kind: local`, `teacher.model`: a catalog name, folder or run
directory), or any Python callable `prompts -> replies` passed to the pipeline. Generated
pairs are yielded as Conversations (source `synth:<document>`, line = chunk number) and go
through the same normalise / filters / PII / dedup steps as every other record; unusable
replies are yielded as Rejected, with the chunk they came from.
"""

from __future__ import annotations

import glob
import html
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from llamaforge.data.curate.config import SynthConfig, TeacherConfig
from llamaforge.data.curate.records import make_conversation
from llamaforge.data.types import Conversation, Message, Rejected
from llamaforge.errors import ConfigError, DataError

Teacher = Callable[[list[str]], list[str]]
DOC_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")


# ------------------------------------------------------------------ documents


class _TextExtractor(HTMLParser):
    _SKIP = {"script", "style", "head", "noscript", "svg"}
    _BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section", "article", "pre"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._SKIP:
            self._skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skip:
            self._skip -= 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(text: str) -> str:
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    out = html.unescape("".join(parser.parts))
    return re.sub(r"\n\s*\n+", "\n\n", re.sub(r"[ \t]+", " ", out)).strip()


def read_document(path: Path) -> str:
    """The text of one document; DataError (with the byte offset for bad UTF-8) when it cannot be read."""
    from llamaforge.data.readers import require_regular

    if path.exists():
        require_regular(path, "a document")  # a FIFO would block forever
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        try:
            from pypdf import PdfReader
        except ImportError:
            raise DataError("reading PDF needs `pip install pypdf`", path=str(path)) from None
        try:
            return "\n\n".join((page.extract_text() or "") for page in PdfReader(str(path)).pages)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the file's
            raise DataError(f"not a readable PDF: {exc}", path=str(path)) from None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the file: {exc.strerror or exc}", path=str(path)) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"bytes that are not UTF-8 at byte offset {exc.start}", path=str(path)) from None
    return html_to_text(text) if suffix in (".html", ".htm") else text


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Chunks of at most `size` characters, cut at paragraph, then sentence, then word boundaries."""
    text = text.strip()
    if not text:
        return []
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            window = text[start:end]
            for sep in ("\n\n", "\n", ". ", " "):
                cut = window.rfind(sep)
                if cut > size // 2:
                    end = start + cut + len(sep)
                    break
        chunk = text[start:end].strip()
        if chunk:
            chunks.append(chunk)
        if end >= len(text):
            break
        start = max(end - overlap, start + 1)
        # do not restart mid-word
        while 0 < start < len(text) and not text[start - 1].isspace() and start < end:
            start += 1
    return chunks


def expand_documents(patterns: list[str], base_dir: Path) -> list[Path]:
    out: list[Path] = []
    for pattern in patterns:
        p = Path(pattern).expanduser()
        full = p if p.is_absolute() else base_dir / p
        matches = sorted(Path(m) for m in glob.glob(str(full), recursive=True))
        if not matches:
            raise DataError("no document matches this path or glob", path=pattern)
        for m in matches:
            if m.is_dir():
                out += sorted(f for f in m.rglob("*") if f.suffix.lower() in DOC_SUFFIXES)
            else:
                out.append(m)
    return out


# ------------------------------------------------------------------ teachers


def endpoint_teacher(cfg: TeacherConfig, system: str | None = None) -> Teacher:
    """An OpenAI-compatible chat completions endpoint, one request per prompt."""
    import httpx

    headers = {"Content-Type": "application/json"}
    key = os.environ.get(cfg.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = cfg.base_url.rstrip("/") + "/chat/completions"
    client = httpx.Client(timeout=cfg.timeout_s, headers=headers)

    def ask(prompt: str) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        body = {
            "model": cfg.model,
            "messages": messages,
            "temperature": cfg.temperature,
            "max_tokens": cfg.max_new_tokens,
        }
        last: Exception | None = None
        for attempt in range(cfg.retries + 1):
            try:
                r = client.post(url, json=body)
            except httpx.ConnectError as exc:
                raise ConfigError(f"synth teacher: cannot connect to {url}: {exc}") from None
            except httpx.HTTPError as exc:
                last = exc
            else:
                if r.status_code == 200:
                    try:
                        return r.json()["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        raise DataError(
                            f"synth teacher: {url} answered without choices[0].message.content: "
                            f"{r.text[:200]}"
                        ) from exc
                if r.status_code in (401, 403, 404):
                    raise ConfigError(f"synth teacher: {url} answered {r.status_code}: {r.text[:200]}")
                last = RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            time.sleep(min(2.0, 0.2 * 2**attempt))
        raise DataError(f"synth teacher: {url} failed after {cfg.retries + 1} attempts: {last}")

    def teacher(prompts: list[str]) -> list[str]:
        out = []
        for p in prompts:
            try:
                out.append(ask(p))
            except DataError as exc:  # one bad chunk is a rejected chunk, not a failed run
                out.append(exc)  # type: ignore[arg-type]
        return out

    return teacher


def local_teacher(cfg: TeacherConfig, system: str | None = None) -> Teacher:
    """A local model through llamaforge (catalog name, folder, GGUF or run directory)."""
    from llamaforge.generation import generate
    from llamaforge.runs import load_for_inference

    model, tokenizer, template = load_for_inference(cfg.model)

    def teacher(prompts: list[str]) -> list[str]:
        convs = [([Message("system", system)] if system else []) + [Message("user", p)] for p in prompts]
        return generate(
            model, tokenizer, template, convs, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature
        )

    return teacher


def make_teacher(cfg: SynthConfig) -> Teacher:
    if cfg.teacher.kind == "endpoint":
        return endpoint_teacher(cfg.teacher, cfg.system_prompt)
    return local_teacher(cfg.teacher, cfg.system_prompt)


# ------------------------------------------------------------------ parsing replies

_FENCE = re.compile(r"```(?:json)?\s*([\s\S]*?)```")
_QA = re.compile(
    r"(?:^|\n)\s*(?:\d+[.)]\s*)?(?:\*\*)?(?:Q(?:uestion)?|Instruction)\s*\d*\s*[:.](?:\*\*)?\s*([\s\S]+?)\n\s*"
    r"(?:\*\*)?(?:A(?:nswer)?|Response)\s*\d*\s*[:.](?:\*\*)?\s*([\s\S]+?)(?=\n\s*(?:\d+[.)]\s*)?(?:\*\*)?"
    r"(?:Q(?:uestion)?|Instruction)\s*\d*\s*[:.]|\Z)",
    re.IGNORECASE,
)


def parse_pairs(reply: str) -> list[tuple[str, str]]:
    """(instruction, response) pairs from a teacher reply: a JSON list (possibly fenced), else Q:/A: text."""
    candidates = [m.group(1) for m in _FENCE.finditer(reply)] + [reply]
    for cand in candidates:
        start, end = cand.find("["), cand.rfind("]")
        if start == -1 or end <= start:
            continue
        try:
            data = json.loads(cand[start : end + 1])
        except json.JSONDecodeError:
            continue
        pairs = []
        for obj in data if isinstance(data, list) else []:
            if not isinstance(obj, dict):
                continue
            q = obj.get("instruction") or obj.get("question") or obj.get("prompt")
            a = obj.get("response") or obj.get("answer") or obj.get("output")
            if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
                pairs.append((q.strip(), a.strip()))
        if pairs:
            return pairs
    return [(q.strip(), a.strip()) for q, a in _QA.findall(reply) if q.strip() and a.strip()]


# ------------------------------------------------------------------ the step


def synthesize(
    cfg: SynthConfig,
    *,
    teacher: Teacher | None = None,
    base_dir: Path = Path("."),
    info: dict[str, Any] | None = None,
    batch: int = 8,
) -> Iterator[Conversation | Rejected]:
    name = "callable" if teacher is not None else f"{cfg.teacher.kind}:{cfg.teacher.model}"
    teacher = teacher or make_teacher(cfg)
    chunks: list[tuple[str, int, str]] = []
    for path in expand_documents(cfg.documents, base_dir):
        try:
            text = read_document(path)
        except DataError as exc:
            yield Rejected(str(path), None, None, exc.reason, None)
            continue
        pieces = chunk_text(text, cfg.chunk_chars, cfg.chunk_overlap)
        if info is not None:
            info[f"synth:{path}"] = {"path": str(path), "chunks": len(pieces), "characters": len(text)}
        chunks += [(str(path), i + 1, c) for i, c in enumerate(pieces)]
        if cfg.max_chunks is not None and len(chunks) >= cfg.max_chunks:
            chunks = chunks[: cfg.max_chunks]
            break
    for start in range(0, len(chunks), batch):
        group = chunks[start : start + batch]
        prompts = [
            cfg.prompt.replace("{n}", str(cfg.pairs_per_chunk)).replace("{chunk}", c) for _, _, c in group
        ]
        replies = teacher(prompts)
        if len(replies) != len(prompts):
            raise ConfigError(f"synth teacher returned {len(replies)} replies for {len(prompts)} prompts")
        for (doc, n, chunk), reply in zip(group, replies, strict=False):
            source = f"synth:{doc}"
            if isinstance(reply, Exception):
                yield Rejected(source, n, None, f"teacher failed on this chunk: {reply}", {"chunk": chunk})
                continue
            pairs = parse_pairs(reply or "")
            if not pairs:
                yield Rejected(
                    source,
                    n,
                    None,
                    "teacher reply has no instruction/response pairs",
                    {"chunk": chunk, "reply": reply},
                )
                continue
            for q, a in pairs[: cfg.pairs_per_chunk]:
                yield make_conversation(
                    q,
                    a,
                    source=source,
                    line=n,
                    meta={
                        "synth": True,
                        "document": doc,
                        "chunk": n,
                        "teacher": name,
                        "source_name": "synth",
                    },
                )
