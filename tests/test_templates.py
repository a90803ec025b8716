"""Llama 3 correctness items 1-4 against the real Llama 3 tokenizer, and loss masks."""

from __future__ import annotations

import pytest

from llamaforge.data.types import Conversation, Message
from llamaforge.losses import collate
from llamaforge.templates import IGNORE_INDEX, get_template

BOT, EOT, EOS_TEXT, EOM = 128000, 128009, 128001, 128008


def conv(*turns: tuple[str, str]) -> Conversation:
    return Conversation([Message(r, c) for r, c in turns], source="test")


def trained_tokens(enc) -> list[int]:
    return [t for t in enc.labels if t != IGNORE_INDEX]


def test_llama3_end_of_turn_is_trained_and_is_a_stop(llama3_tokenizer):
    tpl = get_template("llama3", llama3_tokenizer)
    enc = tpl.encode(conv(("user", "Hi"), ("assistant", "Hello there")))
    trained = trained_tokens(enc)
    assert trained[-1] == EOT, "the assistant's <|eot_id|> must be trained, never masked"
    assert llama3_tokenizer.decode(trained[:-1]) == "Hello there"
    assert {EOT, EOS_TEXT} <= set(tpl.stop_token_ids)
    # <|eom_id|> exists from Llama 3.1 on; this is the Llama 3 tokenizer, where 128008 is reserved.
    assert (EOM in tpl.stop_token_ids) == ("<|eom_id|>" in llama3_tokenizer.get_vocab())


def test_pad_is_not_eos_and_padding_keeps_end_tokens(llama3_tokenizer):
    from llamaforge.models import ensure_pad_token

    llama3_tokenizer.pad_token = "<|eot_id|>"  # the classic mistake
    ensure_pad_token(llama3_tokenizer)
    assert llama3_tokenizer.pad_token_id not in (EOT, EOS_TEXT, EOM)
    tpl = get_template("llama3", llama3_tokenizer)
    short = tpl.encode(conv(("user", "Hi"), ("assistant", "Yes")))
    long = tpl.encode(
        conv(("user", "Tell me more"), ("assistant", "A much longer answer than the other one"))
    )
    batch = collate(
        [
            {"input_ids": short.input_ids, "labels": short.labels},
            {"input_ids": long.input_ids, "labels": long.labels},
        ],
        llama3_tokenizer.pad_token_id,
    )
    for row in batch["labels"]:
        assert EOT in row.tolist(), "padding erased a real end-of-turn label"
    pads = batch["input_ids"][0][len(short.input_ids) :]
    assert (pads == llama3_tokenizer.pad_token_id).all()
    assert (batch["labels"][0][len(short.input_ids) :] == IGNORE_INDEX).all()


def test_exactly_one_begin_of_text(llama3_tokenizer):
    tpl = get_template("llama3", llama3_tokenizer)
    c = conv(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"))
    assert tpl.encode(c).input_ids.count(BOT) == 1
    prompt = tpl.encode_prompt(c.messages[:2])
    assert prompt.count(BOT) == 1 and prompt[0] == BOT
    # what the classic bug does: tokenizing the rendered text with special tokens added again
    doubled = llama3_tokenizer(tpl.render(c.messages))["input_ids"]
    assert doubled.count(BOT) == 2


def test_inference_prompt_is_the_training_prefix(llama3_tokenizer):
    tpl = get_template("llama3", llama3_tokenizer)
    c = conv(("user", "What is 2+2?"), ("assistant", "4"))
    train_ids = tpl.encode(c).input_ids
    prompt = tpl.encode_prompt(c.messages[:1])
    assert train_ids[: len(prompt)] == prompt
    assert train_ids[len(prompt) :] == llama3_tokenizer.encode("4", add_special_tokens=False) + [EOT]


def test_prompt_masked_and_every_assistant_turn_trained(llama3_tokenizer):
    tpl = get_template("llama3", llama3_tokenizer)
    c = conv(
        ("system", "S"),
        ("user", "one"),
        ("assistant", "first answer"),
        ("user", "two"),
        ("assistant", "second answer"),
    )
    enc = tpl.encode(c)
    text = llama3_tokenizer.decode(trained_tokens(enc))
    assert text == "first answer<|eot_id|>second answer<|eot_id|>"
    everything = tpl.encode(c, train_on_prompt=True)
    assert everything.num_targets == len(everything.input_ids)


@pytest.mark.parametrize("name", ["chatml", "alpaca", "raw"])
def test_other_templates_mask_and_end(llama3_tokenizer, name):
    if name == "chatml":
        with pytest.raises(Exception, match="im_end"):
            get_template(name, llama3_tokenizer)
        return
    tpl = get_template(name, llama3_tokenizer)
    enc = tpl.encode(conv(("user", "Say hi"), ("assistant", "hi")))
    decoded = llama3_tokenizer.decode(trained_tokens(enc))
    assert decoded.startswith("hi") and decoded.endswith(llama3_tokenizer.eos_token)
    assert enc.input_ids.count(BOT) <= 1


def test_over_long_record_is_rejected_with_location(llama3_tokenizer):
    from llamaforge.errors import DataError

    tpl = get_template("llama3", llama3_tokenizer)
    c = Conversation([Message("user", "word " * 50), Message("assistant", "ok")], source="data.jsonl", line=7)
    with pytest.raises(DataError, match=r"data.jsonl:7: .*max_length"):
        tpl.encode(c, max_length=20)


def test_template_saved_and_loaded_identically(llama3_tokenizer, tmp_path):
    from llamaforge.templates import load_template

    tpl = get_template("llama3", llama3_tokenizer)
    tpl.save(tmp_path)
    again = load_template(tmp_path, llama3_tokenizer)
    assert again.jinja == tpl.jinja and again.stop_token_ids == tpl.stop_token_ids


def test_render_is_what_apply_chat_template_gives(llama3_tokenizer):
    tpl = get_template("llama3", llama3_tokenizer)
    msgs = [Message("system", "S"), Message("user", "Hi"), Message("assistant", "Hello")]
    plain = llama3_tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in msgs], chat_template=tpl.jinja, tokenize=False
    )
    assert tpl.render(msgs) == plain
