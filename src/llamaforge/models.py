"""Load a base model and tokenizer from a catalog name, a local folder, a GGUF file or a hub id;
a finished run is read through runs.py."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from llamaforge import catalog
from llamaforge.dtypes import torch_dtype
from llamaforge.errors import ModelSourceError
from llamaforge.offline import is_offline
from llamaforge.padding import PAD_CANDIDATES, ensure_pad_token  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


@dataclass
class Source:
    kind: str  # "catalog" | "folder" | "gguf" | "hub"
    path: str  # local path, or the hub id


def classify_source(source: str) -> Source:
    if source in catalog.CATALOG:
        return Source("catalog", source)
    path = Path(source).expanduser()
    if path.is_dir():
        return Source("folder", str(path))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {path}")
        return Source("gguf", str(path))
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelSourceError(
            f"model source '{source}' is neither a transformers folder, a .gguf file nor a catalog name "
            f"({', '.join(catalog.CATALOG)})"
        )
    return Source("hub", source)


def local_path(source: str) -> Path | str:
    """A folder for catalog, folder and GGUF sources (GGUF converted once, cached); the id for hub sources."""
    src = classify_source(source)
    if src.kind == "catalog":
        return catalog.resolve(src.path)
    if src.kind == "gguf":
        gguf = Path(src.path)
        out = catalog.home() / "gguf" / catalog.sha256_file(gguf)[:16]
        if not (out / "config.json").is_file():
            catalog.convert_gguf_to_folder(gguf, out)
        return out
    if src.kind == "folder":
        folder = Path(src.path)
        if not (folder / "config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
            raise ModelSourceError(f"{folder} has no config.json: not a transformers model folder")
        return folder
    return src.path


def _hub_kwargs(source: str) -> dict:
    if classify_source(source).kind != "hub":
        return {}
    return {"local_files_only": is_offline()}


def _explain_load_failure(source: str, exc: Exception) -> ModelSourceError:
    if classify_source(source).kind == "hub" and is_offline():
        return ModelSourceError(
            f"'{source}' looks like a hub id, but no model hub is reachable (HF_HUB_OFFLINE=1) and it is not in "
            f"the local cache. Use a local folder, a .gguf file, or a catalog name ({', '.join(catalog.CATALOG)})."
        )
    return ModelSourceError(f"could not load model '{source}': {type(exc).__name__}: {exc}")


def load_tokenizer(source: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = local_path(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, **_hub_kwargs(source)
        )
    except Exception as exc:  # noqa: BLE001
        raise _explain_load_failure(source, exc) from exc
    ensure_pad_token(tokenizer)
    return tokenizer


def sharded_launch() -> bool:
    """An accelerate launch that shards parameters (FSDP, DeepSpeed ZeRO-3), read from the variables
    `accelerate launch` sets from its config file."""
    env = os.environ
    fsdp = env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    zero3 = (
        env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
        and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3"
    )
    return fsdp or zero3


def bitsandbytes_supports(device: torch.device) -> bool:
    """bitsandbytes imports and quantises on `device` (a 64-value probe: its backends vary by platform)."""
    try:
        import bitsandbytes as bnb

        bnb.functional.quantize_4bit(torch.ones(64, device=device), quant_type="nf4")
    except Exception:  # noqa: BLE001 - no library, no backend for this device, or a broken install
        return False
    return True


def resolve_quantization_backend(backend: str = "auto", device: torch.device | None = None) -> str:
    """The 4-bit backend to use: "auto" takes bitsandbytes where it runs on the device, else torchao."""
    from llamaforge.device import default_device
    from llamaforge.errors import ConfigError
    from llamaforge.quant_nf4 import torchao_nf4_available

    device = device or default_device()
    if backend in ("auto", "bitsandbytes") and bitsandbytes_supports(device):
        return "bitsandbytes"
    if backend == "bitsandbytes":
        raise ConfigError(
            f"model.quantization_backend=bitsandbytes: bitsandbytes does not run on {device.type} "
            "here (not installed, or no backend for this device); use torchao or auto"
        )
    if torchao_nf4_available():
        return "torchao"
    if backend == "torchao":
        raise ConfigError(
            "model.quantization_backend=torchao: torchao is not installed (pip install torchao)"
        )
    raise ConfigError(
        "4-bit loading needs bitsandbytes or torchao, and neither runs here: "
        "pip install bitsandbytes (or torchao)"
    )


def _quantization_config(quantization: str, dtype: torch.dtype = torch.bfloat16):
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # FSDP and ZeRO-3 flatten each unit's parameters into one tensor of one dtype: the 4-bit weights
    # must then be stored in the dtype of the other weights (bf16), not packed in uint8.
    storage = {"bnb_4bit_quant_storage": dtype} if sharded_launch() else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        **storage,
    )


def keep_4bit_gradients_exact(model) -> None:
    """bitsandbytes repacks 4-bit weights for an AVX512-BF16 CPU kernel on the first no-grad forward;
    later backward passes then go through a kernel with no autograd and gradients are silently wrong
    (DESIGN.md). Opting out of that kernel on every Linear4bit keeps them exact.

    A model holding a Linear4bit was built by an imported bitsandbytes: without it in sys.modules there
    is nothing to do, and importing it here would cost every non-quantized load ~3 s."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_model(
    source: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    quantization: str = "none",
    quantization_backend: str = "auto",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """(model, tokenizer). The model is in eval mode; callers switch to train.

    4-bit goes through bitsandbytes where it runs, else torchao's NF4 (`quantization_backend`);
    8-bit is bitsandbytes only."""
    from transformers import AutoModelForCausalLM

    from llamaforge.errors import ConfigError

    dtype = torch_dtype(dtype)
    backend = "none"
    if quantization == "8bit":
        backend = "bitsandbytes"
        if quantization_backend == "torchao":
            raise ConfigError(
                "model.quantization=8bit needs bitsandbytes; torchao's fallback is 4-bit NF4 only"
            )
    elif quantization == "4bit":
        backend = resolve_quantization_backend(quantization_backend)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    path = local_path(source)
    if backend == "bitsandbytes" and quantization == "4bit" and sharded_launch() and dtype != torch.bfloat16:
        log.warning(
            "FSDP/ZeRO-3 with a 4-bit base: loading the other weights in bfloat16 to match the 4-bit storage"
        )
        dtype = torch.bfloat16
    kwargs = dict(
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        **_hub_kwargs(source),
    )
    if revision:
        kwargs["revision"] = revision
    if backend == "bitsandbytes":
        kwargs["quantization_config"] = _quantization_config(quantization, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise _explain_load_failure(source, exc) from exc
    if backend == "torchao":
        from llamaforge.quant_nf4 import quantize_nf4

        log.info("4-bit NF4 through torchao: %d linear layers quantised", quantize_nf4(model))
    keep_4bit_gradients_exact(model)  # also for folders saved already quantized
    ensure_pad_token(tokenizer, model)
    model.eval()
    return model, tokenizer


def warn_if_chat_tokens_untrained(model, tokenizer, template) -> list[str]:
    """Base models carry the chat tokens in their vocabulary but never trained them (Llama 3 item 5)."""
    emb = model.get_input_embeddings().weight.detach().float()
    norms = emb.norm(dim=-1)
    typical = norms.median().item()
    vocab = tokenizer.get_vocab()
    special = [
        t
        for t in tokenizer.all_special_tokens
        + ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
        if t in template.jinja
    ]
    weak = sorted({t for t in special if t in vocab and norms[vocab[t]].item() < 0.2 * typical})
    if weak:
        log.warning(
            "the chat tokens %s look untrained in this model (embedding norm far below typical): it is probably a "
            "base model. Train them with method.modules_to_save=[embed_tokens,lm_head] or use a plain template.",
            ", ".join(weak),
        )
    return weak
