"""Batched generation with left padding and the template's stop tokens: training samples, chat, generate,
synth and eval all generate through it."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from llamaforge.data.types import Message
from llamaforge.device import autocast_context


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    template,
    conversations: list[list[Message]],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    precision: str = "auto",
) -> list[str]:
    """One answer per conversation (its last turn must be the user's). Greedy unless temperature > 0.

    Prompts are sorted by length so each batch pads little, then put back in order.
    """
    prompts = [template.encode_prompt(conv) for conv in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    sampling = temperature > 0
    if sampling:
        torch.manual_seed(seed)
    for chunk in _batches(order, batch_size):
        longest = max(len(prompts[i]) for i in chunk)
        input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), longest), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = prompts[i]
            input_ids[row, longest - len(ids) :] = torch.tensor(ids)
            attention[row, longest - len(ids) :] = 1
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            eos_token_id=template.stop_token_ids,
            pad_token_id=pad_id,
            do_sample=sampling,
        )
        if sampling:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with autocast_context(device, precision):
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs
            )
        for row, i in enumerate(chunk):
            new_tokens = []
            for t in out[row, longest:].tolist():
                if t in template.stop_token_ids:
                    break
                new_tokens.append(t)
            outputs[i] = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    return outputs


def answer(model, tokenizer, template, prompt: str, *, system: str | None = None, **kwargs) -> str:
    messages = ([Message("system", system)] if system else []) + [Message("user", prompt)]
    return generate(model, tokenizer, template, [messages], batch_size=1, **kwargs)[0]
