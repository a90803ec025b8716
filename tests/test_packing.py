"""Packing: several examples per row must train exactly like the same examples padded one per row."""

from __future__ import annotations

import pytest
import torch

from conftest import chat_rows, read_metrics, step_losses, write_jsonl
from llamaforge.losses import collate, num_targets
from llamaforge.templates import IGNORE_INDEX
from llamaforge.train.packing import collate_packed, pack_bins, packed_batches, verify_packing
from test_train import job


@pytest.fixture()
def data_file(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", chat_rows(24))


def _recipe(tmp_path, model_dir, data, **extra):
    from llamaforge.train.recipe import FineTuneRecipe

    recipe = FineTuneRecipe(job(tmp_path, model_dir, data, **{"train.max_steps": 1, **extra}))
    recipe.setup()
    with torch.no_grad():  # a non-zero adapter, so the gradient reaches lora_A too
        for n, p in recipe.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return recipe


def _loss_and_grads(recipe, group):
    recipe.model.zero_grad(set_to_none=True)
    loss, targets = recipe.accumulate(group)
    return loss, targets, torch.cat([p.grad.flatten() for p in recipe.model.parameters() if p.requires_grad])


def test_packed_batch_gives_the_loss_and_gradients_of_the_same_examples_padded(
    tmp_path, tiny_llama_dir, data_file
):
    # train_on_prompt puts a label on every first token: packed, it must not be predicted across a boundary
    recipe = _recipe(tmp_path, tiny_llama_dir, data_file, **{"data.train_on_prompt": "true"})
    assert recipe.data.train[0]["labels"][0] != IGNORE_INDEX
    idx = list(range(7))
    padded = _loss_and_grads(recipe, [[idx]])
    # three rows of unequal length: the shorter ones are padded inside the packed micro-batch
    packed = _loss_and_grads(recipe, [[[0, 1, 2], [3, 4], [5, 6]]])
    assert packed[1] == padded[1] == sum(recipe.data.train[i]["num_targets"] - 1 for i in idx)
    assert packed[0] == pytest.approx(padded[0], rel=1e-5)
    torch.testing.assert_close(packed[2], padded[2], rtol=1e-4, atol=1e-7)
    # split over two micro-batches of one step: still the same gradient
    split = _loss_and_grads(recipe, [[[0, 1, 2]], [[3, 4], [5, 6]]])
    torch.testing.assert_close(split[2], padded[2], rtol=1e-4, atol=1e-7)
    # real tokens only are counted
    before = recipe.state.tokens
    recipe.accumulate([[[0, 1, 2], [3]]])
    assert recipe.state.tokens - before == sum(recipe.data.train[i]["length"] for i in range(4))


def test_positions_restart_and_first_labels_never_cross_a_boundary(llama3_tokenizer):
    from llamaforge.data.types import Conversation, Message
    from llamaforge.templates import get_template

    template = get_template("llama3", llama3_tokenizer)
    examples = []
    for i, text in enumerate(["short", "a somewhat longer answer here", "mid length one"]):
        enc = template.encode(
            Conversation([Message("user", f"q{i}"), Message("assistant", text)]), train_on_prompt=True
        )
        examples.append({"input_ids": enc.input_ids, "labels": enc.labels})
    lengths = [len(e["input_ids"]) for e in examples]
    batch = collate_packed([examples[:2], examples[2:]], pad_id=7)
    pos, labels, ids = batch["position_ids"], batch["labels"], batch["input_ids"]
    assert "attention_mask" not in batch
    starts = [0, lengths[0]]
    assert pos[0, : lengths[0]].tolist() == list(range(lengths[0]))
    assert pos[0, lengths[0] : sum(lengths[:2])].tolist() == list(range(lengths[1]))
    for (
        s
    ) in starts:  # the first token of each example: no label (it would be predicted from the previous one)
        assert labels[0, s] == IGNORE_INDEX and ids[0, s] == llama3_tokenizer.bos_token_id
    # the shorter row is padded: pad ids, no labels, positions of a block of their own
    pad_from = lengths[2]
    assert (ids[1, pad_from:] == 7).all() and (labels[1, pad_from:] == IGNORE_INDEX).all()
    assert pos[1, pad_from:].tolist() == list(range(ids.shape[1] - pad_from))
    # same number of targets as the examples padded one per row
    assert num_targets(batch) == num_targets(collate(examples, 7))
    flat = collate_packed([examples[:2], examples[2:]], pad_id=7, flatten=True)  # flash_attention_2: one row
    assert flat["input_ids"].shape == (1, sum(lengths)) and (flat["position_ids"] == 0).sum() == 3


def test_packing_keeps_examples_apart_and_the_use_cache_pitfall_is_caught(tiny_llama_dir, monkeypatch):
    """Per-example log-probs packed == alone; with the cache on, transformers would mix them silently."""
    from transformers import AutoModelForCausalLM

    from llamaforge import losses

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert model.config.use_cache  # the default a real checkpoint ships with
    gen = torch.Generator().manual_seed(1)
    examples = [{"input_ids": torch.randint(0, 1000, (n,), generator=gen).tolist()} for n in (9, 6, 12)]
    for ex in examples:
        ex["labels"] = ex["input_ids"]
    batch = collate_packed([examples], pad_id=0)

    @torch.no_grad()
    def logprobs(hidden, ids):
        logp = torch.log_softmax(model.lm_head(hidden[:-1]).float(), -1)
        return logp.gather(-1, ids[1:, None])[:, 0]

    def per_example(hidden_fn):
        with torch.no_grad():
            hidden = hidden_fn(batch)[0]
        out, at = [], 0
        for ex in examples:
            n = len(ex["input_ids"])
            out.append(logprobs(hidden[at : at + n], batch["input_ids"][0, at : at + n]))
            at += n
        return out

    with torch.no_grad():
        alone = [
            logprobs(
                losses.decoder_hidden(model, {"input_ids": torch.tensor([e["input_ids"]])})[0],
                torch.tensor(e["input_ids"]),
            )
            for e in examples
        ]
    for a, b in zip(per_example(lambda b: losses.decoder_hidden(model, b)), alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    def with_cache(b):  # decoder_hidden as it would be without its use_cache=False
        kwargs = {k: b[k] for k in ("attention_mask", "position_ids") if k in b}
        return model.model(input_ids=b["input_ids"], use_cache=True, **kwargs).last_hidden_state

    leaked = per_example(with_cache)
    assert max(float((a - b).abs().max()) for a, b in zip(leaked[1:], alone[1:])) > 1e-2  # the test can fail
    verify_packing(model)
    monkeypatch.setattr(losses, "decoder_hidden", lambda m, b: with_cache(b))
    with pytest.raises(Exception, match="attend to each other"):
        verify_packing(model)


def test_packing_is_deterministic_per_seed_and_epoch_and_tight():
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (500,), generator=rng).tolist()
    bins = pack_bins(lengths, 512, seed=3, epoch=0)
    assert bins == pack_bins(lengths, 512, seed=3, epoch=0)
    assert bins != pack_bins(lengths, 512, seed=3, epoch=1) != pack_bins(lengths, 512, seed=4, epoch=0)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert len(bins) <= sum(lengths) / 512 * 1.05 + 1  # best-fit decreasing: a few percent of padding at most
    assert len(pack_bins(lengths, 512, seed=3, epoch=5)) == len(bins)  # same step count every epoch
    assert pack_bins([600, 10], 512, seed=0, epoch=0) in (
        [[0], [1]],
        [[1], [0]],
    )  # too long: a row of its own
    micro = packed_batches(lengths, 4, 512, seed=3, epoch=0)
    assert micro == packed_batches(lengths, 4, 512, seed=3, epoch=0) and all(len(m) <= 4 for m in micro)


def test_packed_training_counts_real_tokens_and_learns(tmp_path, tiny_llama_dir, data_file):
    from llamaforge.train.recipe import FineTuneRecipe

    cfg = job(
        tmp_path,
        tiny_llama_dir,
        data_file,
        **{
            "train.packing": "true",
            "train.pack_length": 128,
            "train.batch_size": 2,
            "train.epochs": 4,
            "train.lr": 3e-2,
            "method.rank": 8,
            "eval.before_after": "false",
            "eval.prompts": "[]",
        },
    )
    recipe = FineTuneRecipe(cfg)
    recipe.setup()
    bins = pack_bins(recipe.batches.lengths, 128, seed=cfg.train.seed, epoch=0)
    assert 1 < len(bins) < len(recipe.batches.lengths) and recipe.steps_per_epoch == -(-len(bins) // 2)
    recipe.train()
    recipe.save()
    recipe.cleanup()
    assert recipe.state.tokens == 4 * recipe.data.card["train_tokens"]  # no pad counted, nothing skipped
    rows = read_metrics(recipe.run_dir)
    losses = step_losses(recipe.run_dir)
    assert len(losses) == recipe.total_steps == 4 * recipe.steps_per_epoch
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05  # a random 128k-vocab model: ~0.1 in 12 steps
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1] < evals[0] - 0.01


def test_packed_resume_continues_the_same_loss_sequence(tmp_path, tiny_llama_dir, data_file):
    from llamaforge.train.recipe import FineTuneRecipe, run_training

    extra = {
        "train.packing": "true",
        "train.pack_length": 96,
        "train.batch_size": 3,
        "train.max_steps": 4,
        "eval.before_after": "false",
        "eval.prompts": "[]",
    }
    straight_dir, _ = run_training(job(tmp_path / "a", tiny_llama_dir, data_file, **extra))
    first = job(tmp_path / "b", tiny_llama_dir, data_file, **extra, **{"train.save_every": 2})
    recipe = FineTuneRecipe(first)
    recipe.setup()
    assert recipe.steps_per_epoch < 4  # the run crosses an epoch boundary: a new packing order
    recipe.total_steps = 2
    recipe.train()
    resumed_dir, _ = run_training(first, run_dir=recipe.run_dir, resume=True)

    assert len(step_losses(resumed_dir)) == 4
    assert step_losses(resumed_dir) == pytest.approx(step_losses(straight_dir), rel=1e-5)


def test_packing_with_prefix_tuning_is_refused(tmp_path, tiny_llama_dir, data_file):
    """Refused when the job loads, before any model: prefix's registered method does not pack."""
    from llamaforge.errors import ConfigError

    with pytest.raises(ConfigError, match="train.packing does not work with method.name=prefix"):
        job(tmp_path, tiny_llama_dir, data_file, **{"train.packing": "true", "method.name": "prefix"})
