"""Packing: several tokenized examples per row, position ids restarting at 0, no attention across them.

A micro-batch is `batch_size` packed rows of at most `capacity` tokens each (the TRL convention: the
batch size counts rows, not examples). An optimizer step therefore sees about capacity / mean length
times more examples than a padded one, and an epoch has that many fewer steps.

How transformers 5.23 keeps packed examples apart: we pass `position_ids` and NO attention mask.
- sdpa / eager / flex: `masking_utils._preprocess_mask_arguments` calls `find_packed_sequence_indices`
  (a new example starts wherever the position id does not grow by exactly 1) only when
  `attention_mask is None and past_key_values is None`; `create_causal_mask` then wraps the causal mask
  function with `packed_sequence_compatibility_function` (block-diagonal causal). With `use_cache=True`
  the model makes a DynamicCache before building the mask, detection is skipped, and examples attend
  to each other with no error: every packed forward must say `use_cache=False` (losses.decoder_hidden).
- flash_attention_2: `modeling_flash_attention_utils._flash_attention_forward` only goes varlen through
  `_is_packed_sequence(position_ids, batch_size)`, which is False for batch size > 1, with cu_seqlens from
  `prepare_fa_kwargs_from_position_ids` (an example starts wherever position == 0). Several packed
  rows would be plain causal over each row, so for it the micro-batch is flattened into one row.
Padding of shorter rows: pad ids with labels IGNORE and positions 0, 1, 2, ... -- a pseudo-example of
its own, so no real token attends to it (different block) and no row of the mask is empty (no NaN).
`verify_packing` checks all of this on the actual model before training.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort

import torch

from llamaforge.errors import ConfigError
from llamaforge.templates import IGNORE_INDEX


def pack_bins(lengths: list[int], capacity: int, *, seed: int, epoch: int) -> list[list[int]]:
    """Best-fit decreasing: each example, longest first, goes into the fullest bin that still fits it.

    As tight as first-fit decreasing (both within 11/9 of optimal), O(n log n) with a sorted list of
    free capacities. Ties between equal lengths are broken by a shuffle seeded by (seed, epoch), so
    bins mix differently each epoch while their number stays the same (same length multiset). An
    example longer than `capacity` gets a row of its own. Returns bins in a shuffled order.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: lengths[i], reverse=True)  # stable: the shuffle breaks ties
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    for i in order:
        n = lengths[i]
        k = bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            if room - n > 0:
                insort(free, (room - n, b))
        else:
            bins.append([i])
            if capacity - n > 0:
                insort(free, (capacity - n, len(bins) - 1))
    rng.shuffle(bins)
    return bins


def packed_batches(
    lengths: list[int], batch_size: int, capacity: int, *, seed: int, epoch: int
) -> list[list[list[int]]]:
    """Micro-batches of `batch_size` bins (lists of example indices); deterministic in (seed, epoch).

    Bins of similar fill go together (most are full; the oversized and the last few are not), so little
    padding is added between the rows of a micro-batch; the micro-batches are then shuffled.
    """
    bins = pack_bins(lengths, capacity, seed=seed, epoch=epoch)
    bins.sort(key=lambda b: sum(lengths[i] for i in b))  # stable: equal fills keep their shuffled order
    micro = [bins[k : k + batch_size] for k in range(0, len(bins), batch_size)]
    random.Random(seed * 100_003 + epoch + 1).shuffle(micro)
    return micro


def collate_packed(rows: list[list[dict]], pad_id: int, *, flatten: bool = False) -> dict[str, torch.Tensor]:
    """input_ids, labels and position_ids (no attention_mask) for rows of several examples each.

    The label at each example's first token is IGNORE: with labels shifted by one it would otherwise be
    predicted from the previous example's last token (train_on_prompt keeps a label on <|begin_of_text|>).
    `flatten` concatenates every row into one (flash_attention_2 varlen needs batch size 1).
    """
    if flatten:
        rows = [[ex for row in rows for ex in row]]
    longest = max(sum(len(ex["input_ids"]) for ex in row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex["input_ids"])
            input_ids[r, at : at + n] = torch.tensor(ex["input_ids"])
            labels[r, at + 1 : at + n] = torch.tensor(ex["labels"][1:])
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(longest - at)  # padding: a block of its own, never attended
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


@torch.no_grad()
def verify_packing(model, *, flatten: bool = False, lengths: tuple[int, ...] = (7, 5, 9)) -> None:
    """Refuse to train packed if this model lets packed examples see each other.

    Runs the exact forward the loss uses on three short random examples, packed (plus a padded second
    row) and padded one per row with an attention mask, and compares their hidden states: two tiny
    forwards that catch a model whose attention ignores packed position ids (remote code, a cache left
    on, a new attention backend).
    """
    from llamaforge.losses import decoder_hidden

    was_training = model.training
    model.eval()  # no dropout: the two layouts must give the same numbers
    try:
        vocab, device = (
            model.get_input_embeddings().weight.shape[0],
            model.get_input_embeddings().weight.device,
        )
        gen = torch.Generator().manual_seed(0)
        ids = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
        examples = [{"input_ids": x.tolist(), "labels": [0] * len(x)} for x in ids]
        rows = [examples, examples[:1]] if not flatten else [examples]
        packed = decoder_hidden(
            model, {k: v.to(device) for k, v in collate_packed(rows, 0, flatten=flatten).items()}
        )
        alone_ids = torch.zeros((len(ids), max(lengths)), dtype=torch.long)
        mask = torch.zeros_like(alone_ids)
        for r, x in enumerate(ids):
            alone_ids[r, : len(x)], mask[r, : len(x)] = x, 1
        alone = decoder_hidden(model, {"input_ids": alone_ids.to(device), "attention_mask": mask.to(device)})
        at, diffs = 0, []
        for r, n in enumerate(lengths):
            a, b = alone[r, :n].float(), packed[0, at : at + n].float()
            diffs.append(float((b - a).norm() / a.norm().clamp_min(1e-6)))
            at += n
    finally:
        model.train(was_training)
    # The first example has nothing before it, so its difference is numerical noise alone: ~1e-6 in fp32,
    # ~0.02 in bf16 (SmolLM2-135M). Attention across examples moved the others by 0.4-0.6 (tiny, 135M).
    noise, leak = diffs[0], max(diffs[1:])
    if leak > max(0.15, 5 * noise):
        raise ConfigError(
            f"packed examples attend to each other with this model (relative hidden-state difference "
            f"{leak:.3f}, noise {noise:.3f}): its attention ignores packed position_ids. Set train.packing=false."
        )
