"""A transformers byte-level BPE tokenizer as GGUF metadata, the way llama.cpp reads it.

Written for the Llama 3 tokenizer and SmolLM2's (both `tokenizer.ggml.model = "gpt2"`). What
llama.cpp needs and where it comes from here:

- tokens, one per id up to the model's `vocab_size` (unused ids become `[PAD<id>]`), each typed
  NORMAL, CONTROL (special added tokens, or ones spelled `<|...|>`) or USER_DEFINED;
- the merges (as the `gguf` package's `SpecialVocab` stores them), bos/eos/unk/pad ids from the
  tokenizer (else config.json), eot/eom found by their Llama 3 / ChatML text, the chat template;
- whether BOS/EOS are added, measured by encoding a string rather than trusting a flag;
- the pre-tokenizer name: llama.cpp picks its split regex by this name, and names a vocabulary by
  hashing the ids of one test string (see `get_vocab_base_pre` in llama.cpp's
  convert_hf_to_gguf.py). Known hashes are matched first, then the tokenizer.json pre-tokenizer
  shape; anything else is refused, since a wrong name silently changes tokenisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

from llamaforge.errors import ModelSourceError

# llama.cpp's pre-tokenizer probe string (convert_hf_to_gguf_update.py); its token ids are hashed.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(ids of CHKTXT)) -> llama.cpp pre-tokenizer name, as listed in llama.cpp's converter.
KNOWN_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3(.x)
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3
}

LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Token texts llama.cpp treats as end-of-turn / end-of-message.
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")
EOM_TEXTS = ("<|eom_id|>",)

# gguf.TokenType values, kept here so importing this module does not import gguf.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GGUFVocab:
    pre: str
    pre_hash: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, eot, eom, ...
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "pre": self.pre,
            "tokens": len(self.tokens),
            "merges": len(self.merges),
            "special_ids": dict(self.special_ids),
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
            "chat_template": self.chat_template is not None,
        }

    def add_to_writer(self, writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (
        text.startswith("<｜") and text.endswith("｜>")
    )


def _pre_from_structure(tokenizer_json: dict) -> str | None:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["Split", "ByteLevel"]:
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == LLAMA3_SPLIT_REGEX and not steps[1].get("use_regex", True):
            return "llama-bpe"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    return None


def _merges(bpe_model: dict) -> list[str]:
    """tokenizer.json merges as llama.cpp stores them: "left right", a space inside a part as U+0120."""
    out = []
    for merge in bpe_model.get("merges") or []:
        if isinstance(merge, str):
            out.append(merge)
        else:
            out.append(" ".join(part.replace(" ", "\u0120") for part in merge))
    return out


def pre_tokenizer_name(tokenizer, tokenizer_json: dict) -> tuple[str, str]:
    """(llama.cpp pre-tokenizer name, chkhsh) for this tokenizer, or a ModelSourceError."""
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    name = KNOWN_PRE_HASHES.get(chkhsh) or _pre_from_structure(tokenizer_json)
    if name is None:
        raise ModelSourceError(
            f"the tokenizer's pre-tokenizer is not one llama.cpp knows by hash ({chkhsh}) or by shape "
            f"({json.dumps(tokenizer_json.get('pre_tokenizer'))[:200]}); exporting it to GGUF would "
            "tokenize differently in llama.cpp. Supported: Llama 3 (llama-bpe), SmolLM2 (smollm), GPT-2 byte-level."
        )
    return name, chkhsh


def build_vocab(model_dir: Path, vocab_size: int) -> GGUFVocab:
    """Read the tokenizer files of `model_dir` into what a GGUF llama file carries."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise ModelSourceError(
            f"{model_dir} has no tokenizer.json (a fast tokenizer is needed for GGUF export)"
        )
    tokenizer_json = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ModelSourceError(
            f"{tj_path}: only byte-level BPE tokenizers (Llama 3, SmolLM2) can be exported to GGUF here; "
            f"this one is {model.get('type')}{' with byte_fallback (sentencepiece-style)' if model.get('byte_fallback') else ''}"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - report any load failure as a source problem
        raise ModelSourceError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc

    pre, chkhsh = pre_tokenizer_name(tok, tokenizer_json)

    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ModelSourceError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}"
        )
    added = tok.get_added_vocab()
    decoder = getattr(tok, "added_tokens_decoder", {}) or {}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif text in added:
            special = bool(getattr(decoder.get(i), "special", False)) or _looks_special(text)
            tokens.append(text if special else text.replace("\u2581", " "))
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(text)
            types.append(NORMAL)

    merges = _merges(model)
    if not merges:
        raise ModelSourceError(f"{tj_path} has no BPE merges")
    config_path = model_dir / "config.json"
    model_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    ids: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        value = getattr(tok, f"{kind}_token_id", None)
        if not isinstance(value, int):  # the tokenizer has none: the model config may name one
            value = model_config.get(f"{kind}_token_id")
        if isinstance(value, int) and 0 <= value < vocab_size:
            ids[kind] = value
    for kind, texts in (("eot", EOT_TEXTS), ("eom", EOM_TEXTS)):
        found = next((vocab[t] for t in texts if t in vocab), None)
        if found is not None:
            ids[kind] = found

    with_special = tok("a", add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    add_bos = "bos" in ids and len(with_special) > len(plain) and with_special[0] == ids["bos"]
    add_eos = "eos" in ids and len(with_special) > len(plain) and with_special[-1] == ids["eos"]

    config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    add_space_prefix = tok_config.get("add_prefix_space")
    template = getattr(tok, "chat_template", None)

    return GGUFVocab(
        pre=pre,
        pre_hash=chkhsh,
        tokens=tokens,
        token_types=types,
        merges=merges,
        special_ids=ids,
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=add_space_prefix if isinstance(add_space_prefix, bool) else None,
        chat_template=template if isinstance(template, str) else None,
    )
