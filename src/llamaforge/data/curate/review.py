"""Step 10, review: a stratified sample (plus every record held for review) exported as
review.csv for domain experts, and `--apply-review reviewed.csv` to apply their verdicts.

Verdicts: `accept` (kept as is; a held record joins its split), `reject` (moved to rejects.jsonl
with the reviewer's note), `edit` (edited_prompt / edited_answer replace the last user / assistant
message), or empty (no decision). After applying, the splits, Arrow copies, report and card are
rewritten, so the card's sha256 always matches the data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from llamaforge.data.curate.config import ReviewConfig, SplitConfig
from llamaforge.data.curate.records import answer_text, prompt_text
from llamaforge.data.curate.split import stratum_of
from llamaforge.data.split import SPLITS, content_hash, content_unit, split_of
from llamaforge.data.types import Conversation
from llamaforge.errors import DataError

COLUMNS = [
    "id",
    "kind",
    "split",
    "stratum",
    "source",
    "line",
    "reason",
    "prompt",
    "answer",
    "verdict",
    "edited_prompt",
    "edited_answer",
    "note",
]
VERDICTS = ("accept", "reject", "edit", "")
HELD = "held_for_review.jsonl"
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection): such cells
# get a leading apostrophe on export, taken off again on --apply-review. Cells that already start
# with apostrophes before one of them get one more, so that the round trip is exact.
_FORMULA = re.compile(r"^'*[=+\-@\t\r]")
_ESCAPED = re.compile(r"^'+[=+\-@\t\r]")


def neutralise(cell: Any) -> Any:
    """The cell as written to review.csv: text a spreadsheet would evaluate gets a leading apostrophe."""
    return "'" + cell if isinstance(cell, str) and _FORMULA.match(cell) else cell


def restore(cell: str) -> str:
    """The inverse of `neutralise`, for cells read back from a reviewed CSV."""
    return cell[1:] if _ESCAPED.match(cell) else cell


def _rank(rid: str, seed: int) -> str:
    return hashlib.blake2b(f"{seed}:{rid}".encode(), digest_size=8).hexdigest()


def _iter_split(out: Path, split: str):
    p = out / f"{split}.jsonl"
    if not p.is_file():
        return
    seen: set[str] = set()
    with p.open(encoding="utf-8") as f:
        for line in f:
            conv = Conversation.from_dict(json.loads(line))
            rid = conv.meta.get("id") or content_hash(conv)
            if rid in seen:  # a repeated (upsampled) record is reviewed once
                continue
            seen.add(rid)
            yield rid, conv


def _iter_held(out: Path):
    p = out / HELD
    if not p.is_file():
        return
    with p.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            conv = Conversation.from_dict(row["record"])
            yield content_hash(conv), conv, row.get("reason", "")


def export_review(out: Path, cfg: ReviewConfig) -> dict[str, Any]:
    strata: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for split in SPLITS:
        for rid, conv in _iter_split(out, split):
            s = split if cfg.stratify_by == "split" else stratum_of(conv, cfg.stratify_by)
            strata[s].append((_rank(rid, cfg.seed), rid))
    total = sum(len(v) for v in strata.values())
    chosen: set[str] = set()
    if total:
        size = min(cfg.sample_size, total)
        # proportional allocation, at least one per stratum while the budget lasts
        alloc = {s: max(1, math.floor(size * len(v) / total)) for s, v in strata.items()}
        while sum(alloc.values()) > size:
            biggest = max(alloc, key=lambda s: alloc[s])
            alloc[biggest] -= 1
        for s, v in sorted(strata.items()):
            v.sort()
            chosen.update(rid for _, rid in v[: alloc[s]])
    rows = 0
    per_stratum: Counter[str] = Counter()
    with (out / "review.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for rid, conv, reason in _iter_held(out):
            w.writerow(_row(rid, conv, "held", "", cfg, reason))
            rows += 1
        for split in SPLITS:
            for rid, conv in _iter_split(out, split):
                if rid in chosen:
                    row = _row(rid, conv, "sample", split, cfg, "")
                    per_stratum[restore(row["stratum"])] += 1
                    w.writerow(row)
                    rows += 1
    return {"file": "review.csv", "rows": rows, "sampled": len(chosen), "per_stratum": dict(per_stratum)}


def _row(
    rid: str, conv: Conversation, kind: str, split: str, cfg: ReviewConfig, reason: str
) -> dict[str, Any]:
    stratum = split if cfg.stratify_by == "split" else stratum_of(conv, cfg.stratify_by)
    row = {
        "id": rid,
        "kind": kind,
        "split": split,
        "stratum": stratum,
        "source": conv.source,
        "line": conv.line,
        "reason": reason,
        "prompt": prompt_text(conv),
        "answer": answer_text(conv),
        "verdict": "",
        "edited_prompt": "",
        "edited_answer": "",
        "note": "",
    }
    return {k: neutralise(v) for k, v in row.items()}


def read_verdicts(path: Path) -> dict[str, dict[str, str]]:
    from llamaforge.data.readers import require_regular

    if path.exists():
        require_regular(path, "a review CSV")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError("review file not found", path=str(path)) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 at byte {exc.start}; save the CSV as UTF-8", path=str(path)) from None
    except OSError as exc:
        raise DataError(f"cannot read the file: {exc.strerror or exc}", path=str(path)) from None
    reader = csv.DictReader(text.splitlines(keepends=True))
    missing = [c for c in ("id", "verdict") if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"the review CSV lacks the column(s) {', '.join(missing)}", path=str(path))
    verdicts: dict[str, dict[str, str]] = {}
    for raw in reader:
        line = reader.line_num
        row = {k: restore(v) if isinstance(v, str) else v for k, v in raw.items()}
        verdict = (row.get("verdict") or "").strip().lower()
        if verdict not in VERDICTS:
            raise DataError(
                f"unknown verdict {verdict!r}; expected accept, reject, edit or empty",
                path=str(path),
                line=line,
                field="verdict",
            )
        edited = (row.get("edited_prompt") or "").strip() or (row.get("edited_answer") or "").strip()
        if verdict == "edit" and not edited:
            raise DataError("verdict 'edit' needs edited_prompt or edited_answer", path=str(path), line=line)
        if verdict:
            verdicts[(row.get("id") or "").strip()] = {
                **{k: (v or "") for k, v in row.items() if k},
                "_line": str(line),
            }
    return verdicts


def _edit(conv: Conversation, row: dict[str, str]) -> None:
    for role, key in (("user", "edited_prompt"), ("assistant", "edited_answer")):
        new = row.get(key, "").strip()
        if not new:
            continue
        for m in reversed(conv.messages):
            if m.role == role:
                m.content = new
                break
        else:
            raise DataError(f"cannot apply {key}: the record has no {role} message", line=int(row["_line"]))


def apply_review(out: Path, csv_path: Path, split_cfg: SplitConfig | None = None) -> dict[str, Any]:
    out, csv_path = Path(out), Path(csv_path)
    if not (out / "report.json").is_file():
        raise DataError(
            "not a prepared dataset folder (no report.json); run llamaforge prepare first", path=str(out)
        )
    verdicts = read_verdicts(csv_path)
    # applied to a copy beside the folder, renamed into place at the end: a kill midway leaves the
    # dataset as it was, never half-reviewed splits under a card that no longer matches them
    from llamaforge.atomic import remove_path, swap_into_place, tmp_sibling

    work = tmp_sibling(out)
    try:
        shutil.copytree(out, work, symlinks=True)
        summary = _apply(work, csv_path, verdicts, split_cfg)
        swap_into_place(work, out)
    finally:
        remove_path(work)
    return summary


def _apply(
    out: Path, csv_path: Path, verdicts: dict[str, dict[str, str]], split_cfg: SplitConfig | None
) -> dict[str, Any]:
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    if split_cfg is None:
        prep = json.loads((out / "config.json").read_text(encoding="utf-8")).get("prepare", {})
        split_cfg = SplitConfig.model_validate(prep.get("split", {}))
    found: set[str] = set()
    counts: Counter[str] = Counter()
    new_files: dict[str, list[str]] = {s: [] for s in SPLITS}
    rejected_rows: list[str] = []

    def decide(rid: str, conv: Conversation) -> bool:
        """Apply the verdict on `rid`, if any; True to keep the record."""
        row = verdicts.get(rid)
        if row is None:
            return True
        found.add(rid)
        v = row["verdict"].strip().lower()
        counts[v] += 1
        note = row.get("note", "").strip()
        if v == "reject":
            rejected_rows.append(
                json.dumps(
                    {
                        "step": "review",
                        "source": conv.source,
                        "line": conv.line,
                        "field": None,
                        "reason": "review: rejected" + (f" ({note})" if note else ""),
                        "record": conv.to_dict(),
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
            return False
        if v == "edit":
            _edit(conv, row)
            conv.meta["review"] = "edited"
            conv.meta["id"] = content_hash(conv)
        else:
            conv.meta["review"] = "accepted"
        if note:
            conv.meta["review_note"] = note
        return True

    for split in SPLITS:
        p = out / f"{split}.jsonl"
        if not p.is_file():
            continue
        decided: dict[str, tuple[bool, str]] = {}
        with p.open(encoding="utf-8") as f:
            for line in f:
                conv = Conversation.from_dict(json.loads(line))
                rid = conv.meta.get("id") or content_hash(conv)
                if rid not in decided:  # a repeated (upsampled) record gets one decision
                    keep = decide(rid, conv)
                    decided[rid] = (keep, json.dumps(conv.to_dict(), ensure_ascii=False) + "\n")
                keep, text = decided[rid]
                if keep:
                    new_files[split].append(text)
    still_held: list[str] = []
    held_path = out / HELD
    if held_path.is_file():
        for line in held_path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            conv = Conversation.from_dict(row["record"])
            rid = content_hash(conv)
            if rid not in verdicts:
                still_held.append(line + "\n")
                continue
            if decide(rid, conv):
                conv.meta["id"] = content_hash(conv)
                split = (
                    split_of(content_unit(conv, split_cfg.seed), split_cfg.val, split_cfg.test)
                    if split_cfg.enabled
                    else "train"
                )
                new_files[split].append(json.dumps(conv.to_dict(), ensure_ascii=False) + "\n")
                counts["held_released"] += 1
    unknown = sorted(set(verdicts) - found)
    if unknown:
        first = verdicts[unknown[0]]["_line"]
        raise DataError(
            f"{len(unknown)} reviewed id(s) are not in the prepared data (first: {unknown[0]!r}); "
            "nothing was changed",
            path=str(csv_path),
            line=int(first),
            field="id",
        )
    with (out / "rejects.jsonl").open("a", encoding="utf-8") as f:
        f.writelines(rejected_rows)
    for split, lines in new_files.items():
        (out / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    if held_path.is_file():
        held_path.write_text("".join(still_held), encoding="utf-8")
    from llamaforge.data.curate.report import render_html, save_arrow, write_card

    if report.get("arrow"):
        (out / ".work").mkdir(exist_ok=True)
        report["arrow"] = save_arrow(out)
        shutil.rmtree(out / ".work", ignore_errors=True)
    summary = {
        "file": str(csv_path),
        "verdicts": dict(counts),
        "splits": {s: len(v) for s, v in new_files.items()},
    }
    report.setdefault("reviews", []).append(summary)
    report["splits"] = summary["splits"]
    report["records_out"] = sum(summary["splits"].values())
    report["held_for_review"] = len(still_held)
    report["rejected"] = report.get("rejected", 0) + len(rejected_rows)
    (out / "report.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False, default=str), encoding="utf-8"
    )
    (out / "report.html").write_text(render_html(report), encoding="utf-8")
    card = write_card(out)
    summary["dataset_sha256"] = card["dataset_sha256"]
    return summary
