"""The candidates of an evaluation: parsed from their specs (a run, `base:RUN`, a model folder, a
.gguf file, a catalog name; `quant4:` / `quant8:`; `name=`), their tokenizers checked against each
other before any model loads (a mismatch makes per-token loss incomparable), and loaded one at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from llamaforge.errors import ConfigError, LlamaforgeError
from llamaforge.evaluate.config import EvaluationConfig
from llamaforge.evaluate.rules import NAME
from llamaforge.runs import Run, is_run_dir

# Words, digits, accents, CJK, code and chat markers: two tokenizers that agree on this agree in practice.
PROBE = (
    "Hello world! Ünïcödé café 1234.5 — 你好，世界 <|eot_id|><|im_end|> def f(x):\n\treturn x ** 2  # done"
)
QUANT_PREFIXES = {"quant4:": "4bit", "quant8:": "8bit"}


@dataclass
class Candidate:
    name: str
    spec: str
    source: str
    kind: str  # "run" | "run_base" | "model"
    quantization: str = "none"
    named: bool = False  # the user chose the name


def _default_name(source: str, kind: str, quantization: str) -> str:
    if kind == "run_base":
        base = "base"
    elif kind == "run":
        base = "tuned"
    else:
        base = re.sub(r"\W", "_", Path(source.rstrip("/")).name.removesuffix(".gguf")) or "model"
        base = base if NAME.match(base) else f"m_{base}"
    return base + {"none": "", "4bit": "_q4", "8bit": "_q8"}[quantization]


def parse_candidate(text: str) -> Candidate:
    """'[name=][quant4:|quant8:][base:]SOURCE' -> Candidate (no file access)."""
    spec, name = text.strip(), None
    head, eq, tail = spec.partition("=")
    if eq and NAME.match(head):
        name, spec = head, tail.strip()
    rest, quant, kind = spec, "none", "model"
    while True:
        prefix = next((p for p in (*QUANT_PREFIXES, "base:") if rest.startswith(p)), None)
        if prefix is None:
            break
        rest = rest[len(prefix) :]
        if prefix == "base:":
            kind = "run_base"
        else:
            quant = QUANT_PREFIXES[prefix]
    if not rest:
        raise ConfigError(f"candidate '{text}' names no model source")
    if kind == "run_base" and not is_run_dir(rest):
        raise ConfigError(f"candidate '{text}': base: needs a run directory (with run.json), got '{rest}'")
    if kind == "model" and is_run_dir(rest):
        kind = "run"
    return Candidate(name or _default_name(rest, kind, quant), text, rest, kind, quant, name is not None)


def parse_candidates(texts: list[str]) -> list[Candidate]:
    if not texts:
        raise ConfigError(
            "no candidates: pass --candidates (e.g. base:runs/x runs/x) or set evaluation.candidates"
        )
    cands, seen = [], set()
    for text in texts:
        c = parse_candidate(text)
        if c.name in seen:
            if c.named:
                raise ConfigError(f"two candidates are named '{c.name}'")
            k = 2
            while f"{c.name}_{k}" in seen:
                k += 1
            c.name = f"{c.name}_{k}"
        seen.add(c.name)
        cands.append(c)
    return cands


def load_candidate_tokenizer(c: Candidate):
    """The tokenizer a candidate generates with (cheap: no weights)."""
    from llamaforge.models import load_tokenizer

    if c.kind == "model":
        return load_tokenizer(c.source)
    run = Run.open(c.source)
    return load_tokenizer(run.base_model) if c.kind == "run_base" else run.tokenizer()


def tokenizer_fingerprint(tokenizer) -> tuple[int, list[int]]:
    return len(tokenizer), tokenizer(PROBE, add_special_tokens=False)["input_ids"]


def check_same_tokenizers(cands: list[Candidate], tokenizers: list) -> None:
    """Per-token loss and the prompts themselves are only comparable under one tokenizer."""
    first_size, first_ids = tokenizer_fingerprint(tokenizers[0])
    for c, tok in zip(cands[1:], tokenizers[1:], strict=True):
        size, ids = tokenizer_fingerprint(tok)
        if size != first_size or ids != first_ids:
            where = next(
                (k for k, (a, b) in enumerate(zip(first_ids, ids)) if a != b), min(len(ids), len(first_ids))
            )
            raise LlamaforgeError(
                f"candidate '{c.name}' ({c.spec}) has a different tokenizer from '{cands[0].name}' ({cands[0].spec}): "
                f"vocabulary {size} vs {first_size}, probe string tokenized differently from token {where} on. "
                "Per-token loss/perplexity are not comparable across tokenizers: evaluate these models in "
                "separate `llamaforge eval` runs."
            )


def load_candidate(c: Candidate, cfg: EvaluationConfig):
    """(model, tokenizer, template) ready to evaluate; runs keep the template they were trained with."""
    import torch

    from llamaforge.models import load_model
    from llamaforge.templates import get_template, load_template

    if c.kind == "model":
        model, tokenizer = load_model(c.source, dtype=cfg.dtype, quantization=c.quantization)
        folder = Path(c.source)
        if (folder / "llamaforge_template.json").is_file():
            template = load_template(folder, tokenizer)
        else:
            template = get_template(cfg.template, tokenizer)
    else:
        run = Run.open(c.source)
        if c.kind == "run":  # a LoRA is merged into a float copy in memory, never into 4/8-bit weights
            model, tokenizer = run.load(
                dtype=cfg.dtype, quantization=c.quantization, merge=cfg.merge_adapters
            )
        else:
            model, tokenizer = load_model(run.base_model, dtype=cfg.dtype, quantization=c.quantization)
        template = run.template(tokenizer)
    if torch.cuda.is_available() and c.quantization == "none":
        model = model.to("cuda")
    model.eval()
    return model, tokenizer, template
