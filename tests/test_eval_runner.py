"""`llamaforge eval` on a tiny random Llama and a real (few-step) run: candidates, table, gate, files, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_llama, chat_rows, write_jsonl
from llamaforge.cli import main
from llamaforge.data.types import Message
from llamaforge.errors import ConfigError, DataError, LlamaforgeError
from llamaforge.evaluate.candidates import parse_candidate, parse_candidates
from llamaforge.evaluate.config import EvalMetricsConfig
from llamaforge.evaluate.runner import (
    EvaluationConfig,
    GenerationSettings,
    check_outputs,
    generate_outputs,
    run_evaluation,
)
from llamaforge.evaluate.tasks import (
    ColumnMapping,
    TaskConfig,
    load_task,
    read_task_records,
    write_train_split,
)

FAST = GenerationSettings(max_new_tokens=5, batch_size=4, precision="fp32")
SCORING = EvalMetricsConfig(metrics=["bleu", "rouge", "exact_match"], bootstrap_samples=50)


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    """The shared finished tiny run (conftest.tiny_run): 6 LoRA steps on 16 chat records."""
    return tiny_run


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("eval-task") / "task.jsonl", chat_rows(16)[:6])


def _eval_cfg(candidates, task, **extra) -> EvaluationConfig:
    return EvaluationConfig(
        candidates=candidates, task=TaskConfig(path=str(task)), generation=FAST, scoring=SCORING, **extra
    )


def test_side_by_side_table_loss_and_per_example_files(tmp_path, run_dir, task_file, tiny_llama_dir):
    from llamaforge.losses import collate, full_logits_loss_sum, num_targets
    from llamaforge.models import load_model
    from llamaforge.templates import load_template

    result = run_evaluation(_eval_cfg([f"base:{run_dir}", str(run_dir)], task_file), tmp_path / "out")
    table = result.table
    assert table.candidates == ["base", "tuned"]
    assert {"bleu", "rouge1", "rougeL", "exact_match", "loss", "perplexity"} <= set(table.metrics)
    assert not result.failed and result.gate == []

    # loss is token-weighted over the references with the training masks: recompute it independently
    model, tokenizer = load_model(str(tiny_llama_dir))
    template = load_template(run_dir / "adapter", tokenizer)
    nll, count = 0.0, 0
    for ex in load_task(TaskConfig(path=str(task_file))).examples:
        enc = template.encode(ex.conversation())
        batch = collate([{"input_ids": enc.input_ids, "labels": enc.labels}], tokenizer.pad_token_id)
        with torch.no_grad():
            nll += float(full_logits_loss_sum(model, batch))
        count += num_targets(batch)
    assert table.value("base", "loss") == pytest.approx(nll / count, rel=1e-4)
    assert (
        table.value("tuned", "loss") < table.value("base", "loss") - 0.05
    )  # the adapter was trained on these

    rows = [json.loads(line) for line in (tmp_path / "out" / "tuned.jsonl").read_text().splitlines()]
    task_rows = chat_rows(16)[:6]
    assert len(rows) == 6
    assert [r["prompt"] for r in rows] == [t["instruction"] for t in task_rows]
    assert [r["reference"] for r in rows] == [t["output"] for t in task_rows]
    assert {"bleu", "rougeL", "loss"} <= set(rows[0]["scores"]) and isinstance(rows[0]["output"], str)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "rougeL" in md and "base" in md and "tuned" in md
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["baseline"] == "base" and data["metrics"]["loss"]["tuned"]["delta"] < 0
    assert [c["name"] for c in data["run"]["candidates"]] == ["base", "tuned"]
    assert data["run"]["candidates"][1]["stats"]["examples_per_s"] > 0
    assert (tmp_path / "out" / "results.html").read_text().startswith("<!")


def test_cli_gate_sets_the_exit_code(tmp_path, run_dir, task_file, capsys):
    overrides = [
        "eval",
        "evaluation.generation.max_new_tokens=3",
        "evaluation.generation.precision=fp32",
        "evaluation.scoring.bootstrap_samples=20",
    ]
    common = [*overrides, "--task", str(task_file), "--limit", "3"]
    two = ["--candidates", f"base:{run_dir}", str(run_dir)]
    code = main(
        [
            *common,
            *two,
            "--out",
            str(tmp_path / "b"),
            "--fail-if",
            "tuned.loss > base.loss",
            "--fail-if",
            "tuned.loss < base.loss",
        ]
    )
    out = capsys.readouterr()
    assert code == 1 and "FAILED" in out.out + out.err
    assert len((tmp_path / "b" / "base.jsonl").read_text().splitlines()) == 3
    gate = json.loads((tmp_path / "b" / "results.json").read_text())["gate"]
    assert [g["failed"] for g in gate] == [False, True]
    # a gate that holds exits 0 (one candidate, no loss: the cheapest run)
    assert (
        main(
            [
                *overrides,
                "evaluation.loss=false",
                *common[len(overrides) :],
                "--candidates",
                f"t={run_dir}",
                "--out",
                str(tmp_path / "a"),
                "--fail-if",
                "t.rougeL < 0",
            ]
        )
        == 0
    )
    # a rule naming a candidate that does not exist fails before any model loads
    assert main([*common, *two, "--out", str(tmp_path / "c"), "--fail-if", "tunde.loss < base.loss"]) == 2
    assert "candidate 'tunde'" in capsys.readouterr().err


def test_batched_generation_equals_one_at_a_time(tiny_llama_dir):
    from llamaforge.models import load_model
    from llamaforge.templates import get_template

    model, tokenizer = load_model(str(tiny_llama_dir))
    template = get_template("llama3", tokenizer)
    prompts = [[Message("user", r["instruction"] + " " + r["output"])] for r in chat_rows(6)]
    settings = GenerationSettings(max_new_tokens=6, batch_size=1, precision="fp32")
    single, _ = generate_outputs(model, tokenizer, template, prompts, settings)
    batched, stats = generate_outputs(
        model, tokenizer, template, prompts, settings.model_copy(update={"batch_size": 4})
    )
    assert len({len(template.encode_prompt(p)) for p in prompts}) > 2  # really padded batches
    assert batched == single and len(set(single)) > 1
    assert stats["examples_per_s"] > 0


def test_a_different_tokenizer_is_a_clear_error(tmp_path, tiny_llama_dir, task_file):
    from llamaforge.catalog import resolve

    other = build_tiny_llama(tmp_path / "other", resolve("smollm2-135m-instruct"))
    with pytest.raises(LlamaforgeError, match="different tokenizer.*vocabulary 49152 vs 128256"):
        run_evaluation(_eval_cfg([str(tiny_llama_dir), str(other)], task_file), tmp_path / "out")


def test_task_formats(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1 and 2", "output": "3"}])
    ex = read_task_records(TaskConfig(path=str(alpaca)))[0]
    assert ex.prompt == [Message("user", "Add\n\n1 and 2")] and ex.reference == "3"
    msgs = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Name?"},
                    {"role": "assistant", "content": "Forge"},
                ]
            }
        ],
    )
    ex = read_task_records(TaskConfig(path=str(msgs)))[0]
    assert ex.reference == "Forge" and [m.role for m in ex.prompt] == ["system", "user", "assistant", "user"]
    table = write_jsonl(
        tmp_path / "x.jsonl", [{"document": f"Article {i}.", "summary": f"Sum {i}."} for i in range(10)]
    )
    cols = ColumnMapping(reference="summary", prompt_template="Summarize in one sentence:\n{document}")
    examples = read_task_records(TaskConfig(path=str(table), columns=cols))
    assert examples[3].prompt == [Message("user", "Summarize in one sentence:\nArticle 3.")]
    assert examples[3].reference == "Sum 3."
    bigbench = tmp_path / "task.json"
    bigbench.write_text(
        json.dumps({"name": "xsum", "examples": [{"input": "Doc.", "target": ["Ref.", "Alt."]}]})
    )
    ex = read_task_records(
        TaskConfig(path=str(bigbench), columns=ColumnMapping(reference="target", prompt="input"))
    )
    assert ex[0].reference == "Ref." and ex[0].prompt[0].content == "Doc."


def test_holdout_and_train_split_are_disjoint_and_complete(tmp_path):
    table = write_jsonl(
        tmp_path / "x.jsonl", [{"document": f"Article {i}.", "summary": f"Sum {i}."} for i in range(20)]
    )
    cfg = TaskConfig(
        path=str(table),
        columns=ColumnMapping(reference="summary", prompt_template="S:\n{document}"),
        holdout=6,
        split_seed=3,
    )
    held = [e.reference for e in load_task(cfg).examples]
    assert len(held) == 6 and held == [e.reference for e in load_task(cfg).examples]  # deterministic
    path, count = write_train_split(cfg, tmp_path / "train.jsonl")
    train = [json.loads(line) for line in path.read_text().splitlines()]
    assert count == len(train) == 14
    assert not {t["output"] for t in train} & set(held)
    assert {t["output"] for t in train} | set(held) == {f"Sum {i}." for i in range(20)}
    assert train[0]["instruction"].startswith("S:\nArticle")
    assert len(load_task(cfg.model_copy(update={"limit": 2})).examples) == 2


def test_missing_references_are_clear_errors(tmp_path):
    bad = write_jsonl(
        tmp_path / "a.jsonl",
        [{"instruction": "Add 1 and 2", "output": "3"}, {"instruction": "Add 2 and 2", "output": ""}],
    )
    with pytest.raises(DataError, match="reference"):
        read_task_records(TaskConfig(path=str(bad), format="alpaca"))
    table = write_jsonl(
        tmp_path / "x.jsonl", [{"document": "A.", "summary": "S."}, {"document": "B.", "summary": " "}]
    )
    with pytest.raises(DataError, match=r"x.jsonl:2: .*reference column 'summary' is empty"):
        read_task_records(
            TaskConfig(path=str(table), columns=ColumnMapping(reference="summary", prompt="document"))
        )
    with pytest.raises(DataError, match="column 'text' is missing"):
        read_task_records(
            TaskConfig(path=str(table), columns=ColumnMapping(reference="summary", prompt="text"))
        )
    with pytest.raises(ConfigError, match="no eval task"):
        load_task(TaskConfig())


def test_empty_outputs(tmp_path):
    with pytest.raises(LlamaforgeError, match="empty output for all 2 examples"):
        check_outputs("q4", ["", "  "], tmp_path / "q4.jsonl")
    assert check_outputs("q4", ["a", ""], tmp_path / "q4.jsonl") == [1]


def test_candidate_specs(run_dir):
    assert parse_candidate(f"base:{run_dir}").name == "base"
    c = parse_candidate(str(run_dir))
    assert (c.name, c.kind) == ("tuned", "run")
    c = parse_candidate(f"q=quant4:base:{run_dir}")
    assert (c.name, c.kind, c.quantization) == ("q", "run_base", "4bit")
    assert parse_candidate("quant8:smollm2-135m-instruct").name == "smollm2_135m_instruct_q8"
    names = [c.name for c in parse_candidates([str(run_dir), str(run_dir)])]
    assert names == ["tuned", "tuned_2"]
    with pytest.raises(ConfigError, match="base: needs a run directory"):
        parse_candidate("base:smollm2-135m-instruct")
    with pytest.raises(ConfigError, match="named 'a'"):
        parse_candidates([f"a={run_dir}", f"a=base:{run_dir}"])
