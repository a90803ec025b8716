"""Shared fixtures: the real Llama 3 tokenizer and a tiny randomly initialised Llama built on it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    from llamaforge.catalog import resolve

    return resolve("llama3-tokenizer")


@pytest.fixture()
def llama3_tokenizer(llama3_tokenizer_dir):
    from llamaforge.models import load_tokenizer

    return load_tokenizer(str(llama3_tokenizer_dir))


def build_tiny_llama(out: Path, tokenizer_dir: Path, *, seed: int = 0, **overrides) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, llama3_tokenizer_dir) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), llama3_tokenizer_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n: int) -> list[dict]:
    """Small alpaca records of varied lengths (real words, so the tokenizer does real work)."""
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "wizards",
        "quietly",
        "judge",
        "boxing",
    ]
    rows = []
    for i in range(n):
        k = 3 + (i * 5) % 11
        rows.append(
            {
                "instruction": f"Repeat {k} words, number {i}.",
                "input": "",
                "output": " ".join(words[(i + j) % len(words)] for j in range(k)),
            }
        )
    return rows


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> list[float]:
    """The training loss of every optimizer step, in order, from the run's metrics.jsonl."""
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> hex)."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_llama_dir) -> Iterator[Path]:
    """A finished 6-step LoRA run of the tiny Llama on 16 chat records (no validation split), trained
    once per test session for every test that only reads a run (eval, merge, generate, chat, ...).

    Shared, so read-only: a test that writes into it fails here, at the end of the session."""
    from llamaforge.config import load_config
    from llamaforge.train.recipe import run_training

    tmp = tmp_path_factory.mktemp("tiny-run")
    data = write_jsonl(tmp / "data.jsonl", chat_rows(16))
    cfg = load_config(
        None,
        [
            f"model.source={tiny_llama_dir}",
            f"data.sources=[{{path: {data}}}]",
            "data.template=llama3",
            "data.val_size=0",
            f"output.dir={tmp}",
            "output.name=run",
            "eval.prompts=[]",
            "eval.before_after=false",
            "train.max_steps=6",
            "train.batch_size=4",
            "train.lr=5e-2",
            "train.warmup_ratio=0",
            "train.precision=fp32",
            "method.rank=4",
            "method.dropout=0",
        ],
    )
    run_dir, _ = run_training(cfg)
    before = folder_digest(run_dir)
    yield run_dir
    after = folder_digest(run_dir)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test wrote into the shared tiny_run (read-only): {changed}"
