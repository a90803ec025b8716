"""The new-job form, generated from the job schema (config.JobConfig), and its validation.

Every leaf field of the schema becomes one input with its description, default and allowed values;
lists and mappings (data.sources, serve.adapters) are edited as YAML. What the form sends is turned
into the same `key.sub=value` overrides the CLI takes, and checked by the same code
(config.apply_overrides, JobConfig, config._format_validation_error), so a field error in the browser
reads exactly like the one `llamaforge train` prints, nearest-key suggestion included.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from llamaforge.config import JobConfig, _format_validation_error, parse_override


@dataclass
class FormField:
    key: str  # dotted, e.g. train.lr
    section: str
    kind: str  # bool | choice | int | float | str | yaml
    default: Any
    default_text: str
    description: str
    choices: list[str]
    optional: bool
    bounds: str  # e.g. ">= 1, < 1"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _unwrap(annotation) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True  # several types: edited as YAML
    return annotation, False


def _model_class(annotation) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _kind(annotation) -> tuple[str, list[str]]:
    if typing.get_origin(annotation) is Literal:
        return "choice", [str(a) for a in typing.get_args(annotation)]
    if annotation is bool:
        return "bool", ["true", "false"]
    if annotation is int:
        return "int", []
    if annotation is float:
        return "float", []
    if annotation is str:
        return "str", []
    return "yaml", []  # lists, mappings, unions such as str | list[str]


def _bounds(info) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def _default(info) -> Any:
    if info.default is not PydanticUndefined:
        value = info.default
    elif info.default_factory is not None:
        value = info.default_factory()
    else:
        return None
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    return value


def to_text(value: Any, kind: str) -> str:
    """How a value is shown in its input (and parsed back by `form_to_data`)."""
    if value is None:
        return ""
    if kind == "bool":
        return "true" if value else "false"
    if kind == "yaml":
        if isinstance(value, str):
            return value  # a plain string reads back as itself
        if isinstance(value, dict):
            return json.dumps(
                value
            )  # a mapping must start with "{" to be read as one (config.parse_override)
        return (
            yaml.safe_dump(value, sort_keys=False, default_flow_style=None).strip() if value != [] else "[]"
        )
    return str(value)


def form_fields(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[FormField]:
    """Every leaf field of the schema, in schema order."""
    out: list[FormField] = []
    for name, info in model.model_fields.items():
        annotation, optional = _unwrap(info.annotation)
        nested = _model_class(annotation)
        key = f"{prefix}{name}"
        if nested is not None:
            out.extend(form_fields(nested, f"{key}."))
            continue
        kind, choices = _kind(annotation)
        default = _default(info)
        out.append(
            FormField(
                key=key,
                section=key.split(".")[0],
                kind=kind,
                default=default,
                default_text=to_text(default, kind),
                description=info.description or "",
                choices=choices,
                optional=optional,
                bounds=_bounds(info),
            )
        )
    return out


FIELDS = {f.key: f for f in form_fields()}


def form_to_data(values: dict[str, str]) -> dict[str, Any]:
    """The job mapping for the form's values, in schema order; fields left at their default text are
    left out, so the downloaded YAML says only what the user chose (the rest is the schema's default)."""
    order = {key: i for i, key in enumerate(FIELDS)}
    data: dict[str, Any] = {}
    for key in sorted(values, key=lambda k: order.get(k, len(order))):
        spec, text = FIELDS.get(key), "" if values[key] is None else str(values[key])
        if spec is not None and text == spec.default_text:
            continue
        if spec is not None and text == "" and spec.optional:
            _set(data, key.split("."), None)
        elif spec is not None and spec.kind == "str":
            _set(data, key.split("."), text)  # a string field takes the text as typed ("123" stays a name)
        else:
            parts, value = parse_override(f"{key}={text}")  # the CLI's reading of key=value
            _set(data, parts, value)
    return data


def _set(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}  # as config.apply_overrides: the deeper key wins; validation names it
        node = node[part]
    node[parts[-1]] = value


def parse_yaml_text(text: str, origin: str = "pasted YAML") -> dict[str, Any]:
    """The same checks as config.load_yaml, on text: valid YAML, a mapping of sections."""
    from llamaforge.errors import ConfigError

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: a job file must be a mapping of sections, got {type(data).__name__}")
    return data


@dataclass
class Checked:
    config: JobConfig | None
    errors: list[dict[str, str]]  # {"field": dotted or "", "message": the CLI's line}
    message: str  # the CLI's whole error text ("" when valid)


def validate(data: dict[str, Any], origin: str = "studio form") -> Checked:
    """Validate a job mapping exactly as `llamaforge train` does, with one error per field."""
    try:
        return Checked(JobConfig.model_validate(data), [], "")
    except ValidationError as exc:
        text = _format_validation_error(exc, origin)
        lines = text.splitlines()[1:]
        errors = []
        for err, line in zip(exc.errors(), lines):
            loc = [str(p) for p in err["loc"]]
            field_key = ".".join(p for p in loc if not p.isdigit())
            errors.append(
                {
                    "field": field_key if field_key in FIELDS else _nearest_field(loc),
                    "loc": ".".join(loc),
                    "message": line.strip(),
                }
            )
        return Checked(None, errors, text)


def _nearest_field(loc: list[str]) -> str:
    """The form input an error belongs to: the deepest schema field on its path (data.sources.0.path ->
    data.sources), or "" for errors about the whole job."""
    parts = [p for p in loc if not p.isdigit()]
    while parts:
        key = ".".join(parts)
        if key in FIELDS:
            return key
        parts.pop()
    return ""


def model_source_problem(source: str, workspace: Path) -> str | None:
    """Why a model source may not be used from the studio (None when it may): a catalog name, a hub
    id, or a folder / .gguf file inside the workspace."""
    from llamaforge import catalog

    root = workspace.resolve()
    looks_like_path = (
        source.startswith((".", "/", "~")) or (root / source).exists() or source.endswith(".gguf")
    )
    if source in catalog.CATALOG or not looks_like_path:
        return None
    if (root / Path(source).expanduser()).resolve().is_relative_to(root):
        return None
    return f"{source} is outside the workspace {root}"


def check_paths(cfg: JobConfig, workspace: Path) -> list[dict[str, str]]:
    """Files the job reads or writes must lie inside the workspace (catalog names are fine)."""
    from llamaforge import catalog

    root = workspace.resolve()
    errors = []

    def inside(value: str) -> bool:
        return (root / Path(value).expanduser()).resolve().is_relative_to(root)

    problem = model_source_problem(cfg.model.source, workspace)
    if problem:
        errors.append({"field": "model.source", "loc": "model.source", "message": f"model.source: {problem}"})
    for group in ("sources", "val_sources"):
        for i, src in enumerate(getattr(cfg.data, group)):
            if src.path in catalog.CATALOG:
                continue
            if not inside(src.path):
                errors.append(
                    {
                        "field": f"data.{group}",
                        "loc": f"data.{group}.{i}.path",
                        "message": f"data.{group}.{i}.path: {src.path} is outside the workspace {root}",
                    }
                )
    if not inside(cfg.output.dir):
        errors.append(
            {
                "field": "output.dir",
                "loc": "output.dir",
                "message": f"output.dir: {cfg.output.dir} is outside the workspace {root}",
            }
        )
    return errors
