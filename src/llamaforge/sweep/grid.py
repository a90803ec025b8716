"""The grid of a sweep: `key=v1,v2,...` axes (their cartesian product) and plain `key=value` overrides.

A comma at the top level of a value separates grid values; commas inside brackets, braces or quotes do
not, so `method.targets=[q_proj,v_proj]` is one value and `method.targets=attention,[q_proj,v_proj]`
two. Each value is parsed exactly like a normal dotted override.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaforge.config import JobConfig, load_config, parse_override
from llamaforge.errors import ConfigError

# The sweep sets these itself for every trial (each trial gets its own run and eval folder).
SWEEP_OWNED = (
    "output.dir",
    "output.name",
    "output.overwrite",
    "evaluation.candidates",
    "evaluation.output_dir",
)


@dataclass
class Axis:
    key: str
    texts: list[str]  # each value as written; parsed like `key=text`


@dataclass
class Trial:
    name: str
    values: dict[str, Any]  # key -> parsed value, for the table
    overrides: list[str] = field(default_factory=list)  # key=text, one per axis


def split_values(text: str) -> list[str]:
    """Split at top-level commas (not inside [], {}, () or a quoted item)."""
    parts: list[str] = []
    depth, quote, start = 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'" and not text[start:i].strip():
            quote = ch  # a quote opens only at the start of an item, as in YAML
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def parse_arguments(tokens: list[str]) -> tuple[list[Axis], list[str]]:
    """(grid axes, fixed overrides) from `key=...` tokens."""
    axes: list[Axis] = []
    fixed: list[str] = []
    seen: set[str] = set()
    for token in tokens:
        parts, _ = parse_override(token)  # checks key=value shape
        key = ".".join(parts)
        if key in seen:
            raise ConfigError(f"'{key}' is given twice; put all its values in one '{key}=v1,v2' axis")
        seen.add(key)
        texts = split_values(token.split("=", 1)[1])
        if len(texts) == 1:
            fixed.append(token)
            continue
        if any(not t for t in texts):
            raise ConfigError(f"grid axis '{token}' has an empty value (two commas, or one at an end)")
        if len(set(texts)) != len(texts):
            raise ConfigError(f"grid axis '{token}' repeats a value")
        if key in SWEEP_OWNED or key.startswith("output."):
            raise ConfigError(f"'{key}' cannot be swept: the sweep gives each trial its own output folder")
        axes.append(Axis(key, texts))
    return axes, fixed


def _slug(value: Any, text: str) -> str:
    raw = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", str(raw)).strip("_.") or "x"
    if len(slug) > 24:  # long values (lists of data sources...): a prefix and a stable hash
        slug = f"{slug[:12]}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"
    return slug


def expand(axes: list[Axis]) -> list[Trial]:
    """The cartesian product, in the order given; names are stable for the same values (resume)."""
    if not axes:
        return [Trial("single", {}, [])]
    short = [a.key.rsplit(".", 1)[-1] for a in axes]
    labels = [a.key.replace(".", "-") if short.count(s) > 1 else s for a, s in zip(axes, short, strict=True)]
    trials, names = [], set()
    for combo in itertools.product(*(a.texts for a in axes)):
        overrides = [f"{a.key}={t}" for a, t in zip(axes, combo, strict=True)]
        values = {a.key: parse_override(o)[1] for a, o in zip(axes, overrides, strict=True)}
        name = "_".join(
            f"{label}-{_slug(values[a.key], t)}" for label, a, t in zip(labels, axes, combo, strict=True)
        )
        base, k = name, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.add(name)
        trials.append(Trial(name, values, overrides))
    return trials


def trial_configs(job: str | None, fixed: list[str], trials: list[Trial]) -> list[JobConfig]:
    """Every trial config through the one schema, before anything runs: a typo fails here, naming the
    key and the nearest valid one. An error common to all trials is shown once, without a trial name."""
    configs, errors = [], []
    for trial in trials:
        try:
            configs.append(load_config(job, [*fixed, *trial.overrides]))
        except ConfigError as exc:
            errors.append((trial, str(exc)))
    if not errors:
        return configs
    if len(errors) == len(trials) and len({msg for _, msg in errors}) == 1:
        raise ConfigError(errors[0][1])
    trial, msg = errors[0]
    more = f" ({len(errors) - 1} more trial(s) invalid)" if len(errors) > 1 else ""
    raise ConfigError(f"trial {trial.name} ({' '.join(trial.overrides)}){more}: {msg}")


def for_trial(cfg: JobConfig, trial_dir: Path) -> JobConfig:
    """The trial's config: its run in trial_dir/run, its evaluation of that run alone in trial_dir/eval."""
    cfg = cfg.model_copy(deep=True)
    cfg.output.dir, cfg.output.name, cfg.output.overwrite = str(trial_dir), "run", True
    cfg.evaluation.candidates = [f"tuned={trial_dir / 'run'}"]
    cfg.evaluation.output_dir = str(trial_dir / "eval")
    cfg.evaluation.scoring.fail_if = []  # rules comparing to a base candidate have nothing to compare here
    return cfg


def default_out(cfg: JobConfig, job: str | None) -> Path:
    name = cfg.output.name or (Path(job).stem if job else "defaults")
    return Path(cfg.output.dir) / f"sweep-{name}"


def suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""
