"""The general suite: choice scoring vs separate forwards, the fixed selection, the catalog bundle's
sha256 checks, the gate, the CLI, the end-of-training hook and lm-eval (wrapper and refusal)."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import chat_rows, write_jsonl
from llamaforge.catalog import CatalogBundle, _extract_members, fetch_bundle, sha256_file
from llamaforge.errors import ConfigError, DataError, LlamaforgeError, ModelSourceError
from llamaforge.evaluate.compare import compare
from llamaforge.evaluate.config import EvalMetricsConfig, GeneralSuiteConfig
from llamaforge.evaluate.general.run import requests_for, score_suite, suite_metrics
from llamaforge.evaluate.general.scoring import ChoiceScores, score_requests
from llamaforge.evaluate.general.suite import Suite, SuiteExample, TaskSpec, build_suite, task_examples
from llamaforge.evaluate.rules import evaluate_rules

CHOICE = TaskSpec("toy", "bench/toy/task.json", "", "choice", "test")
ANSWER = TaskSpec("toy_answer", "bench/toy_answer/task.json", "", "answer", "test")


def _bigbench_task(n: int, **extra) -> dict:
    examples = [
        {
            "input": f"Is {i} an even number?",
            "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1), "maybe so": 0},
        }
        for i in range(n)
    ]
    return {"name": "toy", "examples": examples, **extra}


def _write(root: Path, spec: TaskSpec, data: dict) -> Path:
    path = root / spec.member
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from llamaforge.models import load_model
    from llamaforge.templates import get_template

    model, tokenizer = load_model(str(tiny_llama_dir), dtype=torch.float32)
    model.eval()
    return model, tokenizer, get_template("llama3", tokenizer)


def _direct(model, context: list[int], choice: list[int]) -> tuple[float, bool]:
    """Sum of the choice tokens' log-probs from one plain forward over question + choice alone."""
    ids = torch.tensor([context + choice])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    rows = logp[len(context) - 1 : len(context) - 1 + len(choice)]
    target = torch.tensor(choice)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


# ---------------------------------------------------------------- scoring


def test_choice_logprobs_match_separate_forwards(tiny):
    model, tokenizer, _ = tiny
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    requests = [
        (
            [tokenizer.bos_token_id, *enc("Q: Is the sky blue?\nA:")],
            [enc(" yes"), enc(" no"), enc(" it depends on the weather")],
        ),
        ([tokenizer.bos_token_id, *enc("Name a colour:")], [enc(" red")]),
        (
            [tokenizer.bos_token_id, *enc("The capital of France is a city called")],
            [enc(" Paris"), enc(" Lyon, of course")],
        ),
    ]
    for batch_size in (1, 3):
        got = score_requests(model, requests, batch_size=batch_size)
        for (ctx, choices), scores in zip(requests, got, strict=True):
            assert scores.num_tokens == [len(c) for c in choices]
            for choice, lp, greedy in zip(choices, scores.logprobs, scores.greedy, strict=True):
                want_lp, want_greedy = _direct(model, ctx, choice)
                assert lp == pytest.approx(want_lp, abs=1e-3)
                assert greedy == want_greedy
    # a choice that IS the greedy continuation is recognised as such
    ctx = requests[0][0]
    with torch.no_grad():
        nxt = int(model(input_ids=torch.tensor([ctx])).logits[0, -1].argmax())
    assert score_requests(model, [(ctx, [[nxt]])])[0].greedy == [True]


def test_suite_metrics_sum_and_length_normalised_against_direct_computation(tiny):
    model, tokenizer, template = tiny
    examples = [
        SuiteExample("toy", 0, "Q: Is 4 even?\nA:", ["yes", "no", "only on Tuesdays"], [0], "choice"),
        SuiteExample("toy", 1, "Q: Pick the longer word\nA:", ["a", "extraordinarily"], [1], "choice"),
        SuiteExample("toy_answer", 0, "Q: What is 2 plus 2?\nA:", ["4"], [0], "answer"),
    ]
    suite = Suite(examples, "x", "")
    for prompt in ("chat", "raw"):
        result = score_suite(
            model, tokenizer, template, suite, GeneralSuiteConfig(prompt=prompt, batch_size=2)
        )
        requests = requests_for(suite, tokenizer, template, prompt)
        right, right_norm = [], []
        for ex, (ctx, choices), rec in zip(examples, requests, result.records, strict=True):
            direct = [_direct(model, ctx, c) for c in choices]
            lps = [lp for lp, _ in direct]
            assert rec["logprobs"] == pytest.approx(lps, abs=1e-3)
            if ex.kind == "choice":
                pred = max(range(len(lps)), key=lambda i: lps[i])
                pred_norm = max(range(len(lps)), key=lambda i: lps[i] / len(ex.choices[i]))
                assert (rec["prediction"], rec["prediction_norm"]) == (pred, pred_norm)
                right.append(100.0 * (pred in ex.correct))
                right_norm.append(100.0 * (pred_norm in ex.correct))
            else:
                right.append(100.0 * direct[0][1])
                right_norm.append(100.0 * direct[0][1])
        assert result.metrics["general"].values.tolist() == right
        assert result.metrics["general_norm"].values.tolist() == right_norm
        assert result.metrics["general_toy"].values.tolist() == right[:2]
        assert result.metrics["general_toy_answer"].values.tolist() == right[2:]
    chat = requests_for(suite, tokenizer, template, "chat")[0][0]
    assert tokenizer.decode(chat).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


# ---------------------------------------------------------------- the fixed selection


def test_selection_is_seeded_fixed_and_follows_bigbench_prompts(tmp_path):
    task = _bigbench_task(40, task_prefix="Answer the question.\n")
    task["examples"].append(dict(task["examples"][3]))  # a duplicate question is used once
    task["examples"].append({"input": "no choices here", "target": "x"})  # unusable for a choice task
    path = _write(tmp_path, CHOICE, task)
    first = task_examples(CHOICE, path, 10, seed=0)
    assert first == task_examples(CHOICE, path, 10, seed=0)
    assert [e.index for e in first] != [e.index for e in task_examples(CHOICE, path, 10, seed=1)]
    assert [e.index for e in first] == sorted(e.index for e in first) and len({e.prompt for e in first}) == 10
    for ex in first:
        i = ex.index
        assert ex.prompt.startswith(f"Answer the question.\n\nQ: Is {i} an even number?\n  choice: ")
        assert ex.prompt.endswith("\nA:") and sorted(ex.choices) == ["maybe so", "no", "yes"]
        assert [ex.choices[k] for k in ex.correct] == ["yes" if i % 2 == 0 else "no"]
    # the shuffled choice order differs between questions (the right answer has no fixed position)
    assert len({tuple(e.choices) for e in first}) > 1
    no_list = _write(
        tmp_path / "b",
        CHOICE,
        _bigbench_task(12, append_choices_to_input=False, example_output_prefix="\nAnswer: "),
    )
    ex = task_examples(CHOICE, no_list, 3, seed=0)[0]
    assert "choice:" not in ex.prompt and ex.prompt.endswith("\nAnswer:")
    answers = _write(
        tmp_path, ANSWER, {"examples": [{"input": f"{i} + 1 =", "target": str(i + 1)} for i in range(5)]}
    )
    built = build_suite(tmp_path, (CHOICE, ANSWER), 5)
    assert [e.task for e in built.examples] == ["toy"] * 5 + ["toy_answer"] * 5
    assert built.sha256 == build_suite(tmp_path, (CHOICE, ANSWER), 5).sha256
    assert built.sha256 != build_suite(tmp_path, (CHOICE, ANSWER), 4).sha256
    with pytest.raises(DataError, match=r"toy_answer.*5 usable answer examples, the suite needs 6") as err:
        task_examples(ANSWER, answers, 6, seed=0)
    assert str(answers) in str(err.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        task_examples(CHOICE, tmp_path / "bad.json", 1, seed=0)


# ---------------------------------------------------------------- catalog bundle


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (pip download copies a local wheel without building anything)."""
    dist = "fakebench-1.0.dist-info"
    meta = {
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: fakebench\nVersion: 1.0\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in {**files, **meta}.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}/RECORD", "".join(f"{n},,\n" for n in [*files, *meta, f"{dist}/RECORD"]))
    return path


def test_bundle_download_sha_checks_and_cache(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("LLAMAFORGE_HOME", str(tmp_path / "home"))
    files = {"fakebench/a/task.json": b'{"examples": []}', "fakebench/b/task.json": b'{"examples": [1]}'}
    wheel = _wheel(tmp_path / "fakebench-1.0-py3-none-any.whl", {**files, "fakebench/other.txt": b"unused"})
    shas = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}

    wrong = CatalogBundle("fake-bad", str(wheel), {**shas, "fakebench/b/task.json": "0" * 64}, False, "")
    with pytest.raises(ModelSourceError, match=r"sha256 mismatch for fakebench/b/task.json"):
        fetch_bundle(wrong)
    assert not any((tmp_path / "home" / "catalog" / "fake-bad").rglob("task.json"))  # nothing half-cached

    bundle = CatalogBundle("fake", str(wheel), shas, False, "")
    root = fetch_bundle(bundle)
    assert {str(p.relative_to(root)) for p in root.rglob("*.json")} == set(files)
    wheel.unlink()  # cached: no second download
    assert fetch_bundle(bundle) == root
    (root / "fakebench/a/task.json").write_text('{"examples": ["edited"]}')
    with pytest.raises(ModelSourceError, match="sha256 mismatch for cached"):
        fetch_bundle(bundle)

    missing = CatalogBundle(
        "fake-missing",
        str(_wheel(tmp_path / "fakebench-1.0-py3-none-any.whl", files)),
        {"fakebench/nope.json": "0" * 64},
        False,
        "",
    )
    with pytest.raises(KeyError):  # zip members are looked up by name
        fetch_bundle(missing)


def test_extract_members_from_an_sdist(tmp_path):
    import tarfile

    src = tmp_path / "pkg-1.0" / "bigbench" / "t"
    src.mkdir(parents=True)
    (src / "task.json").write_text('{"examples": []}')
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "pkg-1.0", arcname="pkg-1.0")
    _extract_members(archive, ["bigbench/t/task.json"], tmp_path / "out")
    assert sha256_file(tmp_path / "out/bigbench/t/task.json") == sha256_file(src / "task.json")
    with pytest.raises(ModelSourceError, match="does not contain bigbench/none.json"):
        _extract_members(archive, ["bigbench/none.json"], tmp_path / "out2")


# ---------------------------------------------------------------- gate


def _scores(right: list[bool]) -> list[ChoiceScores]:
    return [ChoiceScores([0.0, -1.0] if ok else [-1.0, 0.0], [False, False], [1, 1]) for ok in right]


def test_gate_rule_on_general_through_compare():
    examples = [SuiteExample("toy", i, f"q{i}", ["a", "b"], [0], "choice") for i in range(50)]
    suite = Suite(examples, "x", "")
    base = suite_metrics(suite, _scores([i % 5 != 0 for i in range(50)])).metrics  # 80.0
    same = suite_metrics(suite, _scores([i % 5 != 1 for i in range(50)])).metrics  # 80.0
    worse = suite_metrics(suite, _scores([i % 5 not in (0, 1) for i in range(50)])).metrics  # 60.0
    table = compare({"base": base, "tuned": worse, "other": same}, bootstrap_samples=200)
    assert table.value("base", "general") == 80.0 and table.value("tuned", "general") == 60.0
    assert table.cells["general"]["tuned"].delta == pytest.approx(-20.0)
    assert table.cells["general_toy"]["tuned"].delta_ci[1] < 0  # a significant drop
    rules = ["tuned.general < base.general - 2", "other.general < base.general - 2"]
    assert [r.failed for r in evaluate_rules(rules, table)] == [True, False]
    EvalMetricsConfig(fail_if=rules)  # the rule language accepts the suite's metrics
    with pytest.raises(ValueError, match="did you mean 'general'"):
        EvalMetricsConfig(fail_if=["tuned.generall < base.general"])


def test_general_rule_without_the_suite_is_refused_before_loading(tmp_path, tiny_llama_dir):
    from llamaforge.evaluate.runner import EvaluationConfig, run_evaluation
    from llamaforge.evaluate.tasks import TaskConfig

    task = write_jsonl(tmp_path / "task.jsonl", chat_rows(3))
    cfg = EvaluationConfig(
        candidates=[f"base={tiny_llama_dir}", f"tuned={tiny_llama_dir}"], task=TaskConfig(path=str(task))
    )
    with pytest.raises(ConfigError, match="general suite, which is not run: pass --suite general"):
        run_evaluation(cfg, tmp_path / "out", extra_rules=["tuned.general < base.general - 2"])
    only_suite = cfg.model_copy(update={"task": TaskConfig(), "suites": ["general"]})
    with pytest.raises(ConfigError, match="reads rougeL, but no task runs"):
        run_evaluation(only_suite, tmp_path / "out", extra_rules=["tuned.rougeL < base.rougeL"])


# ---------------------------------------------------------------- lm-eval


def test_lm_eval_refusals(monkeypatch):
    from llamaforge.evaluate.general import lm_eval

    with pytest.raises(LlamaforgeError, match="needs task names"):
        lm_eval.check_lm_eval(" , ")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(LlamaforgeError, match=r"not installed: pip install 'llamaforge\[lm-eval\]'"):
        lm_eval.check_lm_eval("arc_easy")


def test_lm_eval_hub_unreachable_is_said(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import datasets.config
    import huggingface_hub.constants
    from lm_eval.tasks import TaskManager

    from llamaforge.evaluate.general import lm_eval

    # a task whose data is on the hub, as every built-in lm-eval task's is; offline = what an air gap gives
    (tmp_path / "hubtask.yaml").write_text(
        "task: hubtask\ndataset_path: some-org/some-dataset\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{q}}'\ndoc_to_target: 0\ndoc_to_choice: ['a', 'b']\nmetric_list:\n  - metric: acc\n"
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(
        LlamaforgeError, match=r"from the Hugging Face hub, which is not reachable.*--suite general"
    ):
        lm_eval.check_lm_eval("hubtask", manager)
    with pytest.raises(LlamaforgeError, match="lm-eval has no task nosuchtask"):
        lm_eval.check_lm_eval("nosuchtask", manager)


@pytest.mark.slow  # the real suite / lm-eval: minutes on 2 cores (make test-slow)
def test_lm_eval_wrapper_matches_lm_evals_own_hf_model(tiny_llama_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from llamaforge.evaluate.general.lm_eval import wrap
    from llamaforge.models import load_model

    model, tokenizer = load_model(str(tiny_llama_dir), dtype=torch.float32)
    ours = wrap(model.eval(), tokenizer, batch_size=2)
    theirs = HFLM(pretrained=str(tiny_llama_dir), device="cpu", dtype="float32", batch_size=2)
    pairs = [
        ("Q: Is the sky blue?\nA:", " yes"),
        ("Q: Is the sky blue?\nA:", " no, it is green"),
        ("The capital of France is", " Paris"),
    ]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got, want = ours.loglikelihood(reqs), theirs.loglikelihood(reqs)
    for (lp, greedy), (want_lp, want_greedy) in zip(got, want, strict=True):
        assert lp == pytest.approx(want_lp, abs=1e-3) and greedy == want_greedy
    rolling = [Instance("loglikelihood_rolling", {}, ("A short text to score as a whole.",), 0)]
    assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(
        theirs.loglikelihood_rolling(rolling)[0], abs=1e-3
    )


# ---------------------------------------------------------------- training hook, CLI, sweep (real suite)

SMALL = ["evaluation.general.per_task=2", "evaluation.general.tasks=[sports, arithmetic, misconceptions]"]


@pytest.fixture(scope="module")
def general_run(tmp_path_factory, tiny_llama_dir):
    """A few-step tiny LoRA run trained with eval.general: true (6 questions of the real suite)."""
    from llamaforge.config import load_config
    from llamaforge.train.recipe import run_training

    tmp = tmp_path_factory.mktemp("general-run")
    data = write_jsonl(tmp / "data.jsonl", chat_rows(8))
    cfg = load_config(
        None,
        [
            f"model.source={tiny_llama_dir}",
            f"data.sources=[{{path: {data}}}]",
            "data.template=llama3",
            "data.val_size=0",
            f"output.dir={tmp}",
            "output.name=r",
            "eval.prompts=[]",
            "eval.before_after=false",
            "train.max_steps=3",
            "train.batch_size=4",
            "train.lr=5e-2",
            "train.warmup_ratio=0",
            "train.precision=fp32",
            "method.rank=4",
            "method.dropout=0",
            "eval.general=true",
            *SMALL,
        ],
    )
    run, summary = run_training(cfg)
    return run, summary


@pytest.mark.slow  # the real suite / lm-eval: minutes on 2 cores (make test-slow)
def test_training_hook_scores_base_and_tuned(general_run):
    run, summary = general_run
    results = json.loads((run / "general" / "results.json").read_text())
    saved = json.loads((run / "summary.json").read_text())["general"]
    assert saved == summary["general"]
    assert saved["base"] == results["metrics"]["general"]["base"]["value"]
    assert saved["tuned"] == results["metrics"]["general"]["tuned"]["value"]
    assert saved["delta"] == pytest.approx(saved["tuned"] - saved["base"])
    assert set(saved["per_task"]) == {"sports", "arithmetic", "misconceptions"}
    assert results["run"]["general_suite"]["questions"] == 6 and results["run"]["task"] is None
    for name in ("base", "tuned"):
        rows = [json.loads(x) for x in (run / "general" / f"{name}.general.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and {r["task"] for r in rows} == {"sports", "arithmetic", "misconceptions"}


@pytest.mark.slow  # the real suite / lm-eval: minutes on 2 cores (make test-slow)
def test_eval_cli_suite_general_and_gate(general_run, tmp_path, capsys):
    from llamaforge.cli import main
    from llamaforge.evaluate.general.run import read_suite_jsonl

    run, _ = general_run
    args = ["eval", "--candidates", f"base:{run}", str(run), "--suite", "general", *SMALL]
    assert main([*args, "--out", str(tmp_path / "a"), "--fail-if", "tuned.general < base.general + 200"]) == 1
    out = capsys.readouterr()
    assert "general_sports" in out.out and "gate FAILED: tuned.general < base.general + 200" in out.err
    assert main([*args, "--out", str(tmp_path / "b"), "--fail-if", "tuned.general < base.general - 200"]) == 0
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    base, tuned = (data["metrics"]["general"][c]["value"] for c in ("base", "tuned"))
    rule = "tuned.general < base.general - 2"
    assert main([*args, "--out", str(tmp_path / "c"), "--fail-if", rule]) == int(tuned < base - 2)
    # the CLI scored the same questions as the training hook, with the same numbers
    assert read_suite_jsonl(tmp_path / "b" / "tuned.general.jsonl")["general"].value() == tuned
    assert tuned == json.loads((run / "summary.json").read_text())["general"]["tuned"]
    with pytest.raises(SystemExit):  # argparse: only known suites
        main(["eval", "--suite", "nope"])


@pytest.mark.slow  # the real suite / lm-eval: minutes on 2 cores (make test-slow)
def test_sweep_report_shows_general_columns(general_run):
    from llamaforge.sweep.report import parse_metric, table
    from llamaforge.sweep.runner import train_metrics

    run, summary = general_run
    metrics = train_metrics(run)
    assert metrics["general"] == summary["general"]["tuned"]
    assert metrics["general_delta"] == summary["general"]["delta"]
    results = [
        {"name": "a", "values": {"lr": 1}, "status": "completed", "metrics": metrics},
        {
            "name": "b",
            "values": {"lr": 2},
            "status": "completed",
            "metrics": {**metrics, "general_delta": -4.5},
        },
    ]
    columns, rows, _ = table({"axes": {"lr": [1, 2]}}, results)
    assert "general" in columns and "general_delta" in columns
    assert rows[1][columns.index("general_delta")] == "-4.50"
    assert parse_metric("general_delta", evaluate=False) == ("general_delta", True)
    plain = [
        {**r, "metrics": {k: v for k, v in metrics.items() if not k.startswith("general")}} for r in results
    ]
    assert "general" not in table({"axes": {"lr": [1, 2]}}, plain)[0]  # no column without eval.general
