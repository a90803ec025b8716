"""The pad token: never an end token, or masking pad labels erases real end tokens (Llama 3 item 2).

Kept apart from `models.py` because the catalog's GGUF conversion needs it too, below model loading.
"""

from __future__ import annotations

PAD_CANDIDATES = (
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|pad|>",
    "<pad>",
    "[PAD]",
    "<|endoftext|>",
    "<unk>",
)


def ensure_pad_token(tokenizer, model=None) -> None:
    """Pad must never be an end token, or masking pad labels erases real end tokens (Llama 3 item 2)."""
    vocab = tokenizer.get_vocab()
    ends = {tokenizer.eos_token, "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|im_end|>"}
    if tokenizer.pad_token is None or tokenizer.pad_token in ends:
        choice = next((t for t in PAD_CANDIDATES if t in vocab and t not in ends), None)
        if choice is None:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            if model is not None:
                model.resize_token_embeddings(len(tokenizer))
        else:
            tokenizer.pad_token = choice
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
