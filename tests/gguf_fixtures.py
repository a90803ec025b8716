"""Helpers shared by the GGUF export tests: a tiny Llama with a tokenizer built here, reloading an
exported file with transformers' own GGUF loader, and reading its fields and tensor types."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from llamaforge.export.gguf_tokenizer import LLAMA3_SPLIT_REGEX

TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2, "q4_0": 0.25, "q4_1": 0.25}
LLAMA3_JINJA = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SAMPLES = [
    "Hello world! Llamas graze at 3,141 metres.",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi <think>ok</think><|eot_id|>",
    "  leading spaces\n\n\ttabs, ünïcödé, 😀 emoji, 我想 chinese, 12345678 digits's won't",
    "",
]


def reference_ids(model, tok, text):
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return ids, model(ids).logits


def reload_gguf(path: Path, config=None):
    from transformers import AutoModelForCausalLM

    kwargs = {"config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs).eval()


def gguf_fields(path: Path) -> dict:
    """Scalar metadata of a GGUF file (string arrays left out). gguf's GGUFReader takes ~20 s on a
    128K vocabulary, so transformers' fast header reader is used where this transformers has it."""
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:
        reader = gguf.GGUFReader(str(path))
        return {
            k: f.contents()
            for k, f in reader.fields.items()
            if not k.startswith(
                ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
            )
        }
    return read_gguf_metadata(str(path))[0]


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def no_debris(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def build_tokenizer(folder: Path):
    """A small byte-level BPE tokenizer shaped like Llama 3's (its pre-tokenizer, specials, BOS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    corpus = [s * 3 for s in SAMPLES] + [
        "the quick brown fox jumps over the lazy dog " * 20,
        "Llamas and alpacas are camelids from South America. " * 10,
    ]
    tk.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=420, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tk.add_tokens(["<think>", "</think>"])  # plain added tokens: USER_DEFINED in GGUF
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
    )
    tok.chat_template = LLAMA3_JINJA
    tok.save_pretrained(folder)
    return tok


def save_tiny_model(
    folder: Path, tok, *, vocab_size: int, tied: bool, rope=None, intermediate=128, seed=0, **extra
):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_parameters=rope,
        **extra,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms and biases, so a missed or misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def own_model(tmp_path_factory):
    """Tiny tied-embedding model (like SmolLM2) with a tokenizer built here; ffn rows of 80 test the
    fallback for rows that are not whole quantisation blocks."""
    folder = tmp_path_factory.mktemp("own")
    tok = build_tokenizer(folder)
    model = save_tiny_model(folder, tok, vocab_size=len(tok) + 3, tied=True, intermediate=80)
    return folder, model, tok
