"""Llama architecture shapes and parameter counts, from a config.json-style dict.

The tool ships configs of the common sizes (`assets/archs/*.json`), so a plan works without weights:
`load_arch("llama3-8b")`, `load_arch("path/to/config.json")`, or a model folder holding one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from llamaforge.errors import ConfigError

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# Job-file model sources (catalog names, hub ids without "-Instruct") with a shipped architecture.
SOURCE_ALIASES = {
    "smollm2-135m-instruct": "smollm2-135m",
    "huggingfacetb/smollm2-135m": "smollm2-135m",
    "meta-llama/meta-llama-3-8b": "llama3-8b",
    "meta-llama/llama-3.1-8b": "llama3-8b",
    "meta-llama/meta-llama-3.1-8b": "llama3-8b",
    "meta-llama/meta-llama-3-70b": "llama3-70b",
    "meta-llama/llama-3.1-70b": "llama3-70b",
    "meta-llama/meta-llama-3.1-70b": "llama3-70b",
    "meta-llama/llama-3.3-70b": "llama3-70b",
    "meta-llama/llama-3.1-405b": "llama3-405b",
    "meta-llama/meta-llama-3.1-405b": "llama3-405b",
    "meta-llama/llama-3.2-1b": "llama3.2-1b",
    "meta-llama/llama-3.2-3b": "llama3.2-3b",
}


def alias(source: str) -> str | None:
    """The shipped architecture a model source is known to have, if any."""
    key = source.strip().lower()
    stripped = key.removesuffix("-instruct")
    return SOURCE_ALIASES.get(key) or SOURCE_ALIASES.get(stripped)


@dataclass(frozen=True)
class Arch:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool
    max_positions: int
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, cfg: dict, name: str = "custom") -> Arch:
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            return cls(
                name=name,
                hidden=hidden,
                intermediate=int(cfg["intermediate_size"]),
                layers=int(cfg["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab=int(cfg["vocab_size"]),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                max_positions=int(cfg.get("max_position_embeddings", 8192)),
                attention_bias=bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
            )
        except KeyError as exc:
            raise ConfigError(f"architecture config '{name}' lacks {exc.args[0]}") from None

    # ------------------------------------------------------------------ shapes
    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear module of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_bias(self, module: str) -> bool:
        return self.attention_bias if module in ATTENTION_MODULES else self.mlp_bias

    # ------------------------------------------------------------------ counts
    @property
    def layer_linear_params(self) -> int:
        """Weights (and biases) of the seven linear modules of one decoder layer."""
        return sum(fi * fo + (fo if self.linear_bias(m) else 0) for m, (fi, fo) in self.linears().items())

    @property
    def layer_params(self) -> int:
        return self.layer_linear_params + 2 * self.hidden  # + two RMSNorm weights

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        """Separate lm_head weights (0 when tied to the embedding)."""
        return 0 if self.tie_embeddings else self.vocab * self.hidden

    @property
    def decoder_linear_params(self) -> int:
        return self.layers * self.layer_linear_params

    @property
    def total_params(self) -> int:
        return self.embed_params + self.lm_head_params + self.layers * self.layer_params + self.hidden

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: decoder linears and the output projection."""
        return self.decoder_linear_params + self.vocab * self.hidden

    @property
    def largest_param(self) -> int:
        return max(self.embed_params, max(fi * fo for fi, fo in self.linears().values()))

    # ------------------------------------------------------------------ LoRA
    def lora_modules(self, targets: str | list[str]) -> list[str]:
        """Linear module names of one layer that the LoRA targets select ('all-linear', 'attention', names)."""
        if isinstance(targets, str):
            if targets == "all-linear":
                return list(LINEAR_MODULES)
            if targets == "attention":
                return list(ATTENTION_MODULES)
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        chosen = [m for m in LINEAR_MODULES if any(t == m or t.endswith("." + m) for t in targets)]
        unknown = [
            t
            for t in targets
            if t.split(".")[-1] not in LINEAR_MODULES and t not in ("embed_tokens", "lm_head")
        ]
        if unknown or not chosen:
            raise ConfigError(
                f"LoRA targets {targets} select no decoder linear of a Llama layer; use 'all-linear', 'attention' "
                f"or names among {', '.join(LINEAR_MODULES)}"
            )
        return chosen

    def lora_params(self, rank: int, targets: str | list[str], dora: bool = False) -> int:
        """Adapter parameters: r*(in+out) per targeted module (+ out for DoRA's magnitude vector)."""
        per_layer = 0
        for module in self.lora_modules(targets):
            fi, fo = self.linears()[module]
            per_layer += rank * (fi + fo) + (fo if dora else 0)
        return self.layers * per_layer

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_positions,
            "params": self.total_params,
        }


def shipped_archs() -> list[str]:
    folder = resources.files("llamaforge") / "assets" / "archs"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_arch(spec: str) -> Arch:
    """A shipped name (llama3-8b, ...), a config.json path, or a model folder holding config.json."""
    name = alias(spec) or spec
    shipped = resources.files("llamaforge") / "assets" / "archs" / f"{name}.json"
    if shipped.is_file():
        return Arch.from_config(json.loads(shipped.read_text(encoding="utf-8")), name)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the LM under text_config
        name = path.parent.name if path.name == "config.json" else path.stem
        return Arch.from_config(cfg, cfg.get("_name_or_path") or name if name in ("hf", "") else name)
    raise ConfigError(
        f"unknown model '{spec}': give a shipped architecture ({', '.join(shipped_archs())}), "
        "a config.json, or a model folder"
    )
