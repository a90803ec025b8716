"""What a user sees first: no third-party noise, and no network I/O on import."""

from __future__ import annotations

import os
import subprocess
import sys

NO_NETWORK = """
import socket
attempts = []

def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("network blocked by the test")

socket.socket.connect = refuse
socket.create_connection = refuse
import llamaforge
from llamaforge.cli import build_parser
build_parser()
print("attempts", len(attempts))
"""


def test_import_does_no_network_io():
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    out = subprocess.run(
        [sys.executable, "-c", NO_NETWORK], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "attempts 0" in out.stdout


def test_a_hub_id_is_where_reachability_is_asked(monkeypatch):
    from llamaforge import offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(offline, "_hub_reachable", None)
    asked = []
    monkeypatch.setattr(offline, "hub_reachable", lambda timeout=1.5: asked.append(1) or False)
    assert offline.is_offline() and offline.is_offline() and asked == [1]  # probed once
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user's setting wins
    assert not offline.is_offline()


NOISE = ("Failed to load", "triton", "Enum subclass", "FutureWarning", "DeprecationWarning", "warnings.warn")


def test_the_first_screen_of_a_command_has_no_third_party_noise():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "llamaforge.cli", "train", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    screen = out.stdout + out.stderr
    noisy = [line for line in screen.splitlines() if any(n.lower() in line.lower() for n in NOISE)]
    assert not noisy, noisy
    assert "precision: " in screen  # what it did say: the precision it chose, with the reason


def test_deepspeeds_no_gpu_warning_is_dropped_and_nothing_else():
    """DeepSpeed (the `distributed` extra), imported by accelerate, warns on every CPU machine that it
    found no GPU; its other messages still get through."""
    import logging

    from llamaforge.quiet import silence_known_noise

    silence_known_noise()
    silence_known_noise()  # idempotent: one filter, not one per call
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("DeepSpeed")
    logger.addHandler(handler)
    try:
        logger.warning(
            "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
        )
        logger.warning("ZeRO stage 3 is not supported here")
    finally:
        logger.removeHandler(handler)
    assert seen == ["ZeRO stage 3 is not supported here"]
    assert sum(type(f).__name__ == "_DropMessage" for f in logger.filters) == 1
