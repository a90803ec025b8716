"""Blind A/B human grading of eval outputs, stored with the eval results.

An expert sees a prompt (and its reference) with two candidates' answers in an order drawn per
(results folder, example, grader) from a hash, so neither the page nor its URLs say which model
wrote which answer; the server maps "answer 1 / answer 2" back to candidates when the grade is
saved. Grades are appended to <eval dir>/human_grades.jsonl (one line per judgement, never
rewritten); the eval page shows each pair's win rate with a Wilson interval and per-criterion
means, and the non-tie judgements export as preference data (prompt, chosen, rejected).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from llamaforge.errors import ConfigError

GRADES = "human_grades.jsonl"
CRITERIA = ("correctness", "completeness", "format")
SCALE = (1, 2, 3, 4, 5)


def order(folder: Path, index: int, a: str, b: str, grader: str) -> tuple[str, str]:
    """(first shown, second shown) for this example and grader: a fixed coin flip from a hash."""
    digest = hashlib.sha256(f"{folder.name}\0{index}\0{a}\0{b}\0{grader}".encode()).digest()
    return (a, b) if digest[0] % 2 == 0 else (b, a)


def read_grades(folder: Path) -> list[dict]:
    path = folder / GRADES
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def next_example(rows: list[dict], grades: list[dict], a: str, b: str, grader: str) -> dict | None:
    """The first example both candidates answered that this grader has not judged for this pair."""
    done = {g["index"] for g in grades if g["grader"] == grader and set(g["candidates"]) == {a, b}}
    return next((r for r in rows if r["index"] not in done and a in r["outputs"] and b in r["outputs"]), None)


def record(
    folder: Path,
    rows: list[dict],
    *,
    index: int,
    a: str,
    b: str,
    grader: str,
    preferred: str,
    scores: dict[str, dict[str, int]],
) -> dict:
    """Save one judgement. `preferred` is "1", "2" or "tie"; `scores` maps "1"/"2" to criterion -> 1..5."""
    if not grader.strip():
        raise ConfigError("grader: give your name or initials (grades are kept per grader)")
    if a == b:
        raise ConfigError("choose two different candidates")
    row = next((r for r in rows if r["index"] == index), None)
    if row is None or a not in row["outputs"] or b not in row["outputs"]:
        raise ConfigError(f"example {index} has no answers from both {a} and {b}")
    if preferred not in ("1", "2", "tie"):
        raise ConfigError("preferred must be 1, 2 or tie")
    shown = order(folder, index, a, b, grader)
    criteria: dict[str, dict[str, int]] = {}
    for slot, name in (("1", shown[0]), ("2", shown[1])):
        given = scores.get(slot) or {}
        for criterion in CRITERIA:
            value = given.get(criterion)
            if value not in SCALE:
                raise ConfigError(f"answer {slot}: {criterion} must be a grade from 1 to 5")
        criteria[name] = {c: int(given[c]) for c in CRITERIA}
    grade = {
        "index": index,
        "candidates": [a, b],
        "shown": list(shown),
        "grader": grader.strip(),
        "preferred": "tie" if preferred == "tie" else shown[int(preferred) - 1],
        "criteria": criteria,
        "time": time.time(),
    }
    with (folder / GRADES).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(grade, ensure_ascii=False) + "\n")
    return grade


def wilson(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (ties count half a win)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summary(grades: list[dict]) -> list[dict]:
    """Per pair (in the order first graded): judgements, wins, ties, B's win rate over A with its 95%
    Wilson interval, and each candidate's mean per criterion."""
    pairs: dict[tuple[str, str], list[dict]] = {}
    for g in grades:
        pairs.setdefault(tuple(g["candidates"]), []).append(g)
    out = []
    for (a, b), items in pairs.items():
        n = len(items)
        wins_b = sum(g["preferred"] == b for g in items)
        wins_a = sum(g["preferred"] == a for g in items)
        ties = n - wins_a - wins_b
        rate = (wins_b + 0.5 * ties) / n
        means = {
            cand: {c: sum(g["criteria"][cand][c] for g in items) / n for c in CRITERIA} for cand in (a, b)
        }
        out.append(
            {
                "a": a,
                "b": b,
                "n": n,
                "wins_a": wins_a,
                "wins_b": wins_b,
                "ties": ties,
                "win_rate_b": rate,
                "interval": wilson(wins_b + 0.5 * ties, n),
                "means": means,
                "graders": sorted({g["grader"] for g in items}),
            }
        )
    return out


def preferences(grades: list[dict], rows: list[dict]) -> list[dict]:
    """Non-tie judgements as preference data: prompt, chosen, rejected (+ where they came from)."""
    by_index = {r["index"]: r for r in rows}
    out = []
    for g in grades:
        if g["preferred"] == "tie" or g["index"] not in by_index:
            continue
        row = by_index[g["index"]]
        loser = next(c for c in g["candidates"] if c != g["preferred"])
        out.append(
            {
                "prompt": row["prompt"],
                "chosen": row["outputs"][g["preferred"]]["output"],
                "rejected": row["outputs"][loser]["output"],
                "chosen_model": g["preferred"],
                "rejected_model": loser,
                "grader": g["grader"],
                "index": g["index"],
            }
        )
    return out
