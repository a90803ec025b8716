"""Evaluate several candidates on one task set and put them side by side.

A candidate is a run directory (its base + adapter), `base:RUN` (the run's base model without the
adapter, prompted with the run's template), a merged or any transformers folder, a .gguf file, or a
catalog name; `quant4:` / `quant8:` load it through bitsandbytes; `name=` names it (default: base,
tuned, or the folder name). Tokenizers are checked against each other before any model loads (a
mismatch makes per-token loss incomparable), then the candidates are loaded ONE AT A TIME, so
memory holds one model: held-out loss/perplexity with the training masks, batched generation,
metrics, the per-example jsonl. Then one table (text, Markdown, JSON, HTML) and the --fail-if gate.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llamaforge.data.types import Message
from llamaforge.errors import ConfigError, LlamaforgeError
from llamaforge.evaluate.candidates import (
    check_same_tokenizers,
    load_candidate,
    load_candidate_tokenizer,
    parse_candidates,
)
from llamaforge.evaluate.compare import Comparison, compare
from llamaforge.evaluate.config import LOSS_METRICS, EvalMetricsConfig, EvaluationConfig, GenerationSettings
from llamaforge.evaluate.rules import RuleResult, evaluate_rules, parse_rule
from llamaforge.evaluate.tasks import Task, load_task
from llamaforge.losses import held_out_loss

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- measuring one candidate


def example_losses(
    model,
    tokenizer,
    template,
    task: Task,
    *,
    precision: str = "auto",
    chunk_size: int = 1024,
    desc: str = "loss",
) -> tuple[list[float], list[int]]:
    """Per example: summed NLL of the reference tokens and their count, masked exactly as in training
    (one example per forward: per-example sums for the bootstrap, and no padding to compute)."""
    from tqdm.auto import tqdm

    from llamaforge.device import autocast_context

    device = next(model.parameters()).device
    rows = []
    for ex in task.examples:
        enc = template.encode(ex.conversation())
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    with tqdm(total=len(rows), desc=desc, unit="ex", dynamic_ncols=True, leave=False) as bar:
        held = held_out_loss(
            model,
            rows,
            tokenizer.pad_token_id,
            chunk_size=chunk_size,
            autocast=lambda: autocast_context(device, precision),
            progress=bar,
        )
    return held.nll, held.targets


def generate_outputs(
    model,
    tokenizer,
    template,
    prompts: list[list[Message]],
    settings: GenerationSettings,
    *,
    desc: str = "generate",
) -> tuple[list[str], dict[str, float]]:
    """Outputs in prompt order, generated in length-sorted batches with a progress bar (examples/s)."""
    from tqdm.auto import tqdm

    from llamaforge.generation import generate

    lengths = [len(template.encode_prompt(p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    outputs = [""] * len(prompts)
    new_tokens = 0
    bar = tqdm(total=len(prompts), desc=desc, unit="ex", dynamic_ncols=True)
    start = time.perf_counter()
    for k, first in enumerate(range(0, len(order), settings.batch_size)):
        chunk = order[first : first + settings.batch_size]
        outs = generate(
            model,
            tokenizer,
            template,
            [prompts[i] for i in chunk],
            max_new_tokens=settings.max_new_tokens,
            batch_size=len(chunk),
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed + k,
            precision=settings.precision,
        )
        for i, out in zip(chunk, outs, strict=True):
            outputs[i] = out
            new_tokens += len(tokenizer(out, add_special_tokens=False)["input_ids"])
        bar.update(len(chunk))
        bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):.1f}")
    bar.close()
    seconds = time.perf_counter() - start
    return outputs, {
        "generate_seconds": round(seconds, 2),
        "examples_per_s": round(len(prompts) / seconds, 3),
        "output_tokens_per_s": round(new_tokens / seconds, 2),
    }


def check_outputs(name: str, outputs: list[str], path: Path) -> list[int]:
    """Some empty outputs score 0 and are counted; ALL empty means the setup is broken, not the model weak."""
    empty = [i for i, o in enumerate(outputs) if not o.strip()]
    if empty and len(empty) == len(outputs):
        raise LlamaforgeError(
            f"candidate '{name}' produced an empty output for all {len(outputs)} examples (see {path}): the model "
            "stops at once. Check its template and stop tokens (a base model prompted with a chat template?), "
            "or raise generation.max_new_tokens."
        )
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        log.warning(
            "candidate '%s': %d empty output(s) (score 0), examples %s; see %s", name, len(empty), shown, path
        )
    return empty


# ---------------------------------------------------------------- the whole evaluation


@dataclass
class CandidateReport:
    name: str
    spec: str
    template: str
    examples_file: str
    load_seconds: float
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalRun:
    table: Comparison
    gate: list[RuleResult]
    out_dir: Path
    candidates: list[CandidateReport]
    task: Task | None  # None: only suites were run
    suite: dict | None = None  # the general suite's sha256, size and prompting, when it ran

    @property
    def failed(self) -> bool:
        return any(r.failed for r in self.gate)


def check_rules(
    rules: list[str], names: list[str], loss: bool, suites: list[str] = (), task: bool = True
) -> None:
    """Unknown candidates, an unmeasured loss or suite in a rule: fail before any model loads."""
    from llamaforge.evaluate.config import GENERAL_METRICS

    for text in rules:
        for cand, metric in parse_rule(text).references():
            if cand not in names:
                raise ConfigError(
                    f"fail_if rule '{text}' names candidate '{cand}'; candidates: {', '.join(names)}"
                )
            if metric in LOSS_METRICS and not (loss and task):
                raise ConfigError(
                    f"fail_if rule '{text}' reads {metric}, but evaluation.loss is off or no task runs"
                )
            if metric in GENERAL_METRICS and "general" not in suites:
                raise ConfigError(
                    f"fail_if rule '{text}' reads {metric}, a metric of the general suite, which is not run: "
                    "pass --suite general or set evaluation.suites: [general]"
                )
            if metric not in GENERAL_METRICS and metric not in LOSS_METRICS and not task:
                raise ConfigError(
                    f"fail_if rule '{text}' reads {metric}, but no task runs (set evaluation.task.path)"
                )


def run_evaluation(
    cfg: EvaluationConfig, out_dir: str | Path, *, extra_rules: list[str] | None = None
) -> EvalRun:
    """Evaluate every candidate, write per-example jsonl + results.{txt,md,json,html} to out_dir."""
    import torch

    from llamaforge.evaluate.compare import write_examples_jsonl
    from llamaforge.evaluate.metrics import compute_metrics
    from llamaforge.evaluate.scores import token_loss_scores

    scoring = EvalMetricsConfig.model_validate(
        {**cfg.scoring.model_dump(), "fail_if": [*cfg.scoring.fail_if, *(extra_rules or [])]}
    )
    cands = parse_candidates(cfg.candidates)
    run_task = cfg.task.path is not None or not cfg.suites
    check_rules(scoring.fail_if, [c.name for c in cands], cfg.loss, cfg.suites, run_task)
    task = load_task(cfg.task) if run_task else None
    suite = None
    if "general" in cfg.suites:
        from llamaforge.evaluate.general.run import score_suite, write_suite_jsonl
        from llamaforge.evaluate.general.suite import load_suite

        suite = load_suite(cfg.general.tasks or None, cfg.general.per_task)
    if len(cands) > 1:
        check_same_tokenizers(cands, [load_candidate_tokenizer(c) for c in cands])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info(
        "evaluating %d candidate(s) on %s: %s",
        len(cands),
        " and ".join(
            ([f"{len(task.examples)} example(s) of {task.path}"] if task else [])
            + ([f"the general suite ({len(suite.examples)} questions)"] if suite else [])
        ),
        ", ".join(f"{c.name} = {c.spec}" for c in cands),
    )
    scored, reports = {}, []
    for c in cands:
        started = time.perf_counter()
        model, tokenizer, template = load_candidate(c, cfg)
        load_s = time.perf_counter() - started
        stats: dict[str, float] = {}
        general = None
        if suite is not None:
            t0 = time.perf_counter()
            general = score_suite(model, tokenizer, template, suite, cfg.general, desc=f"{c.name} general")
            stats["general_seconds"] = round(time.perf_counter() - t0, 2)
            write_suite_jsonl(out_dir / f"{c.name}.general.jsonl", general)
        if task is None:
            del model
            gc.collect()
            scored[c.name] = general.metrics
            reports.append(
                CandidateReport(
                    c.name,
                    c.spec,
                    template.name,
                    str(out_dir / f"{c.name}.general.jsonl"),
                    round(load_s, 2),
                    stats,
                )
            )
            continue
        prompts = [ex.prompt for ex in task.examples]
        references = task.references
        losses = None
        if cfg.loss:
            t0 = time.perf_counter()
            losses = example_losses(
                model,
                tokenizer,
                template,
                task,
                precision=cfg.generation.precision,
                chunk_size=cfg.loss_chunk_size,
                desc=f"{c.name} loss",
            )
            stats["loss_seconds"] = round(time.perf_counter() - t0, 2)
        outputs, gen_stats = generate_outputs(
            model, tokenizer, template, prompts, cfg.generation, desc=c.name
        )
        stats.update(gen_stats)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        scores = compute_metrics(outputs, references, scoring)
        if losses is not None:
            scores.metrics.update(token_loss_scores(*losses))
        path = write_examples_jsonl(
            out_dir / f"{c.name}.jsonl",
            scores,
            outputs,
            references,
            [ex.prompt_record() for ex in task.examples],
        )
        check_outputs(c.name, outputs, path)
        if general is not None:
            scores.metrics.update(general.metrics)
        scored[c.name] = scores
        reports.append(CandidateReport(c.name, c.spec, template.name, str(path), round(load_s, 2), stats))
    table = compare(
        scored, bootstrap_samples=scoring.bootstrap_samples, confidence=scoring.confidence, seed=scoring.seed
    )
    suite_info = None
    if suite is not None:
        suite_info = {
            "sha256": suite.sha256,
            "questions": len(suite.examples),
            "tasks": suite.task_names(),
            "prompt": cfg.general.prompt,
        }
        table.info["general suite"] = (
            f"{len(suite.examples)} BIG-bench questions ({len(suite.task_names())} tasks), {cfg.general.prompt} "
            f"prompts, log-likelihood of the choices; sha256 {suite.sha256[:12]}"
        )
    gate = evaluate_rules(scoring.fail_if, table)
    result = EvalRun(table, gate, out_dir, reports, task, suite_info)
    write_results(result, cfg)
    return result


def write_results(result: EvalRun, cfg: EvaluationConfig) -> None:
    out, table, gate = result.out_dir, result.table, result.gate
    (out / "results.txt").write_text(table.to_text(gate), encoding="utf-8")
    (out / "results.md").write_text(table.to_markdown(gate), encoding="utf-8")
    (out / "results.html").write_text(table.to_html(gate), encoding="utf-8")
    data = json.loads(table.to_json(gate))
    data["run"] = {
        "task": {
            "path": result.task.path,
            "examples": len(result.task.examples),
            "records_in_file": result.task.total_records,
            "skipped_long": result.task.skipped_long,
        }
        if result.task is not None
        else None,
        "general_suite": result.suite,
        "candidates": [asdict(r) for r in result.candidates],
        "generation": cfg.generation.model_dump(),
        "gate_failed": result.failed,
    }
    (out / "results.json").write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
