"""The studio's endpoints through FastAPI's TestClient (no browser, no training: fast).

Run directories here are written with the recipe's own writers where it has them (MetricsLog,
write_rejects); the browser tests (test_studio_browser.py) use a run that really trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi", reason="the studio needs the serve extra: pip install 'llamaforge[studio]'")
from fastapi.testclient import TestClient  # noqa: E402

from llamaforge.config import JobConfig, load_config  # noqa: E402
from llamaforge.data.types import Rejected  # noqa: E402
from llamaforge.errors import ConfigError  # noqa: E402
from llamaforge.studio import schema_form  # noqa: E402
from llamaforge.studio.app import create_app  # noqa: E402
from llamaforge.train.data import write_rejects  # noqa: E402
from llamaforge.train.tracking import MetricsLog  # noqa: E402

LOOPBACK = "http://127.0.0.1"


def make_run(root: Path, name: str, *, status: str, before: float, after: float | None, steps: int) -> Path:
    run = root / "runs" / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": {"source": "tiny"}, "method": {"name": "lora"}})
    )
    info = {
        "status": status,
        "base_model": "tiny",
        "method": "lora",
        "weights": "adapter",
        "template": "llama3",
        "dataset_sha256": "ab" * 32,
        "step": steps,
        "total_steps": 3,
    }
    (run / "run.json").write_text(json.dumps(info))
    log = MetricsLog(run / "metrics.jsonl")
    for step in range(1, steps + 1):
        log.write({"step": step, "loss": 3.0 - step * 0.5, "lr": 1e-3})
        log.write({"step": step, "eval_loss": 3.2 - step * 0.4})
    log.close()
    write_rejects(
        run / "rejects.jsonl",
        [
            Rejected(
                "data/train.jsonl",
                10 + i,
                "output",
                f"'output' is empty #{i}",
                {"instruction": f"q{i}", "output": ""},
            )
            for i in range(45)
        ]
        + [Rejected("data/train.jsonl", 99, None, "longer than data.max_length (64 tokens)", {"x": 1})],
    )
    if after is not None:
        summary = {
            "steps": steps,
            "train_seconds": 12.5,
            "before": {"eval_loss": before, "answers": {"Hi": "a"}},
            "after": {"eval_loss": after, "answers": {"Hi": "b"}},
            "warnings": [],
        }
        (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture()
def workspace(tmp_path) -> Path:
    make_run(tmp_path, "alpha", status="completed", before=3.0, after=2.0, steps=3)
    make_run(tmp_path, "beta", status="completed", before=3.1, after=1.5, steps=3)
    make_run(tmp_path, "gamma", status="interrupted", before=3.1, after=None, steps=2)
    return tmp_path


@pytest.fixture()
def client(workspace) -> TestClient:
    return TestClient(create_app(workspace), base_url=LOOPBACK)


def test_runs_list_reads_every_column_and_sorts(client):
    rows = {r["name"]: r for r in client.get("/api/runs").json()}
    assert set(rows) == {"runs/alpha", "runs/beta", "runs/gamma"}
    assert rows["runs/alpha"]["eval_loss_after"] == 2.0 and rows["runs/alpha"]["duration_s"] == 12.5
    assert rows["runs/gamma"]["status"] == "interrupted" and rows["runs/gamma"]["eval_loss_after"] is None
    assert rows["runs/beta"]["dataset_sha256"] == "ab" * 32 and rows["runs/beta"]["method"] == "lora"
    ascending = [r["name"] for r in client.get("/api/runs?sort=eval_loss_after&order=asc").json()]
    assert ascending == ["runs/beta", "runs/alpha", "runs/gamma"]  # a run without the value sorts last
    descending = [r["name"] for r in client.get("/api/runs?sort=eval_loss_after&order=desc").json()]
    assert descending == ["runs/alpha", "runs/beta", "runs/gamma"]
    assert client.get("/api/runs?sort=nonsense").status_code == 400
    page = client.get("/?sort=name&order=asc").text
    assert page.index("runs/alpha") < page.index("runs/beta") < page.index("runs/gamma")


def test_rejects_are_paged_and_searchable_with_file_line_field_reason(client):
    first = client.get("/api/runs/runs/alpha/rejects?limit=20").json()
    assert (first["total"], first["matched"], len(first["items"])) == (46, 46, 20)
    assert first["items"][0] == {
        "source": "data/train.jsonl",
        "line": 10,
        "field": "output",
        "reason": "'output' is empty #0",
        "record": {"instruction": "q0", "output": ""},
    }
    last = client.get("/api/runs/runs/alpha/rejects?limit=20&offset=40").json()
    assert [i["line"] for i in last["items"]] == [50, 51, 52, 53, 54, 99]
    found = client.get("/api/runs/runs/alpha/rejects", params={"q": "MAX_LENGTH"}).json()
    assert found["matched"] == 1 and found["items"][0]["line"] == 99 and found["items"][0]["field"] is None


def test_metrics_endpoint_leaves_a_half_written_line_for_later(client, workspace):
    path = workspace / "runs" / "alpha" / "metrics.jsonl"
    first = client.get("/api/runs/runs/alpha/metrics").json()
    assert len(first["records"]) == 6 and first["next"] == 6
    with open(path, "a") as fh:
        fh.write('{"step": 4, "loss": 0.9')  # the trainer is mid-write
    assert client.get("/api/runs/runs/alpha/metrics?start=6").json() == {"records": [], "next": 6}
    with open(path, "a") as fh:
        fh.write(', "lr": 0.001}\n')
    assert client.get("/api/runs/runs/alpha/metrics?start=6").json()["records"] == [
        {"step": 4, "loss": 0.9, "lr": 0.001}
    ]


def test_run_page_and_unknown_or_escaping_run_ids(client):
    page = client.get("/runs/runs/alpha")
    assert page.status_code == 200 and "&#39;output&#39; is empty #0" in page.text
    assert client.get("/runs/runs/nope").status_code == 404
    assert client.get("/api/runs/..%2F..%2Fetc/metrics").status_code == 404


def test_form_has_every_schema_field_with_default_choices_and_description():
    def leaves(model, prefix=""):
        for name, info in model.model_fields.items():
            ann = schema_form._unwrap(info.annotation)[0]
            nested = schema_form._model_class(ann)
            yield from leaves(nested, f"{prefix}{name}.") if nested else [f"{prefix}{name}"]

    assert list(schema_form.FIELDS) == list(leaves(JobConfig))
    sched = schema_form.FIELDS["train.scheduler"]
    assert (sched.kind, sched.choices, sched.default_text) == (
        "choice",
        ["cosine", "linear", "constant"],
        "cosine",
    )
    rank = schema_form.FIELDS["method.rank"]
    assert (rank.kind, rank.bounds, rank.default) == ("int", ">= 1", 16)
    assert "optimizer steps" in schema_form.FIELDS["train.max_steps"].description
    assert schema_form.FIELDS["train.max_steps"].optional
    # the defaults, as the form shows them, read back as the default job
    values = {f.key: f.default_text for f in schema_form.FIELDS.values()}
    assert schema_form.form_to_data(values) == {}
    sources = schema_form.FIELDS["data.sources"].default_text
    assert (
        schema_form.form_to_data({"data.sources": sources + "\n"})["data"]["sources"][0]["path"] == "identity"
    )


def test_validation_gives_the_clis_errors(client, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("train:\n  epoch: 3\n  lr: -1\n")
    with pytest.raises(ConfigError) as cli:
        load_config(job)
    cli_lines = str(cli.value).splitlines()[1:]
    pasted = client.post("/api/jobs/validate", json={"yaml": job.read_text()}).json()
    form = client.post("/api/jobs/validate", json={"values": {"train.epoch": "3", "train.lr": "-1"}}).json()
    for body in (pasted, form):
        assert not body["valid"]
        assert sorted(e["message"] for e in body["errors"]) == sorted(line.strip() for line in cli_lines)
    assert "did you mean 'train.epochs'?" in pasted["message"]
    assert {e["field"] for e in form["errors"]} == {"train.lr", ""}  # the unknown key is not a form field
    ok = client.post(
        "/api/jobs/validate", json={"values": {"train.max_steps": "3", "output.name": "007"}}
    ).json()
    assert ok["valid"] and yaml.safe_load(ok["yaml"]) == {
        "train": {"max_steps": 3},
        "output": {"name": "007"},
    }
    bad_yaml = client.post("/api/jobs/validate", json={"yaml": "train: [1,"})
    assert bad_yaml.status_code == 400 and "pasted YAML: not valid YAML" in bad_yaml.json()["error"]


def test_launch_refuses_paths_outside_the_workspace_and_existing_runs(client, workspace):
    outside = client.post(
        "/api/jobs", json={"values": {"data.sources": "- path: /etc/passwd", "output.dir": "../elsewhere"}}
    )
    assert outside.status_code == 422
    messages = " ".join(e["message"] for e in outside.json()["errors"])
    assert "data.sources.0.path: /etc/passwd is outside the workspace" in messages
    assert "output.dir: ../elsewhere is outside the workspace" in messages
    invalid = client.post("/api/jobs", json={"values": {"train.lr": "0"}})
    assert invalid.status_code == 422 and invalid.json()["errors"][0]["field"] == "train.lr"
    taken = client.post("/api/jobs", json={"values": {"output.name": "alpha"}})
    assert taken.status_code == 400 and "runs/alpha exists" in taken.json()["error"]
    assert not (workspace / "jobs").exists() or not list((workspace / "jobs").iterdir())


def test_loopback_only_without_keys_and_keys_elsewhere(workspace, tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMAFORGE_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="without API keys"):
        create_app(workspace, host="0.0.0.0")
    local = TestClient(create_app(workspace), base_url=LOOPBACK)
    assert (
        local.get("/api/runs", headers={"host": "attacker.example:7860"}).status_code == 403
    )  # DNS rebinding
    cross = local.post("/api/jobs/validate", json={}, headers={"origin": "http://attacker.example"})
    assert cross.status_code == 403
    keys = tmp_path / "keys.txt"
    keys.write_text("me:sk-studio-0123456789\n")
    remote = TestClient(
        create_app(workspace, host="0.0.0.0", api_keys_file=str(keys)), base_url="http://10.1.2.3"
    )
    assert remote.get("/api/runs").status_code == 401
    assert (
        remote.get("/", headers={"accept": "text/html"}, follow_redirects=False).headers["location"]
        == "/login"
    )
    assert (
        remote.get("/api/runs", headers={"authorization": "Bearer sk-studio-0123456789"}).status_code == 200
    )
    assert (
        remote.post("/login", data={"key": "wrong-key-123"}).text.count(
            "not one of the API keys of this server"
        )
        == 1
    )
    remote.post("/login", data={"key": "sk-studio-0123456789"}, follow_redirects=False)
    assert remote.get("/api/runs").status_code == 200  # the login cookie
    assert remote.get("/gateway/unknown/health").status_code == 404  # past the guard, to the gateway router


def test_chat_refuses_an_unfinished_run(client):
    answer = client.post("/api/chat/open", json={"target": "run:runs/gamma"})
    assert answer.status_code == 400 and "has not finished (status interrupted)" in answer.json()["error"]
    unknown = client.post("/api/chat/open", json={"target": "runs/alpha"})
    assert unknown.status_code == 400 and "chat target must be run:RUN, base:RUN" in unknown.json()["error"]
    gone = client.post("/api/chat/open", json={"target": "served:nope"})
    assert gone.status_code == 404


def test_resume_needs_a_checkpoint(client):
    answer = client.post("/api/runs/runs/gamma/resume", json={})
    assert answer.status_code == 400 and "no resumable checkpoint" in answer.json()["error"]


def test_wilson_interval_matches_the_published_values():
    from llamaforge.studio.grading import wilson

    assert wilson(5, 10) == pytest.approx(
        (0.2366, 0.7634), abs=1e-4
    )  # Newcombe (1998), Wilson score interval
    assert wilson(0, 1) == pytest.approx((0.0, 0.7935), abs=1e-4)
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(0, 0) == (0.0, 1.0)


def test_grading_summary_counts_ties_as_half_a_win():
    from llamaforge.studio.grading import summary

    def grade(preferred, a_score, b_score):
        crit = lambda v: {"correctness": v, "completeness": v, "format": v}  # noqa: E731
        return {
            "index": 0,
            "candidates": ["base", "tuned"],
            "grader": "x",
            "preferred": preferred,
            "criteria": {"base": crit(a_score), "tuned": crit(b_score)},
        }

    (pair,) = summary([grade("tuned", 2, 4), grade("tie", 3, 3), grade("base", 4, 2), grade("tuned", 1, 5)])
    assert (pair["n"], pair["wins_b"], pair["wins_a"], pair["ties"]) == (4, 2, 1, 1)
    assert pair["win_rate_b"] == pytest.approx(2.5 / 4)
    assert pair["means"]["tuned"]["correctness"] == pytest.approx(3.5)
    assert pair["means"]["base"]["format"] == pytest.approx(2.5)


def test_sweeps_page_shows_the_sweeps_own_table_and_chart(client, workspace):
    from llamaforge.sweep.report import write_report

    sweep = workspace / "sweeps" / "ranks"
    sweep.mkdir(parents=True)
    definition = {
        "job": "job.yaml",
        "axes": {"method.rank": ["4", "8"]},
        "fixed": [],
        "trials": ["r4", "r8"],
        "evaluate": False,
        "metric": "eval_loss",
        "higher_is_better": False,
    }
    (sweep / "sweep.json").write_text(json.dumps(definition))
    trials = [
        {
            "name": f"r{r}",
            "values": {"method.rank": str(r)},
            "status": "completed",
            "reason": None,
            "metrics": {
                "trainable_params": r * 1000,
                "peak_rss_mb": 900.0 + r,
                "train_s": 10.0,
                "tokens_per_s": 100.0,
                "train_loss": 2.0,
                "eval_loss": loss,
                "eval_ppl": 7.0,
            },
        }
        for r, loss in ((4, 2.5), (8, 2.25))
    ]
    write_report(sweep, definition, trials)
    page = client.get("/sweeps").text
    assert 'class="best" data-trial="r8"' in page and 'data-trial="r4"' in page
    assert "<td>2.25" in page.replace("<td>2.2500", "<td>2.25")
    chart = client.get("/sweeps/sweeps/ranks/chart.png")
    assert chart.status_code == 200 and chart.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sweeps/ranks" not in client.get("/evals").text  # a sweep's results.json is not an eval's


def test_chat_base_model_must_be_a_catalog_name_hub_id_or_inside_the_workspace(client):
    outside = client.post("/api/chat/open", json={"target": "model:/etc"})
    assert (
        outside.status_code == 400 and "base model: /etc is outside the workspace" in outside.json()["error"]
    )
    escaping = client.post("/api/chat/open", json={"target": "model:../somewhere"})
    assert escaping.status_code == 400 and "outside the workspace" in escaping.json()["error"]


def test_plan_table_agrees_with_the_plan_command(client, capsys):
    from llamaforge.cli import main

    assert main(["plan", "--model", "llama3-70b", "--gpu", "H100", "--tokens", "1e7", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    page = client.get("/plans?models=llama3-70b&gpus=H100,L4&tokens_m=10")
    assert page.status_code == 200
    row = page.text.split('data-model="llama3-70b" data-gpu="H100"')[1].split("</tr>")[0]
    peak = min(cli["methods"]["qlora"]["rows"][1]["peak_gib"].values())
    assert f'data-method="qlora" class="better">{peak:.1f} GiB' in row
    assert f"<b>{cli['recommendation']['method']}</b>" in row
    l4 = page.text.split('data-model="llama3-70b" data-gpu="L4"')[1].split("</tr>")[0]
    assert "<b>nothing fits</b>" in l4


def test_plan_endpoint_runs_the_planner_on_the_forms_job(client, workspace):
    (workspace / "data.jsonl").write_text(
        "".join(json.dumps({"instruction": f"q{i}", "output": "an answer"}) + "\n" for i in range(20))
    )
    values = {"model.source": "llama3-8b", "data.sources": "- path: data.jsonl"}
    answer = client.post("/api/jobs/plan", json={"values": values, "gpu": "H100", "gpus": 1})
    assert answer.status_code == 200, answer.text
    plan = answer.json()["plan"]
    assert plan.startswith("plan: llama3-8b") and "1 x 80 GiB (H100" in plan and "recommended: lora" in plan
    assert not list((workspace / ".studio").glob("plan-*.yaml")), "the temporary job file is removed"
    bad = client.post("/api/jobs/plan", json={"values": {**values, "train.lr": "0"}, "gpu": "H100"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "train.lr"


def test_eval_launch_checks_the_task_rules_and_limit_before_anything_starts(client, workspace):
    (workspace / "data").mkdir()
    (workspace / "data" / "eval.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    (workspace / "runs" / "alpha" / "val.jsonl").write_text('{"messages": []}\n')

    def error(rid="runs/alpha", **body):
        answer = client.post(f"/api/runs/{rid}/eval", json={"task": "data/eval.jsonl", **body})
        assert answer.status_code == 400, answer.text
        return answer.json()["error"]

    assert "has not finished" in error("runs/gamma")
    assert error(task="../outside.jsonl").startswith("task: ../outside.jsonl is outside the workspace")
    assert error(task="/etc/passwd").startswith("task: /etc/passwd is outside the workspace")
    assert error(task="data/missing.jsonl") == "task: data/missing.jsonl is not a file in the workspace"
    assert error(task="") == "task: choose the jsonl file to evaluate on"
    assert error(limit="ten") == "limit: 'ten' is not a whole number"
    assert error(limit="0") == "limit: must be at least 1, got 0"
    assert error(fail_if="tuned.loss > base.loss\ntuned.loss >") == (
        "fail-if line 2: fail_if rule 'tuned.loss >': a side of the comparison is empty or ends with + or -"
    )
    assert error(fail_if=["merged.loss > 1"]) == (
        "fail-if line 1: 'merged.loss > 1' names candidate 'merged'; the candidates are base, tuned"
    )
    assert not (workspace / "evals").exists() and not (workspace / ".studio" / "jobs").exists()
    page = client.get("/runs/runs/alpha").text
    tasks = page.split('id="eval-task"')[1].split("</select>")[0]
    assert tasks.index("runs/alpha/val.jsonl") < tasks.index("data/eval.jsonl")
    assert "metrics.jsonl" not in tasks and "rejects.jsonl" not in tasks


def test_serve_action_needs_keys_off_loopback_and_a_finished_run(client, workspace, monkeypatch):
    monkeypatch.delenv("LLAMAFORGE_API_KEYS", raising=False)
    wide = client.post("/api/runs/runs/alpha/serve", json={"host": "0.0.0.0"})
    assert wide.status_code == 400 and "refusing to serve on 0.0.0.0 without API keys" in wide.json()["error"]
    odd = client.post("/api/runs/runs/alpha/serve", json={"host": "example.com"})
    assert odd.json()["error"] == "host: 'example.com' is not an IP address (e.g. 127.0.0.1 or 0.0.0.0)"
    unfinished = client.post("/api/runs/runs/gamma/serve", json={})
    assert unfinished.status_code == 400 and "has not finished" in unfinished.json()["error"]
    assert client.get("/api/serve").json() == []
    assert client.get("/api/serve/nope").status_code == 404
    assert client.get("/served/nope/health").status_code == 404
