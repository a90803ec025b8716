"""The comparison of a sweep's trials: one table as Markdown, JSON and self-contained HTML (with a chart of
the primary metric against trainable parameters and peak memory), the best trial highlighted."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from llamaforge.errors import ConfigError

# `llamaforge eval` measures loss/perplexity of the task's references; keep them apart from the run's eval loss.
TASK_RENAMES = {"loss": "task_loss", "perplexity": "task_ppl"}
# Columns every trial has (metrics of the run itself), in table order, with their direction.
RUN_COLUMNS: dict[str, bool] = {  # name -> higher is better
    "trainable_params": False,
    "peak_rss_mb": False,
    "train_s": False,
    "tokens_per_s": True,
    "train_loss": False,
    "eval_loss": False,
    "eval_ppl": False,
}
# Columns of trials trained with eval.general: true (shown when some trial has them): the task gain
# beside what the tune cost on the general suite.
GENERAL_COLUMNS: dict[str, bool] = {"general": True, "general_delta": True}
HEADERS = {
    "trainable_params": "trainable",
    "peak_rss_mb": "peak RSS MB",
    "train_s": "train s",
    "tokens_per_s": "tokens/s",
    "train_loss": "train loss",
    "eval_loss": "eval loss",
    "eval_ppl": "eval ppl",
    "task_loss": "task loss",
    "task_ppl": "task ppl",
    "wall_s": "wall s",
    "general": "general",
    "general_delta": "general Δ",
}


def task_metric_names() -> dict[str, bool]:
    from llamaforge.registry import METRICS

    names = {n: True for metric in METRICS for n in metric.columns}
    return {**names, "task_loss": False, "task_ppl": False}


def parse_metric(text: str, evaluate: bool) -> tuple[str, bool]:
    """'NAME[:min|:max]' -> (name, higher_is_better); unknown names fail before anything runs."""
    name, _, direction = text.partition(":")
    task = task_metric_names()
    known = {**RUN_COLUMNS, **GENERAL_COLUMNS, "wall_s": False, **task}
    if name not in known:
        from llamaforge.sweep.grid import suggest

        raise ConfigError(
            f"--metric '{name}' is not measured.{suggest(name, list(known))} Choose from: {', '.join(known)}"
        )
    if name in task and not evaluate:
        raise ConfigError(
            f"--metric {name} is a task metric: the job needs an `evaluation:` task (task.path)"
        )
    if direction not in ("", "min", "max"):
        raise ConfigError(f"--metric {text}: the direction after ':' must be min or max")
    return name, known[name] if not direction else direction == "max"


def fmt(name: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if name in ("trainable_params", "total_params"):
        return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value:,}"
    if name in ("peak_rss_mb", "train_s", "wall_s", "tokens_per_s"):
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    if name == "general_delta":
        return f"{value:+.2f}"
    if name in ("train_loss", "eval_loss", "task_loss"):
        return f"{value:.4f}"
    return f"{value:.2f}"


def _value(result: dict, name: str) -> Any:
    return {**result.get("metrics", {}), **result.get("task_metrics", {})}.get(name)


def best_trial(results: list[dict], metric: str, higher: bool) -> str | None:
    scored = [
        (v, r["name"])
        for r in results
        if r["status"] == "completed" and isinstance(v := _value(r, metric), int | float) and math.isfinite(v)
    ]
    if not scored:
        return None
    return (max if higher else min)(scored)[1]


def table(definition: dict, results: list[dict]) -> tuple[list[str], list[list[str]], list[dict]]:
    """(columns, formatted rows, raw rows): trial, the varied values, status, metrics, reason."""
    axes = list(definition["axes"])
    task_cols = list(dict.fromkeys(n for r in results for n in r.get("task_metrics", {})))
    general_cols = [c for c in GENERAL_COLUMNS if any(_value(r, c) is not None for r in results)]
    metric_cols = [*RUN_COLUMNS, *general_cols, *task_cols]
    columns = ["trial", *axes, "status", *metric_cols, "reason"]
    raw_rows, rows = [], []
    for r in results:
        raw = {
            "trial": r["name"],
            **{k: r["values"].get(k) for k in axes},
            "status": r["status"],
            **{m: _value(r, m) for m in metric_cols},
            "reason": r.get("reason"),
        }
        raw_rows.append(raw)
        rows.append([fmt(c, raw[c]) if c in metric_cols else _cell(raw[c]) for c in columns])
    return columns, rows, raw_rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def to_markdown(definition: dict, results: list[dict], best: str | None) -> str:
    columns, rows, _ = table(definition, results)
    direction = "higher" if definition["higher_is_better"] else "lower"
    lines = [
        f"# sweep: {definition.get('job') or 'defaults'}",
        "",
        f"{len(results)} trial(s); best by {definition['metric']} ({direction} is better): "
        f"{best or 'none (no completed trial measured it)'}",
        "",
    ]
    heads = [HEADERS.get(c, c) for c in columns]
    lines += ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    for row in rows:
        cells = [c.replace("|", "\\|").replace("\n", " ") for c in row]
        if row[0] == best:
            cells = [f"**{c}**" if c else c for c in cells]
            cells[0] = f"★ {cells[0]}"
        lines.append("| " + " | ".join(cells) + " |")
    fixed = definition.get("fixed") or []
    if fixed:
        lines += ["", "fixed overrides: " + " ".join(f"`{f}`" for f in fixed)]
    return "\n".join(lines) + "\n"


def chart_png(definition: dict, results: list[dict], best: str | None = None) -> bytes | None:
    """Primary metric against trainable parameters and against peak memory, one point per completed trial
    (the best one green)."""
    metric = definition["metric"]
    points = [
        (r["name"], _value(r, metric), _value(r, "trainable_params"), _value(r, "peak_rss_mb"))
        for r in results
        if r["status"] == "completed"
    ]
    points = [p for p in points if isinstance(p[1], int | float) and math.isfinite(p[1])]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100, sharey=True)
    for ax, index, label in ((axes[0], 2, "trainable parameters"), (axes[1], 3, "peak RSS (MB)")):
        shown = [p for p in points if p[index] is not None]
        colors = ["tab:green" if p[0] == best else "tab:blue" for p in shown]
        ax.scatter([p[index] for p in shown], [p[1] for p in shown], c=colors, s=40)
        for p in shown:
            ax.annotate(p[0], (p[index], p[1]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    fig.suptitle(f"{metric} ({'higher' if definition['higher_is_better'] else 'lower'} is better)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def to_html(definition: dict, results: list[dict], best: str | None) -> str:
    columns, rows, _ = table(definition, results)
    esc = html.escape
    head = "".join(f"<th>{esc(HEADERS.get(c, c))}</th>" for c in columns)
    body = []
    for row, r in zip(rows, results, strict=True):
        cls = "best" if row[0] == best else ("bad" if r["status"] != "completed" else "")
        body.append(f'<tr class="{cls}">' + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    png = chart_png(definition, results, best)
    chart = (
        f'<img alt="{esc(definition["metric"])} chart" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}">'
        if png
        else "<p>No completed trial to chart.</p>"
    )
    direction = "higher" if definition["higher_is_better"] else "lower"
    fixed = " ".join(definition.get("fixed") or []) or "none"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>llamaforge sweep</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
tr.best {{ background: #d9f2d9; font-weight: bold; }}
tr.bad {{ color: #a33; }}
code {{ background: #f4f4f4; padding: 1px 4px; }}
</style></head><body>
<h1>sweep: {esc(definition.get("job") or "defaults")}</h1>
<p>{len(results)} trial(s); best by <b>{esc(definition["metric"])}</b> ({direction} is better):
<b>{esc(best or "none")}</b>. Fixed overrides: <code>{esc(fixed)}</code></p>
<table><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<h2>{esc(definition["metric"])} vs trainable parameters and peak memory</h2>
{chart}
<p>Peak RSS is the training process's maximum resident memory (CPU RAM; GPU memory is not in it).</p>
</body></html>
"""


def finite(obj: Any) -> Any:
    """NaN/inf as strings: strict JSON readers reject the bare NaN that json.dumps writes."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def write_report(sweep_dir: Path, definition: dict, results: list[dict]) -> dict[str, Path]:
    best = best_trial(results, definition["metric"], definition["higher_is_better"])
    columns, _, raw_rows = table(definition, results)
    paths = {ext: sweep_dir / f"results.{ext}" for ext in ("md", "json", "html")}
    paths["md"].write_text(to_markdown(definition, results, best), encoding="utf-8")
    data = {"sweep": {**definition, "best": best}, "columns": columns, "rows": raw_rows, "trials": results}
    paths["json"].write_text(json.dumps(finite(data), indent=2, default=str), encoding="utf-8")
    paths["html"].write_text(to_html(definition, results, best), encoding="utf-8")
    return paths
