"""What a hot-loaded adapter must be before it touches the model, and loading it so that a failure
leaves nothing behind.

- Confined: the folder and every file in it (symlinks resolved) lie under `serve.adapter_dirs`, so a
  weights file that links out of an allowed folder is refused, not read.
- Safe to read: safetensors weights only (pickles are never loaded), a bounded adapter_config.json.
- Sane: a LoRA config with a rank within `serve.max_lora_rank`, target modules that exist in the
  base; DoRA is recorded (peft cannot mix DoRA rows with others in one forward: the engine batches
  a DoRA adapter only with itself).
- Transactional: peft registers an adapter before it reads the weights; when reading fails (a rank
  that does not match the weights, a corrupt file), `attach` removes every trace of it, so the next
  unload can never activate a half-loaded adapter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from llamaforge.errors import ConfigError

_MAX_CONFIG_BYTES = 1_000_000
_MAX_FILES = 1000


@dataclass
class Adapter:
    name: str
    path: str  # resolved folder (never shown to clients)
    template: object
    rank: int
    dora: bool = False


def _inside(path: Path, allowed: list[Path]) -> bool:
    return any(path == d or path.is_relative_to(d) for d in allowed)


def check_adapter_path(path: str, adapter_dirs: list[str], *, check_dirs: bool = True) -> Path:
    """A folder under one of `adapter_dirs` whose every file resolves there too, with
    adapter_config.json and adapter_model.safetensors as regular files."""
    real = Path(path).expanduser().resolve()
    if check_dirs:
        allowed = [Path(d).expanduser().resolve() for d in adapter_dirs]
        if not allowed:
            raise ConfigError("no adapter directory is allowed (serve.adapter_dirs is empty)")
        if not _inside(real, allowed):
            raise ConfigError(
                f"adapter path {path} is outside the allowed adapter directories (serve.adapter_dirs)"
            )
        if real.is_dir():
            for n, entry in enumerate(real.rglob("*")):
                if n >= _MAX_FILES:
                    raise ConfigError(f"{path} holds more than {_MAX_FILES} files: not an adapter folder")
                if not _inside(entry.resolve(), allowed):
                    raise ConfigError(
                        f"{path}: {entry.relative_to(real)} links outside the allowed adapter directories "
                        "(serve.adapter_dirs); every file of an adapter must be inside them"
                    )
    if not real.is_dir():
        raise ConfigError(f"{path} is not a folder")
    if not (real / "adapter_config.json").is_file():
        raise ConfigError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    if not (real / "adapter_model.safetensors").is_file():
        pickles = [p.name for p in real.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        raise ConfigError(
            f"{path} has no adapter_model.safetensors"
            + (f" (only {', '.join(pickles)}: pickled weights are never loaded)" if pickles else "")
        )
    return real


def lora_config(real: Path, path: str) -> dict:
    """The adapter's config, parsed; only LoRA can be hot-swapped (peft's mixed batches and unload need it)."""
    file = real / "adapter_config.json"
    if file.stat().st_size > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}/adapter_config.json is larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}/adapter_config.json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}/adapter_config.json: expected a JSON object")
    if config.get("peft_type", "LORA") not in ("LORA",):
        raise ConfigError(
            f"{path}/adapter_config.json: peft_type {config.get('peft_type')!r}: only LoRA adapters can be hot-swapped"
        )
    return config


def check_lora_config(config: dict, path: str, base, max_rank: int) -> None:
    """Refuse a config peft would choke on, or that does not fit this base model, naming the field."""
    where = f"{path}/adapter_config.json"
    rank = config.get("r", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max_rank:
        raise ConfigError(
            f"{where}: r={rank!r} must be an integer from 1 to {max_rank} (serve.max_lora_rank)"
        )
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or any(
        not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= max_rank for v in pattern.values()
    ):
        raise ConfigError(f"{where}: rank_pattern ranks must be integers from 1 to {max_rank}")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ConfigError(f"{where}: lora_alpha={alpha!r} must be a positive number")
    if not isinstance(config.get("use_dora", False), bool):
        raise ConfigError(f"{where}: use_dora must be true or false")
    names = [name for name, _ in base.named_modules()]
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                regex = re.compile(targets)
            except re.error as exc:
                raise ConfigError(f"{where}: target_modules is not a valid regex: {exc}") from None
            if not any(regex.fullmatch(n) for n in names):
                raise ConfigError(f"{where}: target_modules '{targets}' matches no module of the base model")
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise ConfigError(f"{where}: target_modules {missing} do not exist in the base model")
    else:
        raise ConfigError(f"{where}: target_modules must be a non-empty list of module names or a regex")


def attach(model, name: str, folder: Path):
    """`model` with the adapter loaded (a PeftModel); on failure, `model` as it was and the error raised."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        before = model.active_adapter
        try:
            model.load_adapter(str(folder), adapter_name=name)
        except BaseException:
            forget(model, name)
            if before in model.peft_config:
                model.set_adapter(before)
            raise
        return model
    try:
        return PeftModel.from_pretrained(model, str(folder), adapter_name=name)
    except BaseException:
        strip_lora(model)
        raise


def detach(model, name: str):
    """`model` without the adapter: the bare base when it was the last one (nothing merged)."""
    if len(model.peft_config) <= 1:
        return model.unload()
    model.delete_adapter(name)
    model.set_adapter(next(iter(model.peft_config)))  # a loaded adapter is active, never a removed one
    return model


def forget(model, name: str) -> None:
    """Remove every trace of adapter `name` from a PeftModel (its config and each layer's weights)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model.peft_config.pop(name, None)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.delete_adapter(name)


def strip_lora(model) -> None:
    """Put back the plain layers wherever peft wrapped one (a failed first load leaves wrappers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    done: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer) or any(name.startswith(d + ".") for d in done):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
        done.append(name)
    if hasattr(model, "peft_config"):
        del model.peft_config


def loaded_names(model) -> set[str]:
    """Adapters peft holds (empty for a bare base)."""
    from peft import PeftModel

    return set(model.peft_config) if isinstance(model, PeftModel) else set()
