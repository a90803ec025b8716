"""The training loop's state in one typed place: what a checkpoint saves and a resume restores.

Everything the loop counts lives here (the step, the position in the data, the tokens seen, the
validation watch's best eval and patience), so an exact resume is "restore this object", and
nothing that must survive an interrupt hides in a loose attribute. A checkpoint stores it as
`progress.json` (`TrainState.to_dict()`): plain JSON, readable without torch.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields

from llamaforge.errors import ConfigError


@dataclass
class WatchState:
    """The validation watch's counters (train/monitor.py): the best eval so far, the patience spent,
    the eval history behind the overfitting warning, and the training losses since the last eval."""

    best_loss: float | None = None
    best_step: int | None = None
    best_result: dict | None = None
    bad_evals: int = 0  # evals in a row without an improvement above min_delta
    stopped_at: int | None = None  # the step early stopping ended the run at
    evals: list[list] = field(
        default_factory=list
    )  # [step, eval_loss, mean training loss since the last eval]
    warnings: list[dict] = field(default_factory=list)
    train_sum: float = 0.0
    train_count: int = 0
    warned: bool = False  # the overfitting warning was given for the current streak

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None, source: str = "progress.json") -> WatchState:
        return cls(**_known(cls, data or {}, f"{source}: monitor"))


@dataclass
class TrainState:
    """Where the run is: the step, the epoch and the position in it, the tokens seen, the time spent."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    group: int = 0  # the position in the epoch: optimizer steps (groups of micro-batches) done in it
    tokens: int = 0  # tokens this process has trained on (padding excluded)
    target_tokens: int = 0  # of which the loss was computed on
    elapsed: float = 0.0  # seconds of training, over every start of the run
    watch: WatchState = field(default_factory=WatchState)

    def to_dict(self) -> dict:
        """The layout of a checkpoint's progress.json (the watch under "monitor")."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "watch"}
        return {**out, "monitor": self.watch.to_dict()}

    @classmethod
    def from_dict(cls, data: dict, source: str = "progress.json") -> TrainState:
        """The inverse of `to_dict`; an unknown or mistyped key is an error naming `source`
        (a checkpoint from another version, or a hand-edited file)."""
        data = dict(data)
        watch = WatchState.from_dict(data.pop("monitor", None), source)
        return cls(**_known(cls, data, source), watch=watch)

    def snapshot(self) -> TrainState:
        """An independent copy (the step boundary the recipe falls back to on an interrupt)."""
        return copy.deepcopy(self)


def _known(cls, data: dict, source: str) -> dict:
    names = {f.name for f in fields(cls)} - {"watch"}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; known: {sorted(names)}")
    for f in fields(cls):
        value = data.get(f.name)
        if f.type in ("int", "float") and value is not None and not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {f.name} must be a number, got {value!r}")
    return data


@dataclass
class TrainSummary:
    """summary.json: what the run was (set up) and did (trained), gathered from setup to the end.

    Readers (the CLI's report, sweeps, the studio, the general suite) use its JSON, `to_dict()`;
    the facts a run may not have (no eval before, no planned batch, no divergence) are left out."""

    trainable_params: int = 0
    total_params: int = 0
    precision: str = ""
    threads: int | None = None
    micro_batch: int | str = 0
    grad_accum: int = 1
    gradient_checkpointing: bool | str = False
    micro_batch_tokens: int | None = None  # the cap past which a micro-batch is split (None: never)
    batch_choice: dict | None = None  # the planner's facts for `batch_size: auto`
    before: dict | None = None  # eval and sample answers before training
    after: dict | None = None  # ... and of the weights that are saved
    steps: int = 0
    train_seconds: float = 0.0
    tokens_per_s: float = 0.0
    target_tokens_per_s: float = 0.0
    warnings: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_eval_loss: float | None = None
    stopped_early_at: int | None = None
    weights_step: int | None = None  # the step the saved weights are from (with an eval watch)
    status: str | None = None  # "diverged": the run stopped at a non-finite step
    error: str | None = None

    OPTIONAL = ("batch_choice", "before", "after", "weights_step", "status", "error")

    def record(self, facts: dict) -> None:
        """Take the validator's facts about the saved weights (names are this class's fields)."""
        for key, value in facts.items():
            if not hasattr(self, key):
                raise ValueError(f"summary.json has no field {key!r}")
            setattr(self, key, value)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not (k in self.OPTIONAL and v is None)}
