# ruff: noqa: F811 - fixtures are imported, then named as test arguments
"""The studio's pages in a real browser: the runs table and run page, the eval page, blind A/B grading,
data review, the job form's errors, the plans table, and stopping a job from its page.

Runs with `make test-browser` (installs chromium with apt when missing); the jobs, serving and chat
flows are in test_studio_browser_flows.py, the shared fixtures in studio_browser_fixtures.py.
Screenshots go to $STUDIO_SCREENSHOTS when set (docs/studio in the repository), else to a temp folder.
"""

from __future__ import annotations

import json

import pytest
import yaml

from studio_browser_fixtures import SLOW_MS, browser, page, shots, studio_url  # noqa: F401 - fixtures
from studio_fixtures import run_files, studio_workspace, tiny_job  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_runs_table_and_run_page_show_the_runs_numbers(page, studio_url, studio_workspace, shots):
    info, summary, metrics = run_files(studio_workspace / "runs" / "done")
    page.goto(studio_url + "/")
    row = page.locator('tr[data-run="runs/done"]')
    cell = lambda col: row.locator(f'td[data-col="{col}"]').inner_text().strip()  # noqa: E731
    assert cell("status") == "completed"
    assert cell("method") == "lora"
    assert cell("step") == "3 / 3"
    assert cell("eval_loss_before") == f"{summary['before']['eval_loss']:.4f}"
    assert cell("eval_loss_after") == f"{summary['after']['eval_loss']:.4f}"
    assert row.locator('td[data-col="dataset_sha256"]').get_attribute("title") == info["dataset_sha256"]
    page.screenshot(path=str(shots / "runs.png"), full_page=True)

    row.locator("a").first.click()
    page.wait_for_url("**/runs/runs/done")
    dots = page.locator('#loss-chart circle[data-series="train"]')
    expected_train = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    assert dots.count() == len(expected_train) == 3
    assert [int(d.get_attribute("data-step")) for d in dots.all()] == [s for s, _ in expected_train]
    assert [float(d.get_attribute("data-value")) for d in dots.all()] == pytest.approx(
        [v for _, v in expected_train]
    )
    evals = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    drawn_evals = page.locator('#loss-chart circle[data-series="eval"]')
    assert [float(d.get_attribute("data-value")) for d in drawn_evals.all()] == pytest.approx(
        [e for _, e in evals]
    )
    assert page.locator("#last-step").inner_text() == "3"
    assert (
        page.locator('#eval-table td[data-col="after"]').inner_text()
        == f"{summary['after']['eval_loss']:.4f}"
    )
    card = json.loads((studio_workspace / "runs" / "done" / "data_card.json").read_text())
    assert page.locator('#data-card td[data-key="train_records"]').inner_text() == str(card["train_records"])
    answers = page.locator("#answers-table tr").nth(1).locator("td")
    assert answers.nth(2).inner_text() == summary["after"]["answers"]["Who are you?"].strip()
    assert page.locator("#checkpoints").inner_text().count("step-00000003") == 1

    rejects = page.locator("#rejects-table tbody tr")
    assert rejects.count() == 2
    assert rejects.nth(0).locator("td").nth(1).inner_text() == "25"  # file line of the first bad record
    assert rejects.nth(0).locator("td").nth(2).inner_text() == "instruction"
    page.fill("#rejects-search", "missing field")
    page.wait_for_function("document.querySelectorAll('#rejects-table tbody tr').length === 1")
    assert "question" in rejects.nth(0).locator("td").nth(4).inner_text()
    assert page.locator("#rejects-count").inner_text() == "1 of 2"
    page.fill("#rejects-search", "")
    page.wait_for_function("document.querySelectorAll('#rejects-table tbody tr').length === 2")
    page.screenshot(path=str(shots / "run.png"), full_page=True)


def test_eval_page_shows_the_evaluators_table_gate_and_examples(page, studio_url, studio_workspace, shots):
    folder = studio_workspace / "runs" / "eval-done"
    results = json.loads((folder / "results.json").read_text())
    page.goto(studio_url + "/evals")
    page.click('a[href="/evals/runs/eval-done"]')
    for metric in ("loss", "rougeL"):
        for cand in ("base", "tuned"):
            shown = page.locator(
                f'#eval-results tr[data-metric="{metric}"] td[data-candidate="{cand}"] .value'
            )
            assert float(shown.inner_text()) == pytest.approx(
                results["metrics"][metric][cand]["value"], rel=1e-3
            )
    delta = page.locator(
        '#eval-results tr[data-metric="loss"] td[data-candidate="tuned"] .delta'
    ).inner_text()
    assert float(delta.split()[1]) == pytest.approx(results["metrics"]["loss"]["tuned"]["delta"], rel=1e-3)
    assert page.locator("#gate").inner_text().startswith("ok: tuned.loss > base.loss + 1")
    assert page.locator("#examples tr[data-index]").count() == 6
    base, tuned = (
        [json.loads(line) for line in (folder / f"{c}.jsonl").read_text().splitlines()]
        for c in ("base", "tuned")
    )
    lost = [t["index"] for b, t in zip(base, tuned) if t["scores"]["loss"] > b["scores"]["loss"]]
    page.select_option('#example-filter select[name="metric"]', "loss")
    page.check('#example-filter input[name="lost"]')
    page.click("#example-filter button")
    page.wait_for_url("**lost=true**")
    assert [
        int(r.get_attribute("data-index")) for r in page.locator("#examples tr[data-index]").all()
    ] == lost
    assert page.locator("#examples-count").inner_text() == f"{len(lost)} of 6"
    page.goto(studio_url + "/evals/runs/eval-done")
    page.screenshot(path=str(shots / "eval.png"), full_page=True)


def test_blind_ab_grading_is_stored_unblinded_and_shown_as_a_win_rate(
    page, studio_url, studio_workspace, shots
):
    folder = studio_workspace / "runs" / "eval-done"
    outputs = {
        c: [json.loads(line)["output"] for line in (folder / f"{c}.jsonl").read_text().splitlines()]
        for c in ("base", "tuned")
    }
    page.goto(studio_url + "/evals/runs/eval-done")
    page.click("#grade-link")
    page.fill('#grade-setup input[name="grader"]', "expert-1")
    page.click("#grade-setup button")
    picked = []
    for i in range(2):
        page.wait_for_selector(f"#grade-progress:has-text('{i} of 6')")
        index = int(page.locator("#grade-item").get_attribute("data-index"))
        first = page.locator('.pane[data-slot="1"] .answer').inner_text()
        second = page.locator('.pane[data-slot="2"] .answer').inner_text()
        assert {first, second} == {outputs["base"][index].strip(), outputs["tuned"][index].strip()}
        assert "base" not in page.locator("#grade-item").inner_text().replace("base model", "")
        for slot, grade in (("1", "4"), ("2", "2")):
            for criterion in ("correctness", "completeness", "format"):
                page.select_option(f'.pane[data-slot="{slot}"] select[data-criterion="{criterion}"]', grade)
        page.check('input[name="preferred"][value="1"]')  # the first shown answer wins, whichever it is
        if i == 0:
            page.screenshot(path=str(shots / "grade.png"), full_page=True)
        page.click("#grade-save")
        picked.append("base" if first == outputs["base"][index].strip() else "tuned")
        page.wait_for_function(
            f"!document.querySelector('#grade-item') || "
            f"document.querySelector('#grade-item').dataset.index !== '{index}'"
        )
    grades = [json.loads(line) for line in (folder / "human_grades.jsonl").read_text().splitlines()]
    assert [g["preferred"] for g in grades] == picked
    assert all(g["criteria"][g["preferred"]]["correctness"] == 4 for g in grades)
    page.goto(studio_url + "/evals/runs/eval-done")
    row = page.locator('#human tr[data-pair="base|tuned"]')
    wins_tuned = picked.count("tuned")
    assert row.locator('td[data-col="n"]').inner_text() == "2"
    assert row.locator('td[data-col="wins_b"]').inner_text() == str(wins_tuned)
    assert row.locator('td[data-col="win_rate"] b').inner_text() == f"{wins_tuned / 2 * 100:.0f}%"
    exported = page.evaluate("fetch('/evals/runs/eval-done/preferences.jsonl').then(r => r.text())")
    assert [json.loads(line)["chosen_model"] for line in exported.splitlines()] == picked


def test_a_review_verdict_applied_in_the_browser_changes_the_split(page, studio_url, studio_workspace, shots):
    folder = studio_workspace / "prepared"
    review_csv = (folder / "review.csv").read_text()
    train_before = len((folder / "train.jsonl").read_text().splitlines())
    page.goto(studio_url + "/data")
    page.click('a[href="/data/prepared"]')
    assert page.locator('#splits td[data-split="train"]').inner_text() == str(train_before)
    assert "missing field 'instruction': 1" in page.locator('#steps tr[data-step="ingest"]').inner_text()
    row = page.locator("#review tr[data-id]").filter(has=page.locator("td", has_text="train")).first
    rid = row.get_attribute("data-id")
    row.locator("select.verdict").select_option("reject")
    row.locator("input.note").fill("off-topic")
    page.click("#apply-review")
    page.wait_for_selector("#review-state.ok")
    assert page.locator('#splits td[data-split="train"]').inner_text() == str(train_before - 1)
    assert len((folder / "train.jsonl").read_text().splitlines()) == train_before - 1
    assert rid in (folder / "rejects.jsonl").read_text()
    assert (folder / "review.csv").read_text() == review_csv, "the exported review sample is left as it was"
    reviewed = list(folder.glob("reviewed-*.csv"))
    assert len(reviewed) == 1 and f"{rid},sample,train" in reviewed[0].read_text()
    page.screenshot(path=str(shots / "data.png"), full_page=True)


def test_a_wrong_field_shows_the_schemas_error(page, studio_url, shots):
    page.goto(studio_url + "/new")
    page.wait_for_selector("#job-ok:not([hidden])")  # the defaults are a valid job
    page.fill('[data-key="train.lr"]', "-1")
    error = page.locator('[data-error-for="train.lr"]')
    error.wait_for(state="visible")
    assert "train.lr: Input should be greater than 0 (got -1)" in error.inner_text()
    assert page.locator("#job-ok").is_hidden()
    page.locator('[data-error-for="train.lr"]').scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "new-job-error.png"))
    page.fill('[data-key="train.lr"]', "2e-4")
    page.wait_for_selector("body:not([data-pending]) #job-ok:not([hidden])")
    assert error.is_hidden()

    page.click('button[data-tab="yaml-tab"]')
    page.fill("#job-yaml", "train:\n  epoch: 3\n")
    box = page.locator("#job-errors")
    box.wait_for(state="visible")
    assert "train.epoch: unknown key. did you mean 'train.epochs'?" in box.inner_text()


def test_stop_a_running_job_from_its_page(page, studio_url, studio_workspace):
    # a long job, stopped from its page: SIGTERM -> checkpoint -> run.json "interrupted", resumable
    page.goto(studio_url + "/new")
    page.click('button[data-tab="yaml-tab"]')
    job = {
        **tiny_job(studio_workspace, "stopped"),
        "train": {"max_steps": 5000, "batch_size": 4, "precision": "fp32", "lr": 0.01},
    }
    job["eval"] = {"before_after": False, "prompts": []}
    page.fill("#job-yaml", yaml.safe_dump(job))
    page.wait_for_selector("body:not([data-pending]) #job-ok:not([hidden])")
    page.click("#launch-job")
    page.wait_for_url("**/runs/runs/stopped", timeout=30_000)
    page.wait_for_function("Number(document.querySelector('#last-step').textContent) >= 2", timeout=SLOW_MS)
    page.click("#stop-run")
    page.wait_for_function(
        "document.querySelector('#job-log') && "
        "document.querySelector('#job-log').textContent.includes('[exited ')",
        timeout=SLOW_MS,
    )
    run = studio_workspace / "runs" / "stopped"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and 2 <= info["step"] < 5000
    assert (run / "checkpoints" / f"step-{info['step']:08d}").is_dir()
    page.goto(studio_url + "/runs/runs/stopped")
    assert page.locator("#run-status").inner_text() == "interrupted"
    assert page.locator("#resume-run").is_visible()


def test_plans_page_renders_the_planners_table(page, studio_url, shots):
    page.goto(studio_url + "/plans")
    rows = page.locator("#plans tr[data-model]")
    assert rows.count() == 12  # llama3-8b and llama3-70b on six GPUs
    assert (
        page.locator('#plans tr[data-model="llama3-8b"][data-gpu="H100"] td[data-col="method"]').inner_text()
        == "lora"
    )
    page.screenshot(path=str(shots / "plans.png"), full_page=True)
