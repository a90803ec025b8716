"""Property-based fuzzing of `llamaforge serve` against its own OpenAPI schema (issue 15): schemathesis
generates valid and invalid requests for every operation, served by the real default model; no
answer may be a 5xx. Slow (the real model decodes every valid completion)."""

from __future__ import annotations

import contextlib
import os
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from llamaforge.serve.app import create_app  # noqa: E402
from llamaforge.serve.config import ServeConfig  # noqa: E402
from llamaforge.serve.engine import Engine  # noqa: E402

AUTH = {"Authorization": "Bearer key-fuzz-1234"}
EXAMPLES = 50  # per operation and mode
CASES: Counter = Counter()  # operation -> cases sent (printed at the end of the module with -s)
STATUSES: Counter = Counter()


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    """The real default model behind an admin key (so the adapter routes are fuzzed past the guard)."""
    root = tmp_path_factory.mktemp("fuzz")
    os.environ["LLAMAFORGE_FUZZ_KEYS"] = "fuzz:key-fuzz-1234:admin"
    cfg = ServeConfig(
        model="smollm2-135m-instruct",
        precision="fp32",
        max_model_len=48,  # every valid completion stays short
        default_max_tokens=4,
        batch_wait_ms=0,
        adapter_dirs=[str(root / "adapters")],
        audit={"path": str(root / "audit.jsonl")},
        moderation={"blocklist": ["forbidden"]},
        api_keys_env="LLAMAFORGE_FUZZ_KEYS",
    )
    engine = Engine(cfg)
    engine.load()
    yield create_app(cfg, engine)
    engine.shutdown()
    del os.environ["LLAMAFORGE_FUZZ_KEYS"]
    print(f"\nschemathesis: {sum(CASES.values())} cases {dict(CASES)}; statuses {dict(STATUSES)}")


def served(case, base: str):
    """A valid completion aimed at the served model with a short answer, so that positive cases reach
    the real model (a random model name is a 404, a random max_tokens overflows the context)."""
    body = case.body
    if isinstance(body, dict):
        body["model"] = base
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int):
                body[key] = 1 + body[key] % 6
        for key in ("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
                    "response_format", "logit_bias", "presence_penalty", "frequency_penalty",
                    "parallel_tool_calls", "best_of", "suffix"):  # fmt: skip
            body.pop(key, None)  # any value is schema-valid, but only the neutral one is accepted
    return case


def fuzzer(strategy, label: str, server_errors: list[str]):
    """A derandomized hypothesis run of `strategy` (so a failure reproduces); 5xx answers are collected
    rather than shrunk (a shrink re-runs the real model)."""
    from hypothesis import HealthCheck, given, settings

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def fuzz(case):
        response = case.call(headers=AUTH)
        CASES[label] += 1
        STATUSES[response.status_code] += 1
        if response.status_code >= 500:
            server_errors.append(f"{label} {case.body!r:.300}: {response.text[:300]}")

    return fuzz


@pytest.mark.slow
def test_no_request_gets_a_5xx(served_app):
    """Every operation of the server's own schema, with valid (positive) and invalid (negative) inputs."""
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", served_app, headers=AUTH)
    base = served_app.state.server.engine.base_name
    server_errors: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)
            if mode is GenerationMode.POSITIVE and operation.path.endswith("completions"):
                strategy = strategy.map(lambda case: served(case, base))
            label = f"{operation.method.upper()} {operation.path} {mode.value}"
            with contextlib.suppress(Unsatisfiable):  # nothing invalid to send (an operation without inputs)
                fuzzer(strategy, label, server_errors)()
    assert sum(CASES.values()) > 100 and not server_errors, server_errors[:5]
