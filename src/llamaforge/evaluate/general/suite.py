"""The fixed suite: ten BIG-bench JSON tasks, 100 examples each, chosen by a seeded hash.

The task files come from the `bigbench` sdist on PyPI (one download, each file sha256-checked, cached
under $LLAMAFORGE_HOME by the catalog). Which examples are used depends only on the files and the
seed (the examples whose sha256(seed, task, input) sort first), and the built suite's own sha256 is
checked too, so every machine scores the same 1,000 questions with the same prompts.

Prompts follow BIG-bench's JSON-task conventions: task_prefix, example_input_prefix (default
"\\nQ: "), the choices listed after "\\n  choice: " when append_choices_to_input (default true; in a
fixed shuffled order so the right answer has no favoured position), then example_output_prefix
(default "\\nA: "). The answer is a choice ("choice" tasks: the highest-likelihood choice is the
prediction) or a short target ("answer" tasks: right when the model's greedy continuation is the
target, checked on the same forward pass).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from llamaforge.catalog import CatalogBundle, fetch_bundle
from llamaforge.errors import DataError, LlamaforgeError
from llamaforge.evaluate.config import GENERAL_TASK_NAMES

Kind = Literal["choice", "answer"]


@dataclass(frozen=True)
class TaskSpec:
    name: str  # also the metric suffix: general_<name>
    member: str  # path inside the bigbench sdist
    sha256: str
    kind: Kind
    skill: str


_ROOT = "bigbench/benchmark_tasks"
TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(
        "arithmetic",
        f"{_ROOT}/arithmetic/2_digit_addition/task.json",
        "1dd3e6fd6bc325a0010b21cef74bd94321b991003715e7299eb0cbd29f1d5582",
        "answer",
        "two-digit addition",
    ),
    TaskSpec(
        "plurals",
        f"{_ROOT}/linguistic_mappings/plural_json/task.json",
        "0eadf3c471abe6e27ab1966c9c1f045708e2c9ecf9af3453dcfcf214ef5100de",
        "answer",
        "English plural forms",
    ),
    TaskSpec(
        "sports",
        f"{_ROOT}/sports_understanding/task.json",
        "925617612d19ca02d7b13bfb263300cc13701dca8851151a77be8ce986feadab",
        "choice",
        "common sense (plausibility)",
    ),
    TaskSpec(
        "hindu_knowledge",
        f"{_ROOT}/hindu_knowledge/task.json",
        "33dafd981a47604da25b382859bda9162bd39bef2a5134dc4f4d972c8bdfc402",
        "choice",
        "world knowledge",
    ),
    TaskSpec(
        "misconceptions",
        f"{_ROOT}/misconceptions/task.json",
        "f6091db702cb3f3f699c570f732828283a85dbf137b1e1a65b7bcbbe98ebe6db",
        "choice",
        "truthfulness",
    ),
    TaskSpec(
        "dates",
        f"{_ROOT}/date_understanding/task.json",
        "ff716f0e399109146db3a998281c39954907b78268a9b633a95582d63847822f",
        "choice",
        "date arithmetic",
    ),
    TaskSpec(
        "social_iqa",
        f"{_ROOT}/social_iqa/task.json",
        "edc9f568b70ae6d4af0783764dbe4e4f18aa1242c675a93f534338d73a565348",
        "choice",
        "social reasoning",
    ),
    TaskSpec(
        "physics",
        f"{_ROOT}/physics/task.json",
        "0994a99e5b1466881ecc46e547604e25c1ab05d4de8d07e2c2be93b2cfc76aeb",
        "choice",
        "science (which formula)",
    ),
    TaskSpec(
        "logic",
        f"{_ROOT}/logical_deduction/three_objects/task.json",
        "5e3f4a7569cb70bb1469374d3d34fb7883445a9d5743e1a81fd8dcdaf6fcb40f",
        "choice",
        "logical deduction",
    ),
    TaskSpec(
        "emoji_movie",
        f"{_ROOT}/emoji_movie/task.json",
        "cbcc9f1ff55bfa88815af3a68ac4db8d13cecb5a22cf70d05054f93facf71f50",
        "choice",
        "analogy (emoji to film)",
    ),
)
if tuple(t.name for t in TASKS) != GENERAL_TASK_NAMES:  # the schema names the metrics before loading this
    raise ImportError("evaluate/config.py GENERAL_TASK_NAMES differs from the suite's tasks")
EXAMPLES_PER_TASK = 100
SELECTION_SEED = 0
# sha256 of the built examples (suite_sha256): a change in the files, the selection or the prompt
# format changes it, so numbers measured on different suites are never compared unknowingly.
SUITE_SHA256 = "322078c16369187e5013294785dddeb00a04f86074c7db9b6a55c17e68d3c4bb"

BIGBENCH = CatalogBundle(
    "bigbench-tasks",
    "bigbench==1.0.0",
    {t.member: t.sha256 for t in TASKS},
    True,
    "ten BIG-bench JSON tasks for the general-ability suite (llamaforge eval --suite general)",
)


@dataclass
class SuiteExample:
    task: str
    index: int  # position in the task file's examples
    prompt: str  # BIG-bench text up to the answer, trailing spaces removed (raw prompting)
    choices: list[str]
    correct: list[int]  # indices of the right choices (all targets of an "answer" task)
    kind: Kind


@dataclass
class Suite:
    examples: list[SuiteExample]
    sha256: str
    root: str

    def task_names(self) -> list[str]:
        return list(dict.fromkeys(e.task for e in self.examples))


def suite_sha256(examples: list[SuiteExample]) -> str:
    blob = json.dumps([asdict(e) for e in examples], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _order_key(seed: int, task: str, text: str) -> str:
    return hashlib.sha256(f"{seed}\n{task}\n{text}".encode()).hexdigest()


def _example(spec: TaskSpec, data: dict[str, Any], index: int, raw: Any, seed: int) -> SuiteExample | None:
    """One BIG-bench example as a SuiteExample; None when it does not fit the task's kind."""
    if not isinstance(raw, dict) or not isinstance(raw.get("input"), str):
        return None
    text = raw["input"]
    if spec.kind == "choice":
        scores = raw.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2:
            return None
        choices = list(scores)
        random.Random(_order_key(seed, spec.name, text)).shuffle(choices)
        best = max(float(v) for v in scores.values())
        correct = [i for i, c in enumerate(choices) if float(scores[c]) == best]
        if best <= 0 or len(correct) == len(choices):
            return None
    else:
        target = raw.get("target")
        targets = [target] if isinstance(target, str) else target
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            return None
        choices, correct = list(dict.fromkeys(targets)), list(range(len(dict.fromkeys(targets))))
    prompt = data.get("task_prefix", "") + data.get("example_input_prefix", "\nQ: ") + text
    if spec.kind == "choice" and data.get("append_choices_to_input", True):
        prompt += "".join(data.get("choice_prefix", "\n  choice: ") + c for c in choices)
    prompt += data.get("example_output_prefix", "\nA: ")
    return SuiteExample(spec.name, index, prompt.strip(), choices, correct, spec.kind)


def task_examples(spec: TaskSpec, path: Path, count: int, seed: int) -> list[SuiteExample]:
    """The `count` examples of one task file that the seeded hash orders first (kept in file order)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read BIG-bench task: {exc}", path=str(path)) from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise DataError("a BIG-bench task file needs a list of examples", path=str(path), field="examples")
    usable, seen = [], set()
    for i, raw in enumerate(data["examples"]):
        ex = _example(spec, data, i, raw, seed)
        if ex is not None and ex.prompt not in seen:
            seen.add(ex.prompt)
            usable.append(ex)
    if len(usable) < count:
        raise DataError(
            f"task '{spec.name}' has {len(usable)} usable {spec.kind} examples, the suite needs {count}",
            path=str(path),
            field="examples",
        )
    usable.sort(key=lambda e: _order_key(seed, spec.name, e.prompt))
    return sorted(usable[:count], key=lambda e: e.index)


def build_suite(root: Path, specs: tuple[TaskSpec, ...], count: int, seed: int = SELECTION_SEED) -> Suite:
    examples = [ex for spec in specs for ex in task_examples(spec, Path(root) / spec.member, count, seed)]
    return Suite(examples, suite_sha256(examples), str(root))


def load_suite(tasks: list[str] | None = None, per_task: int = EXAMPLES_PER_TASK) -> Suite:
    """The fixed suite (optionally only some tasks, or the first `per_task` questions of each), its
    files fetched and checked by the catalog."""
    names = [t.name for t in TASKS]
    unknown = [t for t in tasks or [] if t not in names]
    if unknown:
        raise LlamaforgeError(
            f"evaluation.general.tasks: unknown task(s) {', '.join(unknown)}; the suite has {', '.join(names)}"
        )
    suite = build_suite(fetch_bundle(BIGBENCH), TASKS, EXAMPLES_PER_TASK)
    if suite.sha256 != SUITE_SHA256:
        raise LlamaforgeError(
            f"the general suite built from {suite.root} has sha256 {suite.sha256}, expected {SUITE_SHA256}: "
            "its selection or prompt format changed, so its numbers are not comparable with earlier ones"
        )
    kept: dict[str, int] = {}
    examples = []
    for ex in suite.examples:
        if (not tasks or ex.task in tasks) and kept.get(ex.task, 0) < per_task:
            kept[ex.task] = kept.get(ex.task, 0) + 1
            examples.append(ex)
    suite.examples = examples
    return suite
