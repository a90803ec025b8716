"""`llamaforge prepare job.yaml [key=val ...]`: curate `data.sources` into a versioned dataset.

The job file's `data.sources` are read (catalog names work too) and the top-level `prepare:`
section configures the steps; `--apply-review reviewed.csv` applies a reviewer's verdicts to the
prepared folder instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="curate data: normalise, filter, redact PII, dedup, split, report",
        description="Turn raw data into a clean, versioned training set: normalise, filters, PII redaction, "
        "exact and near deduplication, contradictions, decontamination, a deterministic split, a review sample "
        "and a report with the sha256 of every output.",
        epilog="Example: llamaforge prepare examples/prepare_alpaca.yaml prepare.dedup.threshold=0.7",
    )
    p.add_argument("job", help="job YAML file (data.sources and the prepare: section)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. prepare.pii.action=drop")
    p.add_argument(
        "--apply-review", metavar="CSV", help="apply accept/reject/edit verdicts from a reviewed CSV"
    )
    p.add_argument("--out", metavar="DIR", help="output folder (overrides prepare.output_dir)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def load_job(path: str, overrides: list[str]):
    """(PrepareConfig, [DataSource], raw job dict): the whole job is validated by the one schema."""
    from llamaforge.config import apply_overrides, load_config, load_yaml

    job = load_config(path, overrides)
    return job.prepare, job.data.sources, apply_overrides(load_yaml(path), list(overrides))


def _tokenizer_path(spec: str | None) -> str | None:
    if spec is None or Path(spec).exists():
        return spec
    from llamaforge import catalog

    if spec in catalog.CATALOG and catalog.CATALOG[spec].kind == "tokenizer":
        return str(catalog.resolve(spec))
    return spec


def run(args: argparse.Namespace) -> int:
    from llamaforge.data.curate.pipeline import run_prepare

    cfg, sources, data = load_job(args.job, list(args.overrides))
    out = Path(args.out or cfg.output_dir)
    if args.apply_review:
        from llamaforge.data.curate.review import apply_review

        summary = apply_review(out, Path(args.apply_review))  # the split config the data was prepared with
        print(
            json.dumps(summary, indent=2)
            if args.json
            else f"review applied: {summary['verdicts']}; splits now {summary['splits']}; "
            f"dataset sha256 {summary['dataset_sha256']}"
        )
        return 0
    if cfg.filters.tokenizer:
        cfg.filters.tokenizer = _tokenizer_path(cfg.filters.tokenizer)
    report = run_prepare(cfg, sources, base_dir=Path.cwd(), job=data, out_dir=out, protect=[args.job])
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(
        f"{report['records_in']} records in -> {report['records_out']} out {report['splits']} in {report['seconds']} s"
    )
    for name, s in report["steps"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in list(s["by_reason"].items())[:4])
        print(f"  {name:<15} {s['in']:>8} -> {s['out']:<8} {reasons}")
    print(f"rejected: {report['rejected']} (rejects.jsonl), held for review: {report['held_for_review']}")
    print(
        f"report: {out / 'report.html'}   card: {out / 'card.json'} (dataset sha256 "
        f"{report['card']['dataset_sha256'][:16]}…)"
    )
    return 0
