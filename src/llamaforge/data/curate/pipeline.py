"""`llamaforge prepare`: sources -> normalise -> filters -> PII -> dedup -> contradictions ->
decontaminate -> split -> outputs, streaming in batches.

Phase 1 streams every record through the steps once, writing rejects as they happen and the
survivors to a spool file; steps that only later learn that an earlier survivor must go
(`dedup` with keep=longest, `contradictions`) *retract* it by index. Phase 2 reads the spool,
skips retracted records, assigns splits and writes the outputs. Memory holds hashes and
signatures, not records.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llamaforge.atomic import building_folder, check_not_input, check_replaceable
from llamaforge.data.curate import report as report_mod
from llamaforge.data.curate.config import PrepareConfig
from llamaforge.data.curate.contradictions import Contradictions
from llamaforge.data.curate.decontam import Decontaminator
from llamaforge.data.curate.dedup import Dedup
from llamaforge.data.curate.filters import Filters
from llamaforge.data.curate.normalize import Normalizer
from llamaforge.data.curate.pii import PIIStep
from llamaforge.data.curate.records import Item
from llamaforge.data.curate.review import export_review
from llamaforge.data.curate.split import stratified_assignment, stratum_of
from llamaforge.data.jsonsafe import json_line
from llamaforge.data.split import SPLITS, content_hash, content_unit, split_of
from llamaforge.data.types import Conversation, Rejected
from llamaforge.errors import DataError
from llamaforge.schema import DataSource

log = logging.getLogger("llamaforge.prepare")

SNIPPET = 160


def _category(reason: str) -> str:
    head = reason.split(":", 1)[0] if ":" in reason[:40] else reason
    return head.split(" (", 1)[0].split(" of #", 1)[0].strip()


def _snippet(conv: Conversation) -> str:
    text = " | ".join(m.content for m in conv.messages)
    return text[:SNIPPET] + ("…" if len(text) > SNIPPET else "")


def resolve_source_path(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = base_dir / p
    if p.exists():
        return p
    from llamaforge import catalog

    if path in catalog.CATALOG and catalog.CATALOG[path].kind == "dataset":
        return catalog.resolve(path)
    return p  # read_source reports it missing


class StepStats:
    def __init__(self) -> None:
        self.seen = 0
        self.passed = 0
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.reasons: Counter[str] = Counter()
        self.categories: Counter[str] = Counter()

    def to_dict(self) -> dict[str, Any]:
        rejected = sum(self.categories.values())
        return {
            "in": self.seen,
            "out": self.passed,
            "rejected": rejected,
            "records_per_s": round(self.seen / self.seconds, 1) if self.seconds > 0 else None,
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "by_reason": dict(self.categories.most_common()),
            "top_reasons": dict(self.reasons.most_common(10)),
        }


class Pipeline:
    def __init__(
        self,
        cfg: PrepareConfig,
        sources: list[DataSource],
        *,
        base_dir: str | Path = ".",
        tokenizer: Any = None,
        teacher: Any = None,
        job: dict[str, Any] | None = None,
        out_dir: str | Path | None = None,
        protect: Iterable[str | Path] = (),
    ):
        self.cfg = cfg
        self.sources = list(sources)
        self.base_dir = Path(base_dir)
        self.tokenizer = tokenizer
        self.teacher = teacher
        self.job = job or {}
        self.protect = list(protect)  # more inputs (the job file) the output must not hold
        out = Path(out_dir if out_dir is not None else cfg.output_dir)
        self.out = out if out.is_absolute() else self.base_dir / out
        self.stats: dict[str, StepStats] = defaultdict(StepStats)
        self.retracted: dict[int, tuple[str, str]] = {}
        self.annotations: dict[int, dict[str, Any]] = defaultdict(dict)
        self.snippets: dict[int, str] = {}
        self.source_files: dict[str, dict[str, Any]] = {}
        self.warnings: list[str] = []
        self.lengths_in = (array("i"), array("i"))
        self.lengths_out = (array("i"), array("i"))
        self.rejects_n = 0
        self.held_n = 0

    # ------------------------------------------------------------------ helpers for steps
    def retract(self, idx: int, step: str, reason: str) -> None:
        self.retracted.setdefault(idx, (step, reason))

    def annotate(self, idx: int, key: str, value: Any) -> None:
        self.annotations[idx][key] = value

    # ------------------------------------------------------------------ input
    def _inputs(self) -> list[Path]:
        """Every file or folder the job reads: the output folder may be none of them, nor contain one."""
        cfg = self.cfg
        paths = [resolve_source_path(s.path, self.base_dir) for s in self.sources]
        paths += [resolve_source_path(s.path, self.base_dir) for s in cfg.decontaminate.eval_sources]
        for pattern in cfg.synth.documents if cfg.synth.enabled else []:
            parts = Path(pattern).parts
            fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
            paths.append(self.base_dir / Path(*parts[:fixed]) if fixed else self.base_dir)
        for extra in (cfg.filters.tokenizer, cfg.filters.profanity_file):
            if extra:
                paths.append(self.base_dir / Path(extra).expanduser())
        return paths + [Path(p) for p in self.protect]

    def _check_out_dir(self) -> None:
        """Refuse an output folder that would lose anything: see `llamaforge.atomic`."""
        check_not_input(self.out, self._inputs(), "output folder")
        check_replaceable(
            self.out,
            overwrite=self.cfg.overwrite,
            what="output folder",
            hint="; set prepare.overwrite=true or choose another prepare.output_dir",
            empty_ok=True,
        )

    def _read(self, src: DataSource) -> Iterator[Conversation | Rejected]:
        from llamaforge.catalog import sha256_file
        from llamaforge.data.formats import read_source

        path = resolve_source_path(src.path, self.base_dir)
        feedback = src.feedback if src.format == "feedback" else None
        stream = read_source(path, src.format, variables=dict(src.variables) or None, feedback=feedback)
        self.source_files[src.path] = {
            "path": str(path),
            "format": src.format,
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "repeat": src.repeat,
            "max_samples": src.max_samples,
            "records": 0,
            "unreadable": 0,
        }
        if feedback is not None:  # which log, which window, which examples
            self.source_files[src.path]["feedback"] = feedback.model_dump()
        info = self.source_files[src.path]
        good = 0
        for rec in stream:
            if isinstance(rec, Rejected):
                info["unreadable"] += 1
                yield rec
                continue
            if src.max_samples is not None and good >= src.max_samples:
                break
            good += 1
            info["records"] += 1
            rec.meta.setdefault("source_name", src.path)
            if src.repeat > 1:
                rec.meta["repeat"] = src.repeat
            yield rec

    def _records(self) -> Iterator[Conversation | Rejected]:
        for src in self.sources:
            yield from self._read(src)
        if self.cfg.synth.enabled:
            from llamaforge.data.curate.synth import synthesize

            synth_stats = self.stats["synth"]
            t0 = time.perf_counter()
            for rec in synthesize(
                self.cfg.synth, teacher=self.teacher, base_dir=self.base_dir, info=self.source_files
            ):
                synth_stats.seen += 1
                if isinstance(rec, Rejected):
                    synth_stats.categories[_category(rec.reason)] += 1
                    synth_stats.reasons[rec.reason] += 1
                else:
                    synth_stats.passed += 1
                yield rec
            synth_stats.seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ run
    def build_steps(self) -> list[tuple[str, Any]]:
        cfg = self.cfg
        steps: list[tuple[str, Any]] = []
        if cfg.normalize.enabled:
            steps.append(("normalize", Normalizer(cfg.normalize)))
        if cfg.filters.enabled:
            self.filters = Filters(cfg.filters, tokenizer=self.tokenizer)
            self.warnings += self.filters.warnings
            steps.append(("filters", self.filters))
        if cfg.pii.enabled:
            steps.append(("pii", PIIStep(cfg.pii)))
        if cfg.dedup.enabled and (cfg.dedup.exact or cfg.dedup.near):
            steps.append(("dedup", Dedup(cfg.dedup, self.retract)))
        if cfg.contradictions.enabled:
            steps.append(("contradictions", Contradictions(cfg.contradictions, self.retract, self.annotate)))
        if cfg.decontaminate.enabled:
            steps.append(("decontaminate", Decontaminator(cfg.decontaminate, self._eval_records())))
        return steps

    def _eval_records(self) -> Iterable[tuple[str, Conversation | Rejected]]:
        from llamaforge.data.formats import read_source

        for src in self.cfg.decontaminate.eval_sources:
            path = resolve_source_path(src.path, self.base_dir)
            for i, rec in enumerate(read_source(path, src.format, variables=dict(src.variables) or None)):
                if src.max_samples is not None and i >= src.max_samples:
                    break
                yield src.path, rec

    def _held(self, step: str) -> bool:
        return step == "contradictions" and self.cfg.contradictions.action == "review"

    def run(self) -> dict[str, Any]:
        """Everything is written into a temporary folder beside the output, renamed into place at the
        end: a run killed midway leaves the previous dataset (or none), never half of one."""
        t_start = time.perf_counter()
        self._check_out_dir()
        self.final_out = self.out
        with building_folder(self.final_out, "prepare") as tmp:
            self.out = tmp
            try:
                report = self._run_into(t_start)
            finally:
                self.out = self.final_out
        return report

    def _run_into(self, t_start: float) -> dict[str, Any]:
        steps = self.build_steps()
        self.step_objects = dict(steps)
        work = self.out / ".work"
        work.mkdir()
        spool_path = work / "spool.jsonl"
        self._rejects = (self.out / "rejects.jsonl").open("w", encoding="utf-8")
        self._held_f = (self.out / "held_for_review.jsonl").open("w", encoding="utf-8")
        try:
            self._phase1(steps, spool_path)
            splits = self._phase2(spool_path)
        finally:
            self._rejects.close()
            self._held_f.close()
        shutil.rmtree(work, ignore_errors=True)
        elapsed = time.perf_counter() - t_start
        review = None
        if self.cfg.review.enabled and self.cfg.review.sample_size:
            review = export_review(self.out, self.cfg.review)
        return report_mod.write_outputs(self, splits, elapsed, review)

    def _phase1(self, steps: list[tuple[str, Any]], spool_path: Path) -> None:
        with spool_path.open("w", encoding="utf-8") as spool:
            batch: list[Item] = []
            idx = 0
            ingest = self.stats["ingest"]
            t0, c0 = time.perf_counter(), time.process_time()
            for rec in self._records():
                ingest.seen += 1
                if isinstance(rec, Rejected):
                    ingest.categories[_category(rec.reason)] += 1
                    ingest.reasons[rec.reason] += 1
                    self._write_reject({"step": "ingest", **rec.to_dict()})
                    continue
                ingest.passed += 1
                batch.append(Item(idx, rec))
                idx += 1
                if len(batch) >= self.cfg.batch_size:
                    ingest.seconds += time.perf_counter() - t0
                    ingest.cpu_seconds += time.process_time() - c0
                    self._run_batch(batch, steps, spool)
                    batch = []
                    t0, c0 = time.perf_counter(), time.process_time()
            ingest.seconds += time.perf_counter() - t0
            ingest.cpu_seconds += time.process_time() - c0
            if batch:
                self._run_batch(batch, steps, spool)
        self.total_records = idx

    def _write_reject(self, row: dict[str, Any]) -> None:
        self._rejects.write(json_line(row))
        self.rejects_n += 1

    def _reject_row(
        self, conv: Conversation, idx: int, step: str, reason: str, fld: str | None
    ) -> dict[str, Any]:
        return {
            "step": step,
            "source": conv.source,
            "line": conv.line,
            "field": fld,
            "reason": reason,
            "index": idx,
            "record": conv.to_dict(),
        }

    def _run_batch(self, batch: list[Item], steps: list[tuple[str, Any]], spool) -> None:
        for name, step in steps:
            stats = self.stats[name]
            live_before = sum(1 for it in batch if it.reject is None)
            t0, c0 = time.perf_counter(), time.process_time()
            step(batch)
            stats.seconds += time.perf_counter() - t0
            stats.cpu_seconds += time.process_time() - c0
            stats.seen += live_before
            for it in batch:
                if it.reject is not None and it.reject[0] == name and "counted" not in it.cache:
                    it.cache["counted"] = True
                    stats.categories[_category(it.reject[1])] += 1
                    stats.reasons[it.reject[1]] += 1
            stats.passed += sum(1 for it in batch if it.reject is None)
        for it in batch:
            if "prompt_tokens" in it.cache:
                self.lengths_in[0].append(it.cache["prompt_tokens"])
                self.lengths_in[1].append(it.cache["answer_tokens"])
            if it.reject is not None:
                step, reason, fld = it.reject
                row = self._reject_row(it.conv, it.idx, step, reason, fld)
                if step == "dedup" and len(self.snippets) < 5000:
                    self.snippets[it.idx] = _snippet(it.conv)
                if self._held(step):
                    self._held_f.write(json_line(row))
                    self.held_n += 1
                    self.snippets.setdefault(it.idx, _snippet(it.conv))
                else:
                    self._write_reject(row)
                continue
            row = {
                "i": it.idx,
                "c": it.conv.to_dict(),
                "pt": it.cache.get("prompt_tokens"),
                "at": it.cache.get("answer_tokens"),
            }
            spool.write(
                json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"
            )  # readers let only JSON in

    # ------------------------------------------------------------------ phase 2
    def _spool(self, path: Path) -> Iterator[tuple[int, Conversation, int | None, int | None]]:
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                yield row["i"], Conversation.from_dict(row["c"]), row["pt"], row["at"]

    def _phase2(self, spool_path: Path) -> dict[str, int]:
        cfg = self.cfg
        stats = self.stats["split"]
        t0, c0 = time.perf_counter(), time.process_time()
        wanted = set()
        dedup = self.step_objects.get("dedup")
        if dedup is not None:
            wanted.update(k for k in list(dedup.clusters)[:2000])
        contra = self.step_objects.get("contradictions")
        if contra is not None:
            wanted.update(contra.groups)
        assignment: dict[int, str] | None = None
        if cfg.split.enabled and cfg.split.stratify_by:
            entries = [
                (i, stratum_of(c, cfg.split.stratify_by), content_unit(c, cfg.split.seed))
                for i, c, _, _ in self._spool(spool_path)
                if i not in self.retracted
            ]
            assignment = stratified_assignment(entries, cfg.split)
        counts = {s: 0 for s in SPLITS}
        per_source: dict[str, Counter[str]] = defaultdict(Counter)
        files = {s: (self.out / f"{s}.jsonl").open("w", encoding="utf-8") for s in SPLITS}
        try:
            for i, conv, pt, at in self._spool(spool_path):
                if i in wanted:
                    self.snippets[i] = _snippet(conv)
                if i in self.retracted:
                    step, reason = self.retracted[i]
                    row = self._reject_row(conv, i, step, reason, None)
                    if self._held(step):
                        self._held_f.write(json_line(row))
                        self.held_n += 1
                    else:
                        self._write_reject(row)
                    self.stats[step].categories[_category(reason)] += 1
                    self.stats[step].reasons[reason] += 1
                    self.stats[step].passed -= 1
                    continue
                stats.seen += 1
                conv.meta.update(self.annotations.get(i, {}))
                conv.meta["id"] = content_hash(conv)
                if not cfg.split.enabled:
                    split = "train"
                elif assignment is not None:
                    split = assignment[i]
                else:
                    split = split_of(content_unit(conv, cfg.split.seed), cfg.split.val, cfg.split.test)
                repeat = int(conv.meta.get("repeat", 1)) if split == "train" else 1
                line = json.dumps(conv.to_dict(), ensure_ascii=False, allow_nan=False) + "\n"
                for _ in range(repeat):
                    files[split].write(line)
                counts[split] += repeat
                per_source[stratum_of(conv, "source")][split] += 1
                if pt is not None:
                    self.lengths_out[0].append(pt)
                    self.lengths_out[1].append(at)
                stats.passed += 1
        finally:
            for f in files.values():
                f.close()
        stats.seconds += time.perf_counter() - t0
        stats.cpu_seconds += time.process_time() - c0
        self.per_source = {k: dict(v) for k, v in per_source.items()}
        return counts


def run_prepare(cfg: PrepareConfig, sources: list[DataSource], **kwargs: Any) -> dict[str, Any]:
    if not sources and not cfg.synth.enabled:
        raise DataError("nothing to prepare: data.sources is empty and prepare.synth is off")
    return Pipeline(cfg, sources, **kwargs).run()
