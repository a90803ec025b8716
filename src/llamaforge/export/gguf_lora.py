"""PEFT LoRA adapters to GGUF LoRA adapter files for llama.cpp (`llama-cli --lora`), beside the base
model's GGUF (export/gguf.py, whose tensor names, q/k permutation and hyper-parameters it shares).

llama.cpp applies one alpha per file and scales each delta by alpha / rank: rsLoRA and per-module
rank/alpha patterns are folded into the B matrices so the applied delta equals PEFT's. Embedding
LoRA, DoRA magnitudes and full tensors (modules_to_save) have no llama.cpp adapter form and are
refused with the reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llamaforge.errors import ModelSourceError
from llamaforge.export.gguf import (
    LlamaHParams,
    file_type,
    gguf_module,
    natural_key,
    permute_qk,
    quant_type,
    read_config,
)
from llamaforge.export.manifest import ExportError, atomic_file

LORA_DTYPES = ("f32", "f16", "bf16")


def _adapter_tensors(adapter_dir: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        extra = (
            " (adapter_model.bin is pickled and never loaded)"
            if (adapter_dir / "adapter_model.bin").exists()
            else ""
        )
        raise ModelSourceError(f"{adapter_dir}: adapter_model.safetensors is missing{extra}")
    with safe_open(path, framework="pt") as fh:
        return {k: fh.get_tensor(k).float().numpy() for k in fh.keys()}  # noqa: SIM118


def _lora_pairs(tensors: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(module name, A, B) per adapted Linear; anything else is refused with the reason."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name = key.removeprefix("base_model.model.")
        if "lora_embedding_" in name or "lora_magnitude_vector" in name:
            what = "an embedding LoRA" if "lora_embedding_" in name else "a DoRA magnitude vector"
            raise ExportError(
                f"the adapter holds {what} ({key}); llama.cpp LoRA adapters support Linear LoRA only"
            )
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if name.endswith(marker):
                pairs.setdefault(name[: -len(marker)], {})[part] = value
                break
        else:
            raise ExportError(
                f"the adapter holds a full tensor {key} (modules_to_save?) that a llama.cpp "
                "LoRA adapter cannot carry; merge and export the model instead"
            )
    for module, ab in sorted(pairs.items(), key=lambda kv: natural_key(kv[0])):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ExportError(f"the adapter has only {sorted(ab)} for {module}")
        yield module, ab["lora_A"], ab["lora_B"]


def _module_scale(module: str, cfg: dict) -> tuple[int, float]:
    """(rank, alpha) PEFT uses for `module`, honouring rank_pattern / alpha_pattern."""

    def pick(pattern: dict, default):
        for key, value in (pattern or {}).items():
            if re.match(rf"(.*\.)?{key}$", module):
                return value
        return default

    return int(pick(cfg.get("rank_pattern"), cfg["r"])), float(
        pick(cfg.get("alpha_pattern"), cfg["lora_alpha"])
    )


def export_lora_gguf(
    adapter_dir: Path,
    base_config: Path | dict,
    out_path: Path,
    *,
    dtype: str = "f32",
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Write a PEFT LoRA adapter as a llama.cpp GGUF LoRA adapter (for `llama-cli --lora`).

    `base_config` is the base model folder, its config.json, or the config dict. llama.cpp scales
    each delta by alpha / rank with one alpha for the file; rsLoRA and per-module rank/alpha
    patterns are folded into the B matrices so that the applied delta equals PEFT's. q/k B rows are
    permuted like the base weights (A is untouched).
    """
    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    if dtype not in LORA_DTYPES:
        raise ExportError(f"GGUF LoRA dtype must be one of {', '.join(LORA_DTYPES)}, got {dtype!r}")
    if out_path.exists() and not overwrite:
        raise ExportError(f"{out_path} already exists; pass --overwrite (overwrite=True) to replace it")
    if isinstance(base_config, dict):
        hp = LlamaHParams.from_config(base_config, where="base config")
    else:
        base_config = Path(base_config)
        hp = (
            read_config(base_config)
            if base_config.is_dir()
            else LlamaHParams.from_config(
                json.loads(base_config.read_text(encoding="utf-8")), where=str(base_config)
            )
        )
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ModelSourceError(f"{adapter_dir} is not a PEFT adapter: adapter_config.json is missing")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{cfg_path}: peft_type {cfg.get('peft_type')} is not LoRA")
    if cfg.get("use_dora"):
        raise ExportError(
            f"{cfg_path}: DoRA adapters cannot be written as llama.cpp LoRA adapters; merge and export the model"
        )

    g = gguf_module()
    name_map = g.get_tensor_name_map(g.MODEL_ARCH.LLAMA, hp.n_layer)
    rslora = bool(cfg.get("use_rslora"))
    alpha = float(cfg["lora_alpha"]) * (math.sqrt(cfg["r"]) if rslora else 1.0)
    qtype = quant_type(dtype)
    out: list[tuple[str, np.ndarray]] = []
    for module, a, b in _lora_pairs(_adapter_tensors(adapter_dir)):
        if module == "lm_head" and hp.tied:
            raise ExportError(
                "the adapter changes lm_head, which the base model ties to the embeddings; "
                "llama.cpp cannot apply that as an adapter (merge and export instead)"
            )
        new = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if new is None:
            raise ExportError(f"the adapter targets {module}, which is not a Llama tensor")
        rank, m_alpha = _module_scale(module, cfg)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ExportError(f"{module}: lora_A {a.shape} / lora_B {b.shape} do not match rank {rank}")
        peft_scale = m_alpha / (math.sqrt(rank) if rslora else rank)
        correction = peft_scale / (alpha / rank)
        if not math.isclose(correction, 1.0, rel_tol=1e-9):
            b = b * correction
        if module.endswith("q_proj"):
            b = permute_qk(b, hp.n_head)
        elif module.endswith("k_proj"):
            b = permute_qk(b, hp.n_head_kv)
        out += [(new + ".lora_a", a), (new + ".lora_b", b)]
    if not out:
        raise ExportError(f"{adapter_dir}: the adapter holds no LoRA tensors")

    from gguf.quants import quantize

    estimate = sum(x.size * 4 for _, x in out) + (1 << 20)
    with atomic_file(out_path, overwrite=overwrite, required_bytes=estimate) as tmp:
        writer = g.GGUFWriter(tmp, g.MODEL_ARCH_NAMES[g.MODEL_ARCH.LLAMA])
        try:
            writer.add_type(g.GGUFType.ADAPTER)
            writer.add_name(name or adapter_dir.resolve().name)
            writer.add_string(g.Keys.Adapter.TYPE, "lora")
            writer.add_float32(g.Keys.Adapter.LORA_ALPHA, alpha)
            writer.add_file_type(file_type(dtype))
            writer.add_quantization_version(g.GGML_QUANT_VERSION)
            for tensor_name, data in out:
                writer.add_tensor(
                    tensor_name,
                    quantize(np.ascontiguousarray(data, dtype=np.float32), qtype),
                    raw_dtype=qtype,
                )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out_path
