"""The job schema: one pydantic model per section, YAML loading and `key.sub=value` overrides.

Every field has a visible default (`llamaforge config show`), unknown keys are errors that name
the nearest valid key, and impossible combinations fail here, before any model is loaded.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from llamaforge.data.curate.config import PrepareConfig
from llamaforge.errors import ConfigError
from llamaforge.evaluate.config import EvaluationConfig
from llamaforge.registry import METHODS
from llamaforge.schema import (  # noqa: F401 - re-exported: the job's sections live in schema.py
    DataConfig,
    DataFormat,
    DataSource,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    OutputConfig,
    Section,
    TemplateName,
    TrainConfig,
)
from llamaforge.serve.config import ServeConfig


class JobConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> JobConfig:
        name, quant = self.method.name, self.model.quantization
        method = METHODS.get(name, field="method.name")
        if not method.quantized_base and quant != "none":
            raise ValueError(
                f"method.name={name} cannot train {quant} quantized weights; use method.name=qlora "
                "(LoRA on a 4-bit base) or model.quantization=none"
            )
        if method.base_quantization and quant not in ("none", method.base_quantization):
            raise ValueError(
                f"method.name={name} loads the base in {method.base_quantization}; "
                f"model.quantization={quant} contradicts it"
            )
        if not method.modules_to_save and self.method.modules_to_save:
            raise ValueError(f"method.modules_to_save is not supported with method.name={name}")
        if not method.packing and self.train.packing:
            raise ValueError(
                f"train.packing does not work with method.name={name} (e.g. prefix tuning's virtual "
                "tokens come through the cache, which turns off the per-example attention of packed rows)"
            )
        if self.data.val_size >= 1 and self.data.val_size != int(self.data.val_size):
            raise ValueError("data.val_size must be a fraction below 1 or a whole count")
        if self.train.eval_every and self.data.val_size == 0 and not self.data.val_sources:
            raise ValueError(
                "train.eval_every needs validation data: set data.val_size > 0 or data.val_sources"
            )
        self._check_monitoring()
        return self

    def _check_monitoring(self) -> None:
        """Early stopping, keep-best and generation metrics all watch validation during training."""
        t, has_val = self.train, bool(self.data.val_size or self.data.val_sources)
        wants = [
            name
            for name, on in (
                ("train.early_stopping_patience", t.early_stopping_patience),
                ("train.load_best_at_end", t.load_best_at_end),
                ("eval.sample_size", self.eval.sample_size),
            )
            if on
        ]
        if wants and not has_val:
            raise ValueError(f"{wants[0]} needs validation data: set data.val_size > 0 or data.val_sources")
        if t.early_stopping_patience and not t.eval_every:
            raise ValueError(
                "train.early_stopping_patience counts evals during training: set train.eval_every "
                "(steps between evals)"
            )
        if t.mlflow_uri and "mlflow" not in t.trackers:
            raise ValueError("train.mlflow_uri is set but 'mlflow' is not in train.trackers")

    @property
    def quantization(self) -> str:
        return METHODS.get(self.method.name).base_quantization or self.model.quantization


# ---------------------------------------------------------------- loading and overrides


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the section at `loc` (used to suggest the nearest key)."""
    cls: type[BaseModel] = JobConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(str(part))
        if field is None:
            break
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        candidates = [annotation, *(inner or [])]
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            break
        cls = nested
    return list(cls.model_fields)


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid job config ({origin}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            valid = _section_fields(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"did you mean '{'.'.join(str(p) for p in loc[:-1] + (close[0],))}'?" if close else ""
            lines.append(f"  {dotted}: unknown key. {hint} Valid keys here: {', '.join(valid)}")
        else:
            lines.append(f"  {dotted}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # not YAML (or absurd): the text as given
        value = raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # "Be brief: always" is a sentence, not a mapping
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return data


# libyaml's loader: safe like yaml.SafeLoader, but linear on deeply nested flow text (the pure-Python
# scanner takes seconds on 20,000 brackets) and it refuses nesting deeper than 1,000 levels.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"job file not found: {path}")
    if not path.is_file():  # a folder, a FIFO (reading it could block forever), a device
        raise ConfigError(f"{path}: a job file must be a regular file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save the job file as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the job file: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_SAFE_LOADER)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read (a job file is a few levels deep)") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise ConfigError(f"{path}: a value cannot be read: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job file must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(path or "defaults"))) from None


def to_yaml(config: JobConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
