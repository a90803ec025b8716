# ruff: noqa: F811 - the studio_workspace fixture is imported, then named as a fixture argument
"""The browser tests' shared parts: headless Chromium (Debian's package) driven by Playwright, a studio
on a free loopback port over the session's tiny workspace, a fresh page per test (any JavaScript error
fails it), and the screenshots folder ($STUDIO_SCREENSHOTS, docs/studio in the repository).

Imported by test_studio_browser.py (the pages) and test_studio_browser_flows.py (jobs, serving, chat);
each module gets its own studio on the same workspace.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from studio_fixtures import studio_workspace  # noqa: F401 - fixture

CHROMIUM = "/usr/bin/chromium"
# a subprocess that imports torch and loads a model, on a 2-core machine that may be busy (the
# lifecycle's steps take 15-140 s each when it is not)
SLOW_MS = 600_000
if shutil.which(CHROMIUM) is None:
    pytest.skip(
        f"{CHROMIUM} not found: `apt-get install -y chromium` (or `make test-browser`)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright not installed: pip install playwright"
)
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def studio_url(studio_workspace):
    import uvicorn

    from llamaforge.studio.app import create_app

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(studio_workspace), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "the studio did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=90)  # lifespan shutdown stops running jobs (checkpointed) and the gateways


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("STUDIO_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    out.mkdir(parents=True, exist_ok=True)
    return out
