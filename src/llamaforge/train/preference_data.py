"""Preference pairs (DPO, ORPO) and binary examples (KTO) from data files, tokenized with the SFT template.

Records are read by the same readers as SFT data (.jsonl/.json/.csv/.parquet, with line numbers) and
every bad one becomes a `Rejected` naming file, line and field. Accepted shapes, as the common datasets
write them (TRL's standard and conversational formats, Anthropic HH):

- pairs: `{prompt, chosen, rejected}` where prompt is text or a list of messages and chosen/rejected are
  text or a list holding one assistant message; or, without a prompt, chosen/rejected as two whole
  conversations that share every turn but the last assistant one. An optional `system` is prepended.
- KTO: `{prompt, completion, label}` with label a JSON boolean (a string "false" is rejected, not read
  as true).

Only the final assistant answer is labelled: assistant turns inside the prompt are context.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llamaforge.data.feedback import preference_record
from llamaforge.data.formats import (
    MESSAGE_ROLES,
    InvalidField,
    check_turns,
    field_text,
    message_content,
    turn_role,
    type_name,
)
from llamaforge.data.readers import READERS, check_file
from llamaforge.data.types import Conversation, Message, Rejected
from llamaforge.errors import ConfigError, DataError
from llamaforge.templates import IGNORE_INDEX

_MISSING = object()


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: str
    rejected: str
    source: str = ""
    line: int | None = None


@dataclass
class BinaryExample:
    prompt: list[Message]
    completion: str
    label: bool
    source: str = ""
    line: int | None = None


# ------------------------------------------------------------------------------ parsing


def _messages(value: Any, field: str) -> list[tuple[str, str, str]]:
    if not isinstance(value, list) or not value:
        raise InvalidField(
            field, f"'{field}' must be text or a non-empty list of messages, got {type_name(value)}"
        )
    turns = []
    for i, turn in enumerate(value):
        base = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise InvalidField(
                base, f"'{base}' must be an object with 'role' and 'content', got {type_name(turn)}"
            )
        role, role_field = turn_role(turn, "role", base, MESSAGE_ROLES)
        turns.append(
            (role, message_content(turn.get("content", _MISSING), f"{base}.content", None), role_field)
        )
    return turns


def _prompt(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    value = record.get("prompt", _MISSING)
    if value is _MISSING:
        raise InvalidField("prompt", "missing field 'prompt'")
    turns = (
        [("user", field_text(value, "prompt", None), "prompt")]
        if isinstance(value, str)
        else _messages(value, "prompt")
    )
    system = record.get("system")
    if system is not None:
        if turns[0][0] == "system":
            raise InvalidField(
                "system", "a system prompt is given twice: in 'system' and as the first prompt turn"
            )
        turns.insert(0, ("system", field_text(system, "system", None), "system"))
    if turns[-1][0] != "user":
        raise InvalidField(turns[-1][2], f"the prompt must end with a user turn, not {turns[-1][0]}")
    check_turns([*turns, ("assistant", "", "prompt")])  # alternation and system placement
    return turns


def _answer(record: dict[str, Any], key: str) -> str:
    value = record.get(key, _MISSING)
    if value is _MISSING:
        raise InvalidField(key, f"missing field '{key}'")
    if isinstance(value, str):
        return field_text(value, key, None)
    turns = _messages(value, key)
    if len(turns) != 1 or turns[0][0] != "assistant":
        raise InvalidField(key, f"'{key}' must be text or one assistant message when a prompt is given")
    return turns[0][1]


def _split_conversations(record: dict[str, Any]) -> tuple[list[tuple[str, str, str]], str, str]:
    """chosen/rejected as whole conversations: the shared turns are the prompt, the last turn the answer."""
    chosen, rejected = (
        _messages(record.get("chosen", _MISSING), "chosen"),
        _messages(record.get("rejected", _MISSING), "rejected"),
    )
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1][0] != "assistant":
            raise InvalidField(turns[-1][2], f"'{key}' must end with an assistant turn, not {turns[-1][0]}")
    if [t[:2] for t in chosen[:-1]] != [t[:2] for t in rejected[:-1]]:
        raise InvalidField(
            "rejected", "without a 'prompt', 'chosen' and 'rejected' must share every turn but the last"
        )
    if len(chosen) < 2:
        raise InvalidField(
            "chosen", "without a 'prompt', 'chosen' needs at least a user turn before the answer"
        )
    check_turns(chosen)
    return chosen[:-1], chosen[-1][1], rejected[-1][1]


def _to_messages(turns: list[tuple[str, str, str]]) -> list[Message]:
    return [Message(role, content) for role, content, _ in turns]  # type: ignore[arg-type]


def parse_pair(record: Any) -> PreferencePair:
    if not isinstance(record, dict):
        raise InvalidField(None, f"a record must be an object with named fields, got {type_name(record)}")
    record = preference_record(record) or record  # a prepared `format: feedback` example
    if "prompt" in record:
        prompt = _prompt(record)
        chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
    elif isinstance(record.get("chosen"), list):
        prompt, chosen, rejected = _split_conversations(record)
    else:
        keys = ", ".join(map(str, record)) or "none"
        raise InvalidField(
            "prompt",
            f"missing field 'prompt' (fields: {keys}); a pair is {{prompt, chosen, rejected}} "
            "or chosen/rejected as whole conversations",
        )
    if chosen == rejected:
        raise InvalidField(
            "rejected", "'chosen' and 'rejected' are the same answer: the pair teaches nothing"
        )
    return PreferencePair(_to_messages(prompt), chosen, rejected)


def parse_binary(record: Any) -> BinaryExample:
    if not isinstance(record, dict):
        raise InvalidField(None, f"a record must be an object with named fields, got {type_name(record)}")
    record = preference_record(record) or record  # a prepared `format: feedback` example
    prompt = _prompt(record)
    completion = _answer(record, "completion")
    label = record.get("label", _MISSING)
    if label is _MISSING:
        raise InvalidField("label", "missing field 'label'")
    if not isinstance(label, bool):
        raise InvalidField(
            "label", f"'label' must be true or false (a JSON boolean), got {type_name(label)} {label!r}"
        )
    return BinaryExample(_to_messages(prompt), completion, label)


def read_preferences(
    path: str | Path, kind: str = "pairs", *, strict: bool = False
) -> Iterator[PreferencePair | BinaryExample | Rejected]:
    """Stream one file's records as pairs (`kind="pairs"`) or KTO examples (`kind="binary"`), and Rejected
    for the bad ones; `strict` raises a DataError at the first. File-level problems always raise."""
    if kind not in ("pairs", "binary"):
        raise ValueError(f"kind must be 'pairs' or 'binary', got {kind!r}")
    p = Path(path)
    reader = check_file(p)
    if reader == "text":
        raise DataError(f"a {p.suffix} file is raw text; preference records need named fields", path=str(p))
    parse = parse_pair if kind == "pairs" else parse_binary
    seen = 0
    for item in READERS[reader](p):
        seen += 1
        if item.reason is None:
            try:
                example = parse(item.record)
            except InvalidField as exc:
                bad = Rejected(str(p), item.line, exc.field, exc.reason, item.record)
            else:
                example.source, example.line = str(p), item.line
                yield example
                continue
        else:
            bad = Rejected(str(p), item.line, item.field, item.reason, item.record)
        if strict:
            raise DataError(bad.reason, path=bad.source, line=bad.line, field=bad.field)
        yield bad
    if seen == 0:
        if strict:
            raise DataError("empty file: no records", path=str(p))
        yield Rejected(str(p), None, None, "empty file: no records", None)


# ------------------------------------------------------------------------------ tokenizing


def encode_answer(
    template,
    prompt: list[Message],
    answer: str,
    *,
    max_length: int | None = None,
    source: str = "",
    line: int | None = None,
    field: str = "chosen",
) -> dict[str, list[int]]:
    """input_ids and labels of prompt + answer with the SFT template; only the answer is labelled.

    Raises DataError (naming `field`) when the pair is over max_length or when the template's tokens
    for the prompt are not a prefix of those for the whole (a merge across the boundary)."""
    conv = Conversation([*prompt, Message("assistant", answer)], source, line)
    enc = template.encode(conv)
    prompt_ids = template.encode_prompt(prompt)
    if enc.input_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(
            "the prompt's tokens are not a prefix of prompt + answer with this template",
            path=source,
            line=line,
            field=field,
        )
    labels = [IGNORE_INDEX] * len(prompt_ids) + enc.labels[len(prompt_ids) :]
    if all(t == IGNORE_INDEX for t in labels):
        raise DataError("no answer tokens to train on", path=source, line=line, field=field)
    if max_length is not None and len(enc.input_ids) > max_length:
        raise DataError(
            f"{len(enc.input_ids)} tokens is over data.max_length={max_length}",
            path=source,
            line=line,
            field=field,
        )
    return {"input_ids": enc.input_ids, "labels": labels}


def tokenize_pair(template, pair: PreferencePair, *, max_length: int | None = None) -> dict[str, list[int]]:
    """A row for `preference.pair_batch`: chosen_* and rejected_* input_ids and labels."""
    row: dict[str, list[int]] = {}
    for key, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        enc = encode_answer(
            template,
            pair.prompt,
            answer,
            max_length=max_length,
            source=pair.source,
            line=pair.line,
            field=key,
        )
        row[f"{key}_input_ids"], row[f"{key}_labels"] = enc["input_ids"], enc["labels"]
    return row


def tokenize_binary(template, example: BinaryExample, *, max_length: int | None = None) -> dict[str, Any]:
    enc = encode_answer(
        template,
        example.prompt,
        example.completion,
        max_length=max_length,
        source=example.source,
        line=example.line,
        field="completion",
    )
    return {**enc, "label": example.label}


def kl_rows(rows: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """KTO's mismatched pairs for the KL reference point: each prompt with the previous example's
    completion (TRL's cycling, completions[-1:] + completions[:-1]; TRL cycles within a batch, we cycle
    over the whole split once, so the pairs are fixed and their reference log-probs can be precomputed)."""
    prompts = [(r["input_ids"][: _first_label(r)], r["input_ids"][_first_label(r) :]) for r in rows]
    out = []
    for i, (prompt_ids, _) in enumerate(prompts):
        completion = prompts[i - 1][1]
        out.append(
            {"input_ids": prompt_ids + completion, "labels": [IGNORE_INDEX] * len(prompt_ids) + completion}
        )
    return out


def _first_label(row: dict[str, Any]) -> int:
    return next(i for i, t in enumerate(row["labels"]) if t != IGNORE_INDEX)


# ------------------------------------------------------------------------------ the job's data


@dataclass
class PreparedPreferences:
    """Tokenized train/validation rows (pair rows or KTO rows), the rejects and a card like SFT's."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    card: dict[str, Any]
    rejects: list[Rejected]
    val_examples: list[PreferencePair | BinaryExample]


def _as_conversation(example: PreferencePair | BinaryExample) -> Conversation:
    """For the content hash that splits the data: the prompt and every answer, so a pair is one unit."""
    answers = (
        [example.chosen, example.rejected] if isinstance(example, PreferencePair) else [example.completion]
    )
    extra = [] if isinstance(example, PreferencePair) else [Message("system", str(example.label))]
    return Conversation([*example.prompt, *(Message("assistant", a) for a in answers), *extra])


def answer_conversation(example: PreferencePair | BinaryExample) -> Conversation:
    """The prompt and the preferred (or the KTO) answer: what val.jsonl holds for eval's references."""
    answer = example.chosen if isinstance(example, PreferencePair) else example.completion
    return Conversation([*example.prompt, Message("assistant", answer)], example.source, example.line)


def _with_system(
    example: PreferencePair | BinaryExample, system: str | None
) -> PreferencePair | BinaryExample:
    if system and example.prompt[0].role != "system":
        example.prompt = [Message("system", system), *example.prompt]
    return example


def _read_sources(
    sources, kind: str, strict: bool, rejects: list[Rejected]
) -> list[PreferencePair | BinaryExample]:
    from llamaforge.train.data import source_path

    out: list[PreferencePair | BinaryExample] = []
    for src in sources:
        taken = 0
        examples: list[PreferencePair | BinaryExample] = []
        for item in read_preferences(source_path(src), kind, strict=strict):
            if isinstance(item, Rejected):
                rejects.append(item)
                continue
            examples.append(item)
            taken += 1
            if src.max_samples is not None and taken >= src.max_samples:
                break
        out.extend(examples * src.repeat)
    return out


def prepare_preferences(cfg, kind: str, template) -> PreparedPreferences:
    """The job's data sources (DataConfig) as preference rows: the system prompt applied, split by content
    hash like SFT data (a repeated record never straddles the split), tokenized with the SFT template."""
    import hashlib

    from llamaforge.data.split import content_hash, split_records
    from llamaforge.train.data import source_card

    if cfg.prepared:
        raise ConfigError(
            "data.prepared holds conversations; preference objectives read their pairs or labelled "
            "completions from data.sources (and data.val_sources)"
        )
    rejects: list[Rejected] = []
    examples = _read_sources(cfg.sources, kind, cfg.strict, rejects)
    if cfg.val_sources:
        train, val = examples, _read_sources(cfg.val_sources, kind, cfg.strict, rejects)
    else:
        train, val = split_records(examples, cfg.val_size, _as_conversation)
    tokenize = tokenize_pair if kind == "pairs" else tokenize_binary

    def rows_of(part, kept):
        rows = []
        for e in part:
            try:
                rows.append(tokenize(template, _with_system(e, cfg.system_prompt), max_length=cfg.max_length))
            except DataError as exc:
                if cfg.strict:
                    raise
                rejects.append(Rejected(exc.path or e.source, exc.line, exc.field, exc.reason, asdict(e)))
                continue
            kept.append(e)
        return rows

    val_kept: list[PreferencePair | BinaryExample] = []
    train_rows, val_rows = rows_of(train, []), rows_of(val, val_kept)
    if not train_rows:
        raise DataError("no usable preference records in data.sources (see rejects.jsonl for why)")
    if kind == "binary":  # fixed mismatched pairs, so the KL reference point can be precomputed too
        for part in (train_rows, val_rows):
            for row, kl in zip(part, kl_rows(part)):
                row["kl_input_ids"], row["kl_labels"] = kl["input_ids"], kl["labels"]
    digest = hashlib.sha256()
    for split, part in (("train", train), ("val", val)):
        for e in part:
            digest.update(f"{split}\t{content_hash(_as_conversation(e))}\n".encode())
    card = {
        "sha256": digest.hexdigest(),
        "kind": kind,
        "sources": [source_card(s) for s in cfg.sources],
        "val_sources": [source_card(s) for s in cfg.val_sources],
        "template": template.name,
        "train_records": len(train_rows),
        "val_records": len(val_rows),
        "rejected": len(rejects),
    }
    return PreparedPreferences(train_rows, val_rows, card, rejects, val_kept)
