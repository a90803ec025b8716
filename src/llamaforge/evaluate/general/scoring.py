"""Log-likelihood of answer choices, several questions per forward and all choices of one in one row.

A row holds the question's tokens once, then every choice's tokens, with a 4-D attention mask in
which each choice sees the question and itself but not the other choices, and position ids that
restart at the end of the question for each choice. So each choice gets exactly the log-probs it
would get alone after the question (tests/test_general.py checks this against separate forwards),
while the question is computed once instead of once per choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llamaforge.errors import LlamaforgeError

Request = tuple[list[int], list[list[int]]]  # (question ids, ids of each choice)


@dataclass
class ChoiceScores:
    logprobs: list[float]  # per choice: sum of its tokens' log-probs given the question
    greedy: list[bool]  # per choice: every token is the model's argmax (the greedy continuation)
    num_tokens: list[int]


@dataclass
class _Row:
    ids: list[int]
    positions: list[int]
    allowed: torch.Tensor  # (len, len) bool: query attends key
    targets: list[tuple[list[int], list[int]]]  # per choice: (positions predicting each token, token ids)


def _pack(request: Request) -> _Row:
    context, choices = request
    if not context:
        raise LlamaforgeError("a scored question has no tokens (an empty prompt without BOS?)")
    if not choices or any(not c for c in choices):
        raise LlamaforgeError("every scored choice needs at least one token")
    n_ctx = len(context)
    length = n_ctx + sum(len(c) for c in choices)
    allowed = torch.zeros(length, length, dtype=torch.bool)
    allowed[:n_ctx, :n_ctx] = torch.ones(n_ctx, n_ctx, dtype=torch.bool).tril()
    ids, positions, targets, start = list(context), list(range(n_ctx)), [], n_ctx
    for choice in choices:
        end = start + len(choice)
        allowed[start:end, :n_ctx] = True
        allowed[start:end, start:end] = torch.ones(len(choice), len(choice), dtype=torch.bool).tril()
        ids += choice
        positions += range(n_ctx, n_ctx + len(choice))
        # token k of the choice is predicted at the position before it: the question's last token for k = 0
        targets.append(([n_ctx - 1, *range(start, end - 1)], list(choice)))
        start = end
    return _Row(ids, positions, allowed, targets)


def _check_attention(model) -> None:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    if impl and "flash" in str(impl):
        raise LlamaforgeError(
            f"the general suite packs choices with a 4-D attention mask, which {impl} does not take; "
            "load the model with model.attn_implementation=sdpa (or eager) for evaluation"
        )


def score_requests(
    model,
    requests: Sequence[Request],
    *,
    batch_size: int = 8,
    precision: str = "fp32",
    pad_id: int = 0,
    desc: str = "general",
) -> list[ChoiceScores]:
    """Choice log-probs for every request, in request order (rows batched by length)."""
    from tqdm.auto import tqdm

    from llamaforge.device import autocast_context

    _check_attention(model)
    device = next(model.parameters()).device
    rows = [_pack(r) for r in requests]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    results: list[ChoiceScores | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), desc=desc, unit="q", dynamic_ncols=True, leave=False)
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        width = max(len(rows[i].ids) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        positions = torch.zeros((len(chunk), width), dtype=torch.long)
        allowed = torch.eye(width, dtype=torch.bool).repeat(
            len(chunk), 1, 1
        )  # padding sees itself: no empty row
        for b, i in enumerate(chunk):
            row, n = rows[i], len(rows[i].ids)
            ids[b, :n] = torch.tensor(row.ids)
            positions[b, :n] = torch.tensor(row.positions)
            allowed[b, :n, :n] = row.allowed
        keep = min(t[0][0] for i in chunk for t in rows[i].targets)  # no logits before the first needed one
        dtype = (
            next(model.parameters()).dtype if next(model.parameters()).is_floating_point() else torch.float32
        )
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
        with torch.no_grad(), autocast_context(device, precision):
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=False,
                logits_to_keep=torch.arange(keep, width, device=device),
            ).logits
        for b, i in enumerate(chunk):
            lps, greedy, counts = [], [], []
            for where, tokens in rows[i].targets:
                picked = logits[b, torch.tensor(where, device=device) - keep].float().log_softmax(-1)
                target = torch.tensor(tokens, device=device)
                lps.append(float(picked.gather(1, target[:, None]).sum()))
                greedy.append(bool((picked.argmax(-1) == target).all()))
                counts.append(len(tokens))
            results[i] = ChoiceScores(lps, greedy, counts)
        bar.update(len(chunk))
    bar.close()
    return [r for r in results if r is not None]
