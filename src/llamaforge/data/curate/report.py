"""Outputs of `prepare`: Arrow copies of the splits, the review sample, report.json + report.html
(counts through each step, reasons, length histograms, PII counts, duplicate clusters,
contradictions) and card.json with the sha256 of every output, the config and the sources."""

from __future__ import annotations

import hashlib
import html
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from llamaforge.atomic import MARKER
from llamaforge.data.curate.config import STEP_ORDER
from llamaforge.data.split import SPLITS

CARD = "card.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ Arrow


def _features():
    from datasets import Features, Value

    return Features(
        {
            "id": Value("string"),
            "messages": [{"role": Value("string"), "content": Value("string")}],
            "source": Value("string"),
            "line": Value("int64"),
            "raw_text": Value("bool"),
            "meta": Value("string"),  # JSON: its keys vary between records
        }
    )


def _arrow_rows(path: str):
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            yield {
                "id": d["meta"].get("id", ""),
                "messages": d["messages"],
                "source": d["source"],
                "line": d["line"],
                "raw_text": d["raw_text"],
                "meta": json.dumps(d["meta"], ensure_ascii=False),
            }


def save_arrow(out: Path) -> dict[str, str]:
    """Each split jsonl -> out/arrow/<split> (datasets.save_to_disk); meta is a JSON string column."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    cache = out / ".work" / "hf-cache"
    written = {}
    for split in SPLITS:
        src = out / f"{split}.jsonl"
        dest = out / "arrow" / split
        if dest.exists():
            shutil.rmtree(dest)
        if not src.is_file() or src.stat().st_size == 0:
            continue
        ds = Dataset.from_generator(
            _arrow_rows, gen_kwargs={"path": str(src)}, features=_features(), cache_dir=str(cache)
        )
        ds.save_to_disk(str(dest))
        written[split] = str(dest.relative_to(out))
    shutil.rmtree(cache, ignore_errors=True)
    return written


# ------------------------------------------------------------------ histograms


def _histograms(pipeline, out: Path) -> list[str]:
    if not len(pipeline.lengths_in[0]) and not len(pipeline.lengths_out[0]):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    unit = pipeline.filters.counter.name if hasattr(pipeline, "filters") else "words"
    unit = "tokens" if unit != "whitespace words" else "words"
    names = []
    for part, col in (("prompt", 0), ("answer", 1)):
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        before = np.asarray(pipeline.lengths_in[col])
        after = np.asarray(pipeline.lengths_out[col])
        hi = max(int(before.max()) if len(before) else 1, int(after.max()) if len(after) else 1, 1)
        bins = np.linspace(0, hi, 41)
        if len(before):
            ax.hist(before, bins=bins, alpha=0.5, label=f"measured ({len(before)})")
        if len(after):
            ax.hist(after, bins=bins, alpha=0.7, label=f"kept ({len(after)})")
        ax.set_xlabel(f"{part} length ({unit})")
        ax.set_ylabel("records")
        ax.legend()
        fig.tight_layout()
        name = f"length_{part}.png"
        fig.savefig(out / name, metadata={"Software": None})
        plt.close(fig)
        names.append(name)
    return names


def _length_stats(values) -> dict[str, Any]:
    import numpy as np

    a = np.asarray(values)
    if not len(a):
        return {"count": 0}
    return {
        "count": int(len(a)),
        "mean": round(float(a.mean()), 1),
        "p50": int(np.percentile(a, 50)),
        "p95": int(np.percentile(a, 95)),
        "max": int(a.max()),
    }


# ------------------------------------------------------------------ report


def write_outputs(
    pipeline, splits: dict[str, int], elapsed: float, review: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`review`: what review.export_review wrote (the pipeline calls it: review builds on this module)."""
    cfg, out = pipeline.cfg, pipeline.out
    (out / ".work").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    arrow = save_arrow(out) if cfg.arrow else {}
    arrow_s = time.perf_counter() - t0
    images = _histograms(pipeline, out)
    steps = {name: pipeline.stats[name].to_dict() for name in STEP_ORDER if name in pipeline.stats}
    objs = pipeline.step_objects
    report: dict[str, Any] = {
        "output_dir": str(getattr(pipeline, "final_out", out)),
        "records_in": pipeline.stats["ingest"].seen,
        "records_out": sum(splits.values()),
        "splits": splits,
        "rejected": pipeline.rejects_n,
        "held_for_review": pipeline.held_n,
        "seconds": round(elapsed, 2),
        "arrow_seconds": round(arrow_s, 2),
        "steps": steps,
        "per_source": getattr(pipeline, "per_source", {}),
        "sources": pipeline.source_files,
        "warnings": pipeline.warnings,
        "lengths": {
            "unit": "tokens"
            if getattr(getattr(pipeline, "filters", None), "counter", None)
            and pipeline.filters.counter._encode_batch
            else "words",
            "tokenizer": pipeline.filters.counter.name if hasattr(pipeline, "filters") else None,
            "prompt_measured": _length_stats(pipeline.lengths_in[0]),
            "answer_measured": _length_stats(pipeline.lengths_in[1]),
            "prompt_kept": _length_stats(pipeline.lengths_out[0]),
            "answer_kept": _length_stats(pipeline.lengths_out[1]),
        },
        "images": images,
        "arrow": arrow,
        "review": review,
    }
    if "pii" in objs:
        report["pii"] = objs["pii"].summary()
    if "dedup" in objs:
        d = objs["dedup"].summary()
        for c in d["largest_clusters"]:
            c["kept_text"] = pipeline.snippets.get(c["kept"], "")
            c["dropped_text"] = [pipeline.snippets.get(i, "") for i in c["dropped"]]
        report["dedup"] = d
    if "contradictions" in objs:
        c = objs["contradictions"].summary()
        for g in c["examples"]:
            g["first_text"] = pipeline.snippets.get(g["first"], "")
            g["others_text"] = [pipeline.snippets.get(i, "") for i in g["others"]]
        report["contradictions"] = c
    if "decontaminate" in objs:
        report["decontamination"] = objs["decontaminate"].summary()
    if "filters" in objs:
        report["filters"] = objs["filters"].describe()
    (out / "report.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False, default=str), encoding="utf-8"
    )
    (out / "report.html").write_text(render_html(report), encoding="utf-8")
    (out / "config.json").write_text(
        json.dumps(
            {"prepare": json.loads(cfg.model_dump_json()), "job": pipeline.job}, indent=2, default=str
        ),
        encoding="utf-8",
    )
    shutil.rmtree(out / ".work", ignore_errors=True)
    report["card"] = write_card(out, pipeline.source_files)
    return report


def write_card(out: Path, sources: dict[str, Any] | None = None) -> dict[str, Any]:
    """card.json: sha256 of every output file (and one over all of them), the config and the sources."""
    previous = {}
    card_path = out / CARD
    if card_path.is_file():
        previous = json.loads(card_path.read_text(encoding="utf-8"))
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name not in (CARD, MARKER):
            files[str(p.relative_to(out)).replace(os.sep, "/")] = sha256_file(p)
    data_files = {k: v for k, v in files.items() if k.endswith(".jsonl") and k.split(".")[0] in SPLITS}
    digest = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(data_files.items())).encode()).hexdigest()
    counts = {}
    for split in SPLITS:
        p = out / f"{split}.jsonl"
        if p.is_file():
            with p.open("rb") as f:
                counts[split] = sum(1 for _ in f)
    from llamaforge import __version__

    card = {
        "dataset_sha256": digest,
        "splits": counts,
        "files": files,
        "sources": sources if sources is not None else previous.get("sources", {}),
        "config_sha256": files.get("config.json"),
        "llamaforge_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    card_path.write_text(json.dumps(card, indent=2, ensure_ascii=False), encoding="utf-8")
    return card


def _table(rows: list[list[Any]], head: list[str]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def render_html(report: dict[str, Any]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>llamaforge prepare report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;"
        "font-size:90%}th{background:#f3f3f3}.warn{color:#a60}</style></head><body>",
        "<h1>Data preparation report</h1>",
        f"<p>{report['records_in']} records in, {report['records_out']} out "
        f"({', '.join(f'{k}: {v}' for k, v in report['splits'].items())}); {report['rejected']} rejected "
        f"(rejects.jsonl), {report['held_for_review']} held for review; {report['seconds']} s.</p>",
    ]
    for w in report.get("warnings", []):
        parts.append(f"<p class='warn'>warning: {html.escape(w)}</p>")
    parts.append("<h2>Counts through each step</h2>")
    rows = [
        [
            name,
            s["in"],
            s["out"],
            s["rejected"],
            s["records_per_s"],
            "; ".join(f"{k}: {v}" for k, v in s["by_reason"].items()),
        ]
        for name, s in report["steps"].items()
    ]
    parts.append(_table(rows, ["step", "in", "out", "rejected", "records/s", "reasons"]))
    for name, s in report["steps"].items():
        if s["top_reasons"]:
            parts.append(f"<details><summary>{html.escape(name)}: most frequent reasons</summary>")
            parts.append(
                _table([[k, v] for k, v in s["top_reasons"].items()], ["reason", "records"]) + "</details>"
            )
    parts.append("<h2>Lengths</h2>")
    lengths = report["lengths"]
    parts.append(
        f"<p>unit: {html.escape(str(lengths['unit']))} ({html.escape(str(lengths['tokenizer']))})</p>"
    )
    parts.append(
        _table([[k, json.dumps(v)] for k, v in lengths.items() if isinstance(v, dict)], ["", "stats"])
    )
    for img in report.get("images", []):
        parts.append(f"<img src='{html.escape(img)}' alt='{html.escape(img)}'>")
    if report.get("pii"):
        pii = report["pii"]
        parts.append(
            f"<h2>PII</h2><p>action: {pii['action']}; records with PII: {pii['records_with_pii']}</p>"
        )
        parts.append(_table(list(pii["counts"].items()), ["kind", "found"]))
    if report.get("dedup"):
        d = report["dedup"]
        parts.append(
            f"<h2>Duplicates</h2><p>on {d['compare']}, kept: the {d['keep']}; exact dropped "
            f"{d['exact_dropped']}, near dropped {d['near_dropped']} (Jaccard >= {d['threshold']}); "
            f"{d['clusters']} clusters</p>"
        )
        rows = [
            [f"#{c['kept']}", c["size"], c["kept_text"], "\n".join(c["dropped_text"][:3])]
            for c in d["largest_clusters"]
        ]
        parts.append(_table(rows, ["kept", "size", "kept record", "dropped (examples)"]))
    if report.get("contradictions"):
        c = report["contradictions"]
        parts.append(
            f"<h2>Contradictions</h2><p>action: {c['action']}; {c['groups']} groups, {c['records']} "
            "records</p>"
        )
        rows = [[f"#{g['first']}", g["first_text"], "\n".join(g["others_text"][:3])] for g in c["examples"]]
        parts.append(_table(rows, ["first", "record", "conflicting (examples)"]))
    if report.get("decontamination"):
        parts.append("<h2>Decontamination</h2>" + _table(list(report["decontamination"].items()), ["", ""]))
    parts.append("<h2>Sources</h2>")
    parts.append(
        _table(
            [
                [k, v.get("path"), v.get("records"), v.get("unreadable"), v.get("sha256")]
                for k, v in report["sources"].items()
            ],
            ["source", "path", "records", "unreadable", "sha256"],
        )
    )
    parts.append("</body></html>")
    return "".join(parts)
