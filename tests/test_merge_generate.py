"""Merge an adapter into its base, and batched generation."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def trained_run(tiny_run):
    """The shared finished tiny run (conftest.tiny_run): 6 LoRA steps on 16 chat records."""
    return tiny_run


def test_merged_model_matches_base_plus_adapter(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamaforge.export.merge import merge_run
    from llamaforge.runs import load_for_inference

    out = merge_run(trained_run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    peft_model, tokenizer, template = load_for_inference(trained_run)
    ids = torch.tensor(
        [template.encode_prompt([])[:1] + tokenizer.encode("merge me please", add_special_tokens=False)]
    )
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    delta = (peft_model.get_base_model().lm_head.weight - merged.lm_head.weight).abs().max()
    assert delta == 0  # lm_head not targeted; the decoder weights carry the adapter
    assert not torch.allclose(
        expected,
        AutoModelForCausalLM.from_pretrained(
            json.loads((trained_run / "run.json").read_text())["base_model"]
        )(input_ids=ids).logits,
        atol=1e-4,
    ), "the adapter changes nothing: the merge test would be vacuous"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # stated tolerance: 1e-4 in fp32
    saved_tok = AutoTokenizer.from_pretrained(out)
    assert saved_tok.chat_template == template.jinja
    gen = json.loads((out / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == set(template.stop_token_ids)


def test_merge_refuses_to_overwrite_and_non_runs(trained_run, tmp_path):
    from llamaforge.errors import ConfigError, ModelSourceError
    from llamaforge.export.merge import merge_run

    (tmp_path / "exists").mkdir()
    with pytest.raises(ConfigError, match="--overwrite"):
        merge_run(trained_run, tmp_path / "exists")
    with pytest.raises(ModelSourceError, match="not a llamaforge run"):
        merge_run(tmp_path, tmp_path / "out")


def test_batched_generation_equals_one_at_a_time(trained_run):
    from llamaforge.data.types import Message
    from llamaforge.generation import generate
    from llamaforge.runs import load_for_inference

    model, tokenizer, template = load_for_inference(trained_run)
    prompts = [
        [Message("user", p)] for p in ("Hi", "Repeat seven words, number three.", "a b c d e f g h i j", "x")
    ]
    batched = generate(model, tokenizer, template, prompts, max_new_tokens=6, batch_size=4, precision="fp32")
    single = [
        generate(model, tokenizer, template, [p], max_new_tokens=6, batch_size=1, precision="fp32")[0]
        for p in prompts
    ]
    assert batched == single
    assert any(batched)


def test_generate_cli_reads_jsonl_and_reports_bad_lines(trained_run, tmp_path, capsys):
    from llamaforge.cli import main

    good = tmp_path / "prompts.jsonl"
    good.write_text('{"prompt": "Hi"}\n{"messages": [{"role": "user", "content": "Yo"}]}\n')
    out = tmp_path / "answers.jsonl"
    assert (
        main(
            [
                "generate",
                str(trained_run),
                "--input",
                str(good),
                "--output",
                str(out),
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hi", "Yo"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
    assert main(["generate", str(trained_run), "--input", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_chat_keeps_the_conversation_and_answers_each_line(trained_run, monkeypatch, capsys):
    import io

    from llamaforge.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/reset\nHi\n"))
    assert main(["chat", str(trained_run), "--max-new-tokens", "3"]) == 0
    answers = capsys.readouterr().out.splitlines()
    assert len(answers) == 2 and answers[0] == answers[1]  # /reset: the same first turn again
