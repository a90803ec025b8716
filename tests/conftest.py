"""Shared fixtures: the real Llama 3 tokenizer and a tiny randomly initialised Llama built on it."""

from __future__ import annotations

import json
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
