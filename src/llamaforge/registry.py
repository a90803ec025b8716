"""One registry per extension axis: training methods, optimizers, metrics, exporters, serving engines.

A new member is one `register(...)` call in the file that implements it (or in a user's own
module, imported before the job runs); the job schema validates names against these registries
and suggests the nearest one, and the CLI reads its choices from them. See docs/extending.md.

The registries sit on the ground floor (the schema reads them) while their built-in members live
with the code that implements them: a registry imports its built-in module by name the first time
it is asked, the way entry-point plugins load. Only names and small facts live here, never the
runtime code itself.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

from llamaforge.errors import ConfigError


class Member(Protocol):
    name: str


T = TypeVar("T", bound=Member)


class UnknownName(ConfigError, ValueError):
    """A name no member of a registry has (a ValueError too, so the schema reports it as a field error)."""


class Registry(Generic[T]):
    def __init__(self, axis: str, builtins: str) -> None:
        self.axis, self.builtins = axis, builtins
        self._members: dict[str, T] = {}
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.builtins)  # registers the built-in members

    def register(self, member: T, *, replace: bool = False) -> T:
        """Add a member; a second member of the same name is an error unless `replace`."""
        self._load()
        if member.name in self._members and not replace:
            raise ValueError(f"a {self.axis} named '{member.name}' is registered already")
        self._members[member.name] = member
        return member

    def unregister(self, name: str) -> T:
        """Remove a member (a plugin unloaded, a test cleaning up)."""
        self._load()
        return self._members.pop(name)

    def get(self, name: str, *, field: str | None = None) -> T:
        """The member called `name`; an UnknownName names the field, the nearest name and all names."""
        self._load()
        if name not in self._members:
            close = difflib.get_close_matches(str(name), list(self._members), n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            where = f"{field}: " if field else ""
            raise UnknownName(f"{where}unknown {self.axis} '{name}'. {hint}Known: {', '.join(self._members)}")
        return self._members[name]

    def check(self, name: str, *, field: str | None = None) -> str:
        """`name` if registered (for field validators)."""
        self.get(name, field=field)
        return name

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(self._members)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._members

    def __iter__(self) -> Iterator[T]:
        self._load()
        return iter(list(self._members.values()))


# ---------------------------------------------------------------- the members of each axis


@dataclass(frozen=True)
class Method:
    """A way to train: what it attaches to the base model and what the rest of the house may do with it."""

    name: str
    attach: Callable[..., Any]  # (model, MethodConfig, gradient_checkpointing) -> the model to train
    weights: Literal["adapter", "model"]  # the run's weights folder: a peft adapter, or a whole model
    mergeable: bool  # merge/export can fold the adapter into its base
    hot_swappable: bool  # serve can load it beside other adapters on one base (a LoRA)
    planner: Literal["full", "lora", "qlora"]  # the memory profile the planner estimates it with
    base_quantization: str | None = None  # the base is loaded quantized by the method itself ("4bit": QLoRA)
    quantized_base: bool = True  # may train on a base loaded with model.quantization
    modules_to_save: bool = True  # method.modules_to_save is supported
    packing: bool = True  # train.packing is supported
    description: str = ""


@dataclass(frozen=True)
class Optimizer:
    name: str
    build: Callable[..., Any]  # (param groups, lr) -> torch.optim.Optimizer
    check: Callable[..., None] | None = None  # (device) -> None, raises ConfigError when it cannot run there
    description: str = ""


@dataclass(frozen=True)
class Metric:
    """A generation metric: its columns (0-100) and the function that scores outputs against references."""

    name: str
    columns: tuple[str, ...]
    score: Callable[..., dict[str, Any]]  # (outputs, references, EvalMetricsConfig) -> {column: MetricScores}
    curve: tuple[str, ...] = ()  # columns also logged at each eval during training (eval.sample_size)
    signature: Callable[..., str] | None = None  # (EvalMetricsConfig) -> how it was computed, for results
    description: str = ""


@dataclass(frozen=True)
class Exporter:
    name: str
    export: Callable[..., Any]  # (run_dir, out, *, dtype, bits, shard_size, overwrite, **options) -> Path
    description: str = ""


@dataclass(frozen=True)
class Engine:
    name: str
    serve: Callable[..., int]  # (ServeConfig) -> exit status
    description: str = ""


METHODS: Registry[Method] = Registry("training method", "llamaforge.train.adapters")
OPTIMIZERS: Registry[Optimizer] = Registry("optimizer", "llamaforge.train.knobs")
METRICS: Registry[Metric] = Registry("metric", "llamaforge.evaluate.metrics")
EXPORTERS: Registry[Exporter] = Registry("export format", "llamaforge.export.cli_export")
ENGINES: Registry[Engine] = Registry("serving engine", "llamaforge.serve.engines")
