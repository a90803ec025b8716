# ruff: noqa: F811 - fixtures are imported, then named as test arguments
"""The studio's flows in a real browser: a job from the form through training, evaluation, serving,
chat and export; the in-studio chat of a run and its base; rating a served run's answer.

Runs with `make test-browser`; shared fixtures in studio_browser_fixtures.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from studio_browser_fixtures import SLOW_MS, browser, page, shots, studio_url  # noqa: F401 - fixtures
from studio_fixtures import run_files, studio_workspace  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def wait_for_job_exit(page, kind: str) -> None:
    """Until the run page's job log (an action of `kind`) shows the subprocess's exit line."""
    page.wait_for_selector(f'#job-log[data-kind="{kind}"]')
    page.wait_for_function(
        "document.querySelector('#job-log').textContent.includes('[exited ')", timeout=SLOW_MS
    )


def test_the_whole_lifecycle_without_a_terminal(page, studio_url, studio_workspace, shots):
    """The issue's done-when path: launch a job from the form, watch it train, evaluate it against its
    base from the run page, serve it, compare base and tuned answers side by side in the chat (the
    tuned one from the served process), stop the server, and export the run."""
    timings: dict[str, float] = {}

    def took(what: str, since: float) -> None:
        timings[what] = time.perf_counter() - since
        print(f"\n{what}: {timings[what]:.1f} s", flush=True)

    page.goto(studio_url + "/new")
    page.wait_for_selector("#job-ok:not([hidden])")
    values = {
        "model.source": "tiny",
        "data.sources": "- path: data/train.jsonl",
        "data.val_size": "0.25",
        "data.max_length": "64",
        "method.rank": "4",
        "method.alpha": "8",
        "train.max_steps": "3",
        "train.batch_size": "4",
        "train.eval_every": "1",
        "train.lr": "0.01",
        "eval.prompts": "[Hi]",
        "eval.max_new_tokens": "4",
        "output.name": "from-form",
    }
    for key, value in values.items():
        page.fill(f'[data-key="{key}"]', value)
    page.select_option('[data-key="train.precision"]', "fp32")
    page.wait_for_selector("body:not([data-pending]) #job-ok:not([hidden])")
    page.screenshot(path=str(shots / "new-job.png"))
    with page.expect_download() as download:
        page.click("#download-yaml")
    downloaded = Path(download.value.path()).read_text()

    # train: the live curve reaches the last step
    started = time.perf_counter()
    page.click("#launch-job")
    page.wait_for_url("**/runs/runs/from-form", timeout=30_000)
    page.wait_for_function(
        "document.querySelector('#run-status').textContent === 'completed'", timeout=SLOW_MS
    )
    took("train (launch to completed)", started)
    run_dir = studio_workspace / "runs" / "from-form"
    info, summary, metrics = run_files(run_dir)
    assert info["status"] == "completed" and summary["steps"] == 3
    live = int(page.locator("#live-count").inner_text())
    assert live == len(metrics), "every metrics.jsonl record reached the open page over SSE"
    dots = page.locator('#loss-chart circle[data-series="train"]')
    assert [int(d.get_attribute("data-step")) for d in dots.all()] == [1, 2, 3]
    assert [float(d.get_attribute("data-value")) for d in dots.all()] == pytest.approx(
        [r["loss"] for r in metrics if "loss" in r]
    )
    assert page.locator("#last-step").inner_text() == "3"
    page.wait_for_function("document.querySelector('#job-log').textContent.includes('[exited 0]')")
    assert "eval loss after training" in page.locator("#job-log").inner_text()
    job_file = studio_workspace / "jobs" / "from-form.yaml"
    assert job_file.read_text() == downloaded, "the downloaded YAML is the job that ran"
    page.locator("#run-finished a").click()
    page.wait_for_selector("#answers-table")
    page.screenshot(path=str(shots / "run-launched.png"), full_page=True)

    # evaluate from the run page: `llamaforge eval` on the run's held-out records, then its table and gate
    started = time.perf_counter()
    page.select_option("#eval-task", "runs/from-form/val.jsonl")
    page.fill("#eval-limit", "4")
    page.fill("#eval-fail-if", "tuned.loss > base.loss + 5")
    page.click("#eval-run")
    wait_for_job_exit(page, "eval")
    took("eval (click to results)", started)
    assert "[exited 0]" in page.locator("#job-log").inner_text(), page.locator("#job-log").inner_text()
    results = json.loads((studio_workspace / "evals" / "from-form" / "results.json").read_text())
    assert results["run"]["task"]["examples"] == 4 and results["run"]["gate_failed"] is False
    page.click("#job-result a")
    page.wait_for_url("**/evals/evals/from-form")
    for cand in ("base", "tuned"):
        cell = page.locator(f'#eval-results tr[data-metric="loss"] td[data-candidate="{cand}"]')
        assert float(cell.locator(".value").inner_text()) == pytest.approx(
            results["metrics"]["loss"][cand]["value"], rel=1e-3
        )
        low, high = results["metrics"]["loss"][cand]["ci"]
        assert f"[{low:.4g}, {high:.4g}]" in cell.inner_text()
    assert page.locator("#gate").inner_text().startswith("ok: tuned.loss > base.loss + 5")
    assert page.locator("#examples tr[data-index]").count() == 4
    page.screenshot(path=str(shots / "eval-launched.png"), full_page=True)

    # serve it from the run page: `llamaforge serve` on loopback, its URL and state
    started = time.perf_counter()
    page.goto(studio_url + "/runs/runs/from-form")
    assert page.locator("#run-evals a").inner_text() == "evals/from-form"
    page.click("#serve-run")
    row = page.locator("#served tr[data-served]")
    row.wait_for()
    page.wait_for_function(
        "document.querySelector('#served .serve-state').textContent.trim() === 'ready'", timeout=SLOW_MS
    )
    took("serve (click to ready)", started)
    url = row.locator(".serve-url").inner_text()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    assert row.locator(".serve-models").inner_text() == "tiny, from-form"
    page.screenshot(path=str(shots / "run-serve.png"), full_page=True)

    # chat: base and tuned side by side, the tuned one answered by the served process
    started = time.perf_counter()
    row.locator(".serve-chat").click()
    page.wait_for_url("**/chat?served=**")
    page.wait_for_selector("#chat-send:not([disabled])", timeout=SLOW_MS)
    panes = page.locator(".pane")
    assert [panes.nth(i).get_attribute("data-model") for i in range(2)] == ["tiny", "from-form"]
    assert panes.nth(1).get_attribute("data-gateway").startswith("/served/")
    page.fill("#chat-max-tokens", "8")
    page.click("#chat-send")
    page.wait_for_function(
        "[...document.querySelectorAll('.pane')].every(p => p.dataset.done === '1')", timeout=SLOW_MS
    )
    took("chat (load and both answers)", started)
    for i in range(2):
        assert panes.nth(i).locator(".finish").inner_text().startswith("finish: ")
        assert panes.nth(i).locator(".answer").inner_text().strip()
    # the served process and the studio's own gateway give the tuned run the same greedy answer
    opened = page.evaluate(
        "fetch('/api/chat/open', {method: 'POST', headers: {'Content-Type': 'application/json'},"
        " body: JSON.stringify({target: 'run:runs/from-form'})}).then(r => r.json())"
    )
    page.evaluate(  # until the adapter has loaded into the gateway (its /health lists it)
        "async ([g, m]) => { for (;;) { const h = await (await fetch(g + '/health')).json();"
        " if ((h.models || []).includes(m)) return; await new Promise(r => setTimeout(r, 500)); } }",
        [opened["gateway"], opened["model"]],
    )
    whole = page.evaluate(
        "([g, m]) => fetch(g + '/v1/chat/completions', {method: 'POST', headers: {'Content-Type': 'application/json'},"
        " body: JSON.stringify({model: m, max_tokens: 8, temperature: 0,"
        " messages: [{role: 'user', content: 'Who are you?'}]})}).then(r => r.json())",
        [opened["gateway"], opened["model"]],
    )
    assert "choices" in whole, whole
    assert (
        panes.nth(1).locator(".answer").inner_text().strip()
        == whole["choices"][0]["message"]["content"].strip()
    )
    assert panes.nth(1).locator(".rate").is_visible() and panes.nth(0).locator(".rate-off").is_visible()

    # stop the server, then export the run
    page.goto(studio_url + "/runs/runs/from-form")
    row = page.locator("#served tr[data-served]")
    row.locator(".serve-stop").click()
    page.wait_for_function(
        "document.querySelector('#served .serve-state').textContent.trim() === 'stopped'", timeout=60_000
    )
    assert page.evaluate("fetch('/api/serve').then(r => r.json())")[0]["returncode"] is not None
    started = time.perf_counter()
    page.select_option("#export-format", "safetensors")
    page.click("#export-run")
    wait_for_job_exit(page, "export")
    took("export (click to exited)", started)
    assert "[exited 0]" in page.locator("#job-log").inner_text()
    out = studio_workspace / "exports" / "from-form-safetensors"
    assert (out / "manifest.json").is_file() and list(out.glob("*.safetensors"))
    assert page.locator("#job-result").inner_text() == "Written to exports/from-form-safetensors"


def test_chat_streams_base_and_adapter_answers(page, studio_url, studio_workspace, shots):
    page.goto(studio_url + "/chat?run=runs/done")
    page.wait_for_selector("#chat-send:not([disabled])", timeout=SLOW_MS)
    panes = page.locator(".pane")
    assert panes.count() == 2
    assert panes.nth(0).get_attribute("data-model") == "tiny"
    assert panes.nth(1).get_attribute("data-model") == "runs--done"
    page.fill("#chat-max-tokens", "12")
    page.click("#chat-send")
    page.wait_for_function(
        "[...document.querySelectorAll('.pane')].every(p => p.dataset.done === '1')", timeout=SLOW_MS
    )
    for i in range(2):
        finish = panes.nth(i).locator(".finish").inner_text()
        assert finish.startswith("finish: ") and int(finish.split(", ")[1].split()[0]) >= 2, finish
        assert panes.nth(i).locator(".answer").inner_text().strip()
    # the streamed text is the same answer as the gateway's non-streamed one (greedy decoding)
    gateway = page.evaluate(
        "fetch('/api/chat/open', {method: 'POST', headers: {'Content-Type': 'application/json'},"
        " body: JSON.stringify({target: 'run:runs/done'})}).then(r => r.json())"
    )["gateway"]
    whole = page.evaluate(
        "([g, m]) => fetch(g + '/v1/chat/completions', {method: 'POST', headers: {'Content-Type': 'application/json'},"
        " body: JSON.stringify({model: m, max_tokens: 12, temperature: 0,"
        " messages: [{role: 'user', content: 'Who are you?'}]})}).then(r => r.json())",
        [gateway, "runs--done"],
    )
    assert (
        panes.nth(1).locator(".answer").inner_text().strip()
        == whole["choices"][0]["message"]["content"].strip()
    )
    page.screenshot(path=str(shots / "chat.png"))


def test_a_thumbs_down_with_a_correction_on_a_served_answer_is_saved(
    page, studio_url, studio_workspace, shots
):
    """Serve the finished run from its page, chat with it, rate its answer down with a better one: the
    page says saved, and the served process's feedback.jsonl holds the answer joined to the rating."""
    page.goto(studio_url + "/runs/runs/done")
    page.click("#serve-run")
    row = page.locator("#served tr[data-served]")
    row.wait_for()
    page.wait_for_function(
        "document.querySelector('#served .serve-state').textContent.trim() === 'ready'", timeout=SLOW_MS
    )
    sid = row.get_attribute("data-served")
    row.locator(".serve-chat").click()
    page.wait_for_url("**/chat?served=**")
    page.wait_for_selector("#chat-send:not([disabled])", timeout=SLOW_MS)
    served = page.locator('.pane[data-side="b"]')
    assert served.get_attribute("data-gateway") == f"/served/{sid}"
    assert served.locator(".rate").is_hidden(), "nothing to rate before an answer"
    assert "serve the run" in page.locator('.pane[data-side="a"] .rate-off').inner_text()
    page.fill("#chat-max-tokens", "8")
    page.click("#chat-send")
    page.wait_for_function(
        "[...document.querySelectorAll('.pane')].every(p => p.dataset.done === '1')", timeout=SLOW_MS
    )
    answer_id = served.get_attribute("data-answer")
    assert answer_id.startswith("chatcmpl-")
    correction = "I am a small test model, trained for three steps."
    served.locator(".correction").fill(correction)
    served.locator('.thumb[data-rating="down"]').click()
    result = served.locator(".rate-result")
    page.wait_for_function(
        "document.querySelector('.pane[data-side=\"b\"] .rate-result').textContent.startsWith('saved')"
    )
    assert result.inner_text() == "saved (down, with a correction)"
    log = studio_workspace / served.locator(".rate code").inner_text()
    assert log == studio_workspace / ".studio" / "feedback" / "runs--done" / "feedback.jsonl"
    record = [json.loads(line) for line in log.read_text().splitlines()][-1]
    assert (record["id"], record["rating"], record["correction"]) == (answer_id, "down", correction)
    assert record["response"].strip() == served.locator(".answer").inner_text().strip()
    assert record["model"] == "done" and record["chat"] is True
    page.screenshot(path=str(shots / "chat-served.png"))

    # a rating the server refuses is shown as its error, not as saved
    page.evaluate("document.querySelector('.pane[data-side=\"b\"]').dataset.answer = 'chatcmpl-0'")
    served.locator('.thumb[data-rating="up"]').click()
    page.wait_for_function(
        "document.querySelector('.pane[data-side=\"b\"] .rate-result').textContent.startsWith('not saved')"
    )
    assert "No answer with id 'chatcmpl-0'" in result.inner_text()
    assert log.read_text().splitlines()[-1] == json.dumps(record, ensure_ascii=False), "nothing appended"
    page.goto(studio_url + "/runs/runs/done")
    page.locator("#served tr[data-served] .serve-stop").click()
    page.wait_for_function(
        "document.querySelector('#served .serve-state').textContent.trim() === 'stopped'", timeout=60_000
    )
