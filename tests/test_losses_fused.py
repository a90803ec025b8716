"""The fused linear cross-entropy (losses.LinearCrossEntropy) against the plain paths: the same loss and
gradients as full-vocabulary logits and as the checkpointed chunks, without any [tokens, vocab] tensor
kept for backward."""

from __future__ import annotations

import pytest
import torch

from llamaforge.losses import collate, full_logits_loss_sum, fusable, token_loss_sum
from llamaforge.templates import IGNORE_INDEX


def _model(path, *, lora: bool):
    from llamaforge.models import load_model
    from llamaforge.schema import MethodConfig
    from llamaforge.train.adapters import attach_method

    model, _ = load_model(str(path))
    method = MethodConfig(name="lora" if lora else "full", rank=4, alpha=8, dropout=0.0)
    model = attach_method(model, method)
    model.train()
    return model


def _batch(vocab: int, rows: int = 3, seq: int = 40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = [seq, seq - 9, seq - 17]
    items = []
    for n in lengths[:rows]:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]  # a prompt, then the answer
        items.append({"input_ids": ids, "labels": labels})
    return collate(items, pad_id=0)


def _grads(model, loss):
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def _assert_same(loss_a, grads_a, loss_b, grads_b):
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-4)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()) + 1e-9)


@pytest.mark.parametrize("chunk", [1024, 16, 7])  # one chunk; several; a chunk that does not divide
def test_fused_lora_matches_full_logits_and_checkpointed_chunks(tiny_llama_dir, chunk):
    model = _model(tiny_llama_dir, lora=True)
    batch = _batch(model.config.vocab_size)
    assert fusable(model.get_base_model().get_output_embeddings())
    fused = token_loss_sum(model, batch, chunk, fused=True)
    g_fused = _grads(model, fused)
    plain = token_loss_sum(model, batch, chunk, fused=False)
    g_plain = _grads(model, plain)
    full = full_logits_loss_sum(model, batch)
    g_full = _grads(model, full)
    _assert_same(fused, g_fused, plain, g_plain)
    _assert_same(fused, g_fused, full, g_full)


@pytest.mark.parametrize("tied", [False, True])
def test_fused_full_fine_tuning_trains_the_head_as_autograd_would(tmp_path, llama3_tokenizer_dir, tied):
    from conftest import build_tiny_llama

    path = build_tiny_llama(tmp_path / "m", llama3_tokenizer_dir, tie_word_embeddings=tied)
    model = _model(path, lora=False)
    head = model.get_output_embeddings()
    assert head.weight.requires_grad and (head.weight is model.get_input_embeddings().weight) == tied
    batch = _batch(model.config.vocab_size)
    fused = token_loss_sum(model, batch, 11, fused=True)
    g_fused = _grads(model, fused)
    full = full_logits_loss_sum(model, batch)
    g_full = _grads(model, full)
    _assert_same(fused, g_fused, full, g_full)


def test_fused_under_bf16_autocast_matches_the_checkpointed_chunks(tiny_llama_dir):
    model = _model(tiny_llama_dir, lora=True)
    batch = _batch(model.config.vocab_size, rows=2, seq=24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = token_loss_sum(model, batch, 8, fused=True)
        g_fused = _grads(model, fused)
        plain = token_loss_sum(model, batch, 8, fused=False)
        g_plain = _grads(model, plain)
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=0.05)  # bf16 matmuls, fp32 softmax both
    for a, b in zip(g_fused, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02 * float(b.abs().max()))


def test_fused_without_gradients_gives_the_same_loss(tiny_llama_dir):
    model = _model(tiny_llama_dir, lora=True)
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        fused = token_loss_sum(model, batch, 9, fused=True)
        full = full_logits_loss_sum(model, batch)
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-4)


def test_fused_keeps_no_vocabulary_sized_tensor_for_backward(tiny_llama_dir):
    """What autograd saves: the plain single-chunk path keeps [targets, vocab] log-probabilities (the
    memory the fused path removes); the fused path keeps nothing larger than [targets, hidden]."""
    model = _model(tiny_llama_dir, lora=True)
    batch = _batch(model.config.vocab_size)
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    vocab = model.config.vocab_size

    def largest_saved(fused: bool) -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            token_loss_sum(model, batch, 1024, fused=fused)
        return max(s for s in sizes)

    frozen_head = vocab * model.config.hidden_size  # the frozen head's weight, saved by reference
    assert largest_saved(fused=False) >= targets * vocab
    assert largest_saved(fused=True) <= frozen_head
    assert largest_saved(fused=True) < targets * vocab


def test_a_wrapped_head_takes_the_checkpointed_path(tmp_path, tiny_llama_dir):
    """modules_to_save puts the head in a peft wrapper: the fused path would bypass it, so it is not used
    and the loss still matches the full logits."""
    from llamaforge.models import load_model
    from llamaforge.schema import MethodConfig
    from llamaforge.train.adapters import attach_method

    model, _ = load_model(str(tiny_llama_dir))
    method = MethodConfig(name="lora", rank=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"])
    model = attach_method(model, method)
    model.train()
    assert not fusable(model.get_base_model().get_output_embeddings())
    batch = _batch(model.config.vocab_size)
    loss = token_loss_sum(model, batch, 16)
    g = _grads(model, loss)
    full = full_logits_loss_sum(model, batch)
    _assert_same(loss, g, full, _grads(model, full))
