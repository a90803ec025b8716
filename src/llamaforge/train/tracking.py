"""metrics.jsonl (always), optional TensorBoard / MLflow trackers, and loss.png.

Every record goes through `MetricsLog.write`, which appends it to metrics.jsonl and hands its
numbers to the trackers, so the three views of a run never disagree.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

from llamaforge.errors import ConfigError

TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "track"), "mlflow": ("mlflow", "mlflow")}


def check_trackers(names: list[str]) -> None:
    """Fail before the model is loaded when a tracker's package is missing, naming the extra to install."""
    for name in names:
        module, extra = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.trackers includes {name} but the {module} package is not installed: "
                f"pip install 'llamaforge[{extra}]'"
            )


def _numbers(record: dict) -> dict[str, float]:
    """The finite numeric values of a record, without the step."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardTracker:
    """Scalars under train/<key> and eval/<key> (eval_loss -> eval/loss), config as text."""

    def __init__(self, log_dir: Path, config_yaml: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=30)
        self.writer.add_text("config", "```yaml\n" + config_yaml + "\n```", 0)

    def log(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for key, value in _numbers(record).items():
            tag = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(tag, value, step)

    def close(self, status: str) -> None:
        self.writer.add_text("status", status, 0)
        self.writer.close()


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': '0.0001'}; lists stay whole (as JSON)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


class MlflowTracker:
    """One MLflow run per llamaforge run: the flattened config as params, every record as metrics.

    The default store is a local folder (run_dir/mlruns), so nothing needs a server. The run id is
    kept in run_dir/mlflow_run.json so that --resume continues the same MLflow run.
    """

    STATUS = {"completed": "FINISHED", "interrupted": "KILLED", "diverged": "FAILED", "failed": "FAILED"}

    def __init__(
        self, uri: str, experiment: str, run_dir: Path, run_name: str, params: dict[str, str], *, resume: bool
    ):
        if "://" not in uri or uri.startswith("file:"):
            # MLflow 3 keeps the file store in "maintenance mode" and refuses it unless opted in; it is
            # still the only store that needs neither a server nor a database package.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        id_file = run_dir / "mlflow_run.json"
        if resume and id_file.is_file():
            self.run_id = json.loads(id_file.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        id_file.write_text(json.dumps({"tracking_uri": uri, "experiment": experiment, "run_id": self.run_id}))
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        stamp, step = int(time.time() * 1000), int(record.get("step", 0))
        metrics = [Metric(k, v, stamp, step) for k, v in _numbers(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=self.STATUS.get(status, "FINISHED"))


def open_trackers(cfg, run_dir: Path, *, resume: bool) -> list:
    """The trackers named in cfg.train.trackers (call on the main process only)."""
    from llamaforge.config import to_yaml

    check_trackers(cfg.train.trackers)
    trackers: list = []
    for name in dict.fromkeys(cfg.train.trackers):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir / "tensorboard", to_yaml(cfg)))
        elif name == "mlflow":
            uri = cfg.train.mlflow_uri or (run_dir / "mlruns").resolve().as_uri()
            trackers.append(
                MlflowTracker(
                    uri,
                    cfg.train.mlflow_experiment,
                    run_dir,
                    run_dir.name,
                    flatten(cfg.model_dump(mode="json")),
                    resume=resume,
                )
            )
    return trackers


def step_bar(total: int, done: int, *, enabled: bool):
    """The progress bar over optimizer steps (in a log file tqdm writes a line every few seconds)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


class MetricsLog:
    def __init__(self, path: Path, *, append: bool = False, trackers: list | None = None):
        self.path, self.trackers = path, list(trackers or [])
        self._fh = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 - lives for the run

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        for tracker in self.trackers:
            tracker.log(record)

    def close(self, status: str = "completed") -> None:
        if self._fh.closed:
            return
        self._fh.close()
        for tracker in self.trackers:
            tracker.close(status)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


GENERATION_CURVES = (("eval_rougeL", "ROUGE-L"), ("eval_bleu", "BLEU-4"), ("eval_exact_match", "exact match"))


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    """The loss curves; with generation metrics on the eval records, a second panel beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    curves = {label: [(r["step"], r[key]) for r in rows if key in r] for key, label in GENERATION_CURVES}
    curves = {label: points for label, points in curves.items() if points}
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(12 if curves else 7, 4), dpi=110, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
        best = min(evals, key=lambda point: point[1])
        ax.plot(
            *best,
            "*",
            markersize=14,
            color="gold",
            markeredgecolor="black",
            label=f"best eval (step {best[0]})",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if curves:
        gen = axes[0][1]
        for label, points in curves.items():
            gen.plot(*zip(*points), "o-", label=label)
        gen.set_xlabel("optimizer step")
        gen.set_ylabel("score on the validation sample (0-100)")
        gen.grid(alpha=0.3)
        gen.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
