"""Llama models and LoRA adapters from transformers/peft folders to GGUF files for llama.cpp / Ollama.

Built on the PyPI `gguf` package (writer, tensor name map, numpy quantisers); it has no converter,
so this follows what llama.cpp's convert_hf_to_gguf.py does for `LlamaForCausalLM`:

- hyper-parameters under `llama.*`; RoPE base, dimension and scaling (`linear` as metadata,
  Llama 3.1's `llama3` as a `rope_freqs` tensor of per-frequency divisors);
- the tokenizer (see `gguf_tokenizer`), chat template included;
- q/k projection rows permuted from HF's rotate-half layout to llama.cpp's interleaved one;
- tied embeddings: no `output.weight` tensor, llama.cpp reuses `token_embd`;
- LoRA adapters alone: export/gguf_lora.py;
- tensor types: norms, biases and other 1-D tensors stay F32; 2-D weights take the requested type,
  falling back to F16 when a row is not a whole number of quantisation blocks. For the 4-bit types
  the output projection (or the tied embedding that serves as one) is kept at Q8_0, as
  llama-quantize keeps it at a higher precision.

Tensors are streamed: header and tensor infos are written first, then one tensor at a time is
loaded, converted and appended, so memory stays at about one tensor. The file is written beside its
target and renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llamaforge.errors import ModelSourceError
from llamaforge.export.manifest import ExportError, atomic_file

DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


def gguf_module():
    import gguf

    return gguf


def quant_type(name: str):
    g = gguf_module()
    T = g.GGMLQuantizationType
    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}[name]


def file_type(name: str):
    F = gguf_module().LlamaFileType
    return {
        "f32": F.ALL_F32,
        "f16": F.MOSTLY_F16,
        "bf16": F.MOSTLY_BF16,
        "q8_0": F.MOSTLY_Q8_0,
        "q4_0": F.MOSTLY_Q4_0,
        "q4_1": F.MOSTLY_Q4_1,
    }[name]


# ---------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class LlamaHParams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    vocab_size: int
    rope_theta: float
    rope: (
        dict  # rope_type plus its parameters (factor, low/high_freq_factor, original_max_position_embeddings)
    )
    tied: bool
    explicit_head_dim: bool  # config.json states head_dim: llama.cpp then writes key/value lengths

    @classmethod
    def from_config(cls, cfg: dict, where: str = "config.json") -> LlamaHParams:
        archs = cfg.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and not (
            not archs and cfg.get("model_type") == "llama"
        ):
            raise ModelSourceError(
                f"{where}: architecture {archs or cfg.get('model_type')} cannot be exported to GGUF; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if cfg.get("quantization_config"):
            raise ModelSourceError(
                f"{where}: the model is quantized ({cfg['quantization_config'].get('quant_method', '?')}); "
                "export a merged full-precision model to GGUF instead"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelSourceError(
                f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (llama.cpp uses silu)"
            )
        try:
            n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            rope_type = rope.get("rope_type", rope.get("type")) or "default"
            theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
            hp = cls(
                n_layer=int(cfg["num_hidden_layers"]),
                n_embd=n_embd,
                n_ff=int(cfg["intermediate_size"]),
                n_head=n_head,
                n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
                head_dim=int(cfg.get("head_dim") or n_embd // n_head),
                n_ctx=int(cfg.get("max_position_embeddings", 2048)),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                vocab_size=int(cfg["vocab_size"]),
                rope_theta=float(theta),
                rope={**rope, "rope_type": rope_type},
                tied=bool(cfg.get("tie_word_embeddings", False)),
                explicit_head_dim="head_dim" in cfg,
            )
        except KeyError as exc:
            raise ModelSourceError(f"{where}: missing {exc.args[0]!r}") from None
        if rope_type not in ("default", "linear", "llama3"):
            raise ModelSourceError(
                f"{where}: RoPE type {rope_type!r} is not supported for GGUF export "
                "(supported: default, linear, llama3)"
            )
        return hp


def read_config(model_dir: Path) -> LlamaHParams:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelSourceError(f"{model_dir} is not a transformers model folder: config.json is missing")
    return LlamaHParams.from_config(json.loads(path.read_text(encoding="utf-8")), where=str(path))


def llama3_rope_factors(hp: LlamaHParams) -> np.ndarray:
    """Per-frequency divisors llama.cpp applies for `rope_type: llama3` (its `rope_freqs` tensor)."""
    r = hp.rope
    factor = float(r.get("factor", 8.0))
    low, high = float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
    old_ctx = float(r.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    return out.astype(np.float32)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved pairs, per head (rows = n_head * head_dim)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# weights


def weight_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, checking that every file named by an index exists."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise ModelSourceError(
                f"{model_dir}: shard(s) named in {index.name} are missing: {', '.join(missing)}"
            )
        return {name: model_dir / f for name, f in weight_map.items()}
    files = sorted(model_dir.glob("model*.safetensors"))  # not adapter_model.safetensors lying beside
    if not files:
        pickled = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(
            p.name for p in model_dir.glob("*.pt")
        )
        hint = (
            f" (found {', '.join(pickled)}: pickled weights are never loaded; re-save as safetensors)"
            if pickled
            else ""
        )
        raise ModelSourceError(f"{model_dir}: no model*.safetensors weights{hint}")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[name] = f
    return out


def tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(set(files.values())):
        with safe_open(f, framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118
                if name in files:
                    shapes[name] = tuple(fh.get_slice(name).get_shape())
    missing = sorted(set(files) - set(shapes))
    if missing:
        raise ModelSourceError(f"tensors named in the index are missing from their files: {missing[:5]}")
    return shapes


@dataclass
class _Planned:
    gguf_name: str
    hf_name: str | None  # None: generated (rope_freqs)
    shape: tuple[int, ...]  # numpy (row-major) shape of the float tensor
    qtype: Any
    permute_heads: int | None = None

    @property
    def nbytes(self) -> int:
        from gguf.quants import quant_shape_to_byte_shape

        return int(np.prod(quant_shape_to_byte_shape(self.shape, self.qtype)))


def _choose_qtype(gguf_name: str, shape: tuple[int, ...], dtype: str, hp: LlamaHParams):
    T = gguf_module().GGMLQuantizationType
    if len(shape) < 2 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return T.F32
    wanted = quant_type(dtype)
    is_output = gguf_name == "output.weight" or (hp.tied and gguf_name == "token_embd.weight")
    if dtype in ("q4_0", "q4_1") and is_output:
        wanted = T.Q8_0
    block = gguf_module().GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return T.F16
    return wanted


def plan_tensors(hp: LlamaHParams, shapes: dict[str, tuple[int, ...]], dtype: str) -> list[_Planned]:
    g = gguf_module()
    name_map = g.get_tensor_name_map(g.MODEL_ARCH.LLAMA, hp.n_layer)
    plan: list[_Planned] = []
    unknown: list[str] = []
    for hf_name in sorted(shapes, key=natural_key):
        if hf_name.endswith(_SKIPPED_SUFFIXES) or (hp.tied and hf_name == "lm_head.weight"):
            continue
        new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            unknown.append(hf_name)
            continue
        shape = shapes[hf_name]
        heads = None
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = hp.n_head
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = hp.n_head_kv
        plan.append(_Planned(new, hf_name, shape, _choose_qtype(new, shape, dtype, hp), heads))
    if unknown:
        raise ModelSourceError(
            f"{len(unknown)} tensor(s) do not belong to a plain Llama model, e.g. {unknown[:4]} "
            "(an unmerged adapter or quantized weights? merge first)"
        )
    names = {p.gguf_name for p in plan}
    needed = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not hp.tied else set())
    for i in range(hp.n_layer):
        needed |= {
            f"blk.{i}.{t}.weight"
            for t in (
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "attn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
                "ffn_norm",
            )
        }
    if needed - names:
        raise ModelSourceError(
            f"the weights lack {len(needed - names)} Llama tensor(s), e.g. {sorted(needed - names)[:4]}"
        )
    if hp.rope["rope_type"] == "llama3":
        plan.insert(0, _Planned("rope_freqs.weight", None, (hp.head_dim // 2,), g.GGMLQuantizationType.F32))
    return plan


def natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.replace(".", " . ").split()]


def _load(files: dict[str, Path], name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(files[name], framework="pt") as fh:
        return fh.get_tensor(name).float().numpy()


def _converted(p: _Planned, files: dict[str, Path], hp: LlamaHParams) -> np.ndarray:
    from gguf.quants import quantize

    data = llama3_rope_factors(hp) if p.hf_name is None else _load(files, p.hf_name)
    if p.permute_heads:
        data = permute_qk(data, p.permute_heads)
    return quantize(np.ascontiguousarray(data, dtype=np.float32), p.qtype)


def _add_tensor_info(writer, p: _Planned) -> None:
    from gguf.quants import quant_shape_to_byte_shape

    T = gguf_module().GGMLQuantizationType
    if p.qtype in (T.F32, T.F16):
        np_dtype = np.float32 if p.qtype == T.F32 else np.float16
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np_dtype), p.nbytes, raw_dtype=p.qtype)
    else:
        writer.add_tensor_info(
            p.gguf_name,
            quant_shape_to_byte_shape(p.shape, p.qtype),
            np.dtype(np.uint8),
            p.nbytes,
            raw_dtype=p.qtype,
        )


# ---------------------------------------------------------------------------------------------
# model export


def _add_hparams(writer, hp: LlamaHParams, dtype: str, name: str) -> None:
    g = gguf_module()
    writer.add_type(g.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_vocab_size(hp.vocab_size)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.explicit_head_dim:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if hp.rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(g.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope["factor"]))
    writer.add_file_type(file_type(dtype))
    writer.add_quantization_version(g.GGML_QUANT_VERSION)


def export_gguf(
    model_dir: Path, out_path: Path, *, dtype: str = "f16", overwrite: bool = False, name: str | None = None
) -> Path:
    """Convert a transformers Llama folder (config.json, safetensors, tokenizer) to one GGUF file.

    Raises ModelSourceError for input that cannot be converted and ExportError for an existing
    target (without `overwrite`) or too little disk space; in every failure nothing is left at
    `out_path` (an existing file there is kept as it was).
    """
    from llamaforge.export.gguf_tokenizer import build_vocab

    model_dir, out_path = Path(model_dir), Path(out_path)
    if dtype not in DTYPES:
        raise ExportError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out_path.exists() and not overwrite:
        raise ExportError(f"{out_path} already exists; pass --overwrite (overwrite=True) to replace it")
    if out_path.is_dir():
        raise ExportError(f"{out_path} is a directory; give the path of the .gguf file to write")
    hp = read_config(model_dir)
    files = weight_files(model_dir)
    plan = plan_tensors(hp, tensor_shapes(files), dtype)
    vocab = build_vocab(model_dir, hp.vocab_size)
    metadata_bytes = sum(len(t) + 12 for t in vocab.tokens) + sum(len(m) + 8 for m in vocab.merges)
    estimate = sum(p.nbytes + 64 for p in plan) + metadata_bytes + len(vocab.chat_template or "") + (1 << 20)

    g = gguf_module()
    with atomic_file(out_path, overwrite=overwrite, required_bytes=estimate) as tmp:
        writer = g.GGUFWriter(tmp, g.MODEL_ARCH_NAMES[g.MODEL_ARCH.LLAMA])
        try:
            _add_hparams(writer, hp, dtype, name or model_dir.resolve().name)
            vocab.add_to_writer(writer)
            for p in plan:
                _add_tensor_info(writer, p)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for p in plan:
                writer.write_tensor_data(_converted(p, files, hp))
        finally:
            writer.close()
    return out_path
