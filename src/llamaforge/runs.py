"""A run directory, typed: the contract between training and everything that reads its result.

`llamaforge train` writes `runs/<name>/` (see docs/architecture.md): `run.json` (status, base
model, method, weights folder, template name, dataset sha256, step), the weights folder
(`adapter/` or `model/`, with the tokenizer and `llamaforge_template.json`), `val.jsonl` (the
validation conversations exactly as training measured them), `config.yaml`, `data_card.json`,
`metrics.jsonl`. `Run.open(dir)` checks all of that once; `run.load()` is the one loader of
"base + adapter" (eval, export, merge, generate and chat all go through it), so a run is read
the same way everywhere.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from llamaforge.config import load_config
from llamaforge.data.types import Conversation
from llamaforge.errors import ModelSourceError
from llamaforge.padding import ensure_pad_token
from llamaforge.registry import METHODS
from llamaforge.templates import get_template, load_template

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
VAL_FILE = "val.jsonl"
Status = Literal["running", "completed", "interrupted", "diverged", "failed"]
STATUSES: tuple[str, ...] = ("running", "completed", "interrupted", "diverged", "failed")
WEIGHTS = {"adapter": "adapter_config.json", "model": "config.json"}  # folder -> the file that proves it
UNFINISHED = {
    "running": "training has not finished, or its process was killed before saving",
    "interrupted": "training was interrupted; finish it with `llamaforge train <run>/config.yaml --resume <run>`",
    "diverged": "training diverged (the loss became NaN or infinite)",
}


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def run_status(path: str | Path) -> str | None:
    """The status in run.json; None when there is no readable run.json (a process killed before writing it)."""
    try:
        return Run.read(path).status
    except ModelSourceError:
        return None


def weights_kind(method: str) -> str:
    """The folder a method's weights are saved in: "model" (a full fine-tune) or "adapter"."""
    return METHODS.get(method, field="method.name").weights


@dataclass
class Run:
    dir: Path
    base_model: str
    method: str
    weights: str  # "adapter" | "model": the folder under dir
    status: Status | None = None  # None: written before llamaforge recorded it
    template_name: str | None = None  # "template" in run.json
    dataset_sha256: str | None = None
    step: int | None = None
    total_steps: int | None = None

    # ------------------------------------------------------------------ reading
    @classmethod
    def read(cls, path: str | Path) -> Run:
        """run.json, parsed and type-checked; the weights may be missing (a run still training, or failed)."""
        path = Path(path)
        file = path / RUN_FILE
        if not file.is_file():
            raise ModelSourceError(f"{path} is not a llamaforge run (no {RUN_FILE})")
        try:
            info = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelSourceError(f"{file}: not readable JSON: {exc}") from None
        if not isinstance(info, dict):
            raise ModelSourceError(f"{file}: must be a JSON object, got {type(info).__name__}")
        missing = [k for k in ("base_model", "method", "weights") if not isinstance(info.get(k), str)]
        if missing:
            raise ModelSourceError(f"{file}: field '{missing[0]}' is missing or not a string")
        if info["weights"] not in WEIGHTS:
            raise ModelSourceError(
                f"{file}: field 'weights' must be one of {', '.join(WEIGHTS)}, got {info['weights']!r}"
            )
        if info.get("status") is not None and info["status"] not in STATUSES:
            raise ModelSourceError(
                f"{file}: field 'status' must be one of {', '.join(STATUSES)}, got {info['status']!r}"
            )
        info["template_name"] = info.pop("template", None)
        known = {f.name for f in fields(cls)} - {"dir"}
        return cls(dir=path, **{k: v for k, v in info.items() if k in known})

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """A finished run whose weights can be loaded: run.json valid, status completed (or not recorded,
        as in a hand-written run.json) and the weights folder complete. The one gate every consumer
        (eval, export, merge, serve, chat, generate) goes through: an unfinished run is half a result."""
        run = cls.read(path)
        if run.status not in (None, "completed"):
            why = UNFINISHED.get(run.status, "it did not complete")
            raise ModelSourceError(
                f"{run.dir}: run status is '{run.status}', not 'completed': {why}. Its weights are not used"
            )
        proof = run.weights_dir / WEIGHTS[run.weights]
        if not proof.is_file():
            what = "adapter" if run.is_adapter else "model weights"
            raise ModelSourceError(
                f"{run.dir} has no {what} at {run.weights_dir} (no {proof.name}; status "
                f"{run.status or 'unknown'}: was training interrupted before saving?)"
            )
        return run

    def as_dict(self) -> dict[str, Any]:
        """run.json's recorded fields as written (names as in the file; unrecorded ones left out)."""
        info = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "dir"}
        info["template"] = info.pop("template_name")
        return {k: v for k, v in info.items() if v is not None}

    @property
    def weights_dir(self) -> Path:
        return self.dir / self.weights

    @property
    def is_adapter(self) -> bool:
        return self.weights == "adapter"

    def config(self):
        """The resolved job config the run was trained with (config.yaml)."""
        return load_config(self.dir / "config.yaml")

    # ------------------------------------------------------------------ loading
    def tokenizer(self):
        """The tokenizer saved with the weights (pad set as in training)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.weights_dir)
        ensure_pad_token(tokenizer)
        return tokenizer

    def template(self, tokenizer=None):
        """The chat template training used (it travels with the weights, Llama 3 item 4)."""
        return load_template(self.weights_dir, tokenizer if tokenizer is not None else self.tokenizer())

    def load(self, *, dtype: Any = "float32", quantization: str = "none", merge: bool = False):
        """(model, tokenizer): a full fine-tune's own weights, or the base with the adapter on top.

        `merge` folds the adapter into an in-memory copy of its base (faster generation, same numbers up
        to rounding) when its method is mergeable; never into 4/8-bit weights (Llama 3 item 9). A method
        this process has not registered is merged unless it is prompt learning. The model is in eval mode."""
        from llamaforge.models import load_model  # torch: reading a run's status needs none

        if not self.is_adapter:
            return load_model(str(self.weights_dir), dtype=dtype, quantization=quantization)
        from peft import PeftModel

        base, _ = load_model(self.base_model, dtype=dtype, quantization=quantization)
        model = PeftModel.from_pretrained(base, self.weights_dir)
        prompt_learning = getattr(model.active_peft_config, "is_prompt_learning", False)
        mergeable = METHODS.get(self.method).mergeable if self.method in METHODS else not prompt_learning
        if merge and quantization == "none" and mergeable:
            model = model.merge_and_unload()
        model.eval()
        return model, self.tokenizer()

    def val_conversations(self) -> list[Conversation]:
        """The validation conversations training measured its eval loss on (system prompt applied)."""
        path = self.dir / VAL_FILE
        if not path.is_file():
            raise ModelSourceError(
                f"{self.dir} has no {VAL_FILE} (trained without validation data, or by an older llamaforge): "
                "give held-out data explicitly"
            )
        convs = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                try:
                    convs.append(Conversation.from_dict(json.loads(line)))
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ModelSourceError(f"{path}:{n}: not a conversation record: {exc}") from None
        return convs

    # ------------------------------------------------------------------ writing (training)
    def write_status(self, status: Status, **changes: Any) -> None:
        """Record the status (and any changed fields, e.g. step) in run.json."""
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        self.status = status
        for key, value in changes.items():
            if key not in {f.name for f in fields(self)} - {"dir"}:
                raise ValueError(f"run.json has no field {key!r}")
            setattr(self, key, value)
        info = {k: v for k, v in asdict(self).items() if k != "dir"}
        info["template"] = info.pop("template_name")
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{RUN_FILE}.{os.getpid()}.tmp"  # per process: every process of a launch writes it
        tmp.write_text(json.dumps(info, indent=2), encoding="utf-8")
        tmp.replace(self.dir / RUN_FILE)  # a reader never sees half a run.json


def write_val_conversations(run_dir: Path, convs: list[Conversation]) -> None:
    """val.jsonl: written once by training so that readers never re-derive the split."""
    with open(Path(run_dir) / VAL_FILE, "w", encoding="utf-8") as fh:
        for conv in convs:
            fh.write(json.dumps(conv.to_dict(), ensure_ascii=False, default=str) + "\n")


def load_for_inference(source: str, *, template_name: str = "auto", dtype: Any = "float32"):
    """(model, tokenizer, template) of a run directory or any model source, ready to generate."""
    from llamaforge.models import load_model

    if is_run_dir(source):
        run = Run.open(source)
        model, tokenizer = run.load(dtype=dtype)
        return model, tokenizer, run.template(tokenizer)
    model, tokenizer = load_model(source, dtype=dtype)
    return model, tokenizer, get_template(template_name, tokenizer)
