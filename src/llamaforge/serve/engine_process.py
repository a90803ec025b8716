"""An engine server (llama-server, vLLM) as a child process of the gateway.

It listens on a loopback port picked at each start and requires a random key generated here, so
only the gateway can use it; its output goes to a log file beside the gateway's cache. A monitor
thread health-checks it: when it dies it is started again (with a growing pause between tries), and
it is stopped with the gateway (at exit, and by the kernel through PR_SET_PDEATHSIG on Linux should
the gateway be killed). `restart` swaps its arguments (a new adapter list) with a stop and a start.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EngineFailed(RuntimeError):
    """The engine process did not come up (its log's last lines are in the message)."""


class EngineProcess:
    """One child server. `argv(port, key)` builds its command line for a port and key."""

    def __init__(
        self,
        name: str,
        argv: Callable[[int, str], list[str]],
        *,
        env: Callable[[str], dict[str, str]] | None = None,
        log_path: Path,
        health_path: str = "/health",
        start_timeout_s: float = 600.0,
        on_down: Callable[[], None] | None = None,
        on_up: Callable[[], None] | None = None,
    ):
        self.name, self.argv, self.env = name, argv, env or (lambda key: {})
        self.log_path, self.health_path, self.start_timeout_s = log_path, health_path, start_timeout_s
        self.on_down, self.on_up = on_down, on_up
        self.key = secrets.token_urlsafe(24)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.up = threading.Event()  # set while the child answers its health check
        self.restarts = 0
        self.error: str | None = None  # why it is down for good (too many failed starts)
        self._lock = threading.RLock()  # start / stop / restart one at a time
        self._stopping = False
        self._monitor: threading.Thread | None = None
        atexit.register(self.stop)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the child and wait until it is healthy; EngineFailed with its log tail otherwise."""
        with self._lock:
            self._stopping = False
            self._spawn()
            self._wait_healthy()
            if self._monitor is None:
                self._monitor = threading.Thread(target=self._watch, name=f"{self.name}-monitor", daemon=True)
                self._monitor.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._kill()

    def restart(self, argv: Callable[[int, str], list[str]] | None = None) -> None:
        """Stop, then start with `argv` (when given); the caller has drained the requests."""
        with self._lock:
            if argv is not None:
                self.argv = argv
            self._kill()
            self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ internals
    def _spawn(self) -> None:
        self.port = free_port()
        argv = self.argv(self.port, self.key)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it; closed below
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {argv[0]}\n".encode())
        out.flush()
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env(self.key)},
                preexec_fn=_die_with_parent,
            )
        finally:
            out.close()
        log.info("%s started (pid %d, port %d); log: %s", self.name, self.proc.pid, self.port, self.log_path)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise EngineFailed(f"{self.name} exited while starting:\n{self.log_tail()}")
                try:
                    if client.get(self.base_url + self.health_path).status_code == 200:
                        self.up.set()
                        self.error = None
                        if self.on_up:
                            self.on_up()
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        self._kill()
        raise EngineFailed(
            f"{self.name} was not healthy after {self.start_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def _kill(self) -> None:
        self.up.clear()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def _watch(self) -> None:
        """Restart the child when it dies (not when we stopped it); give up after 5 failed starts in a row."""
        failures = 0
        while True:
            time.sleep(0.25)
            if self._stopping:
                return
            with self._lock:
                if self._stopping or self.alive():
                    continue
                code = self.proc.returncode if self.proc is not None else None
                log.error(
                    "%s exited (status %s); restarting. Log tail:\n%s", self.name, code, self.log_tail()
                )
                self.up.clear()
                if self.on_down:
                    self.on_down()
                try:
                    self._spawn()
                    self._wait_healthy()
                    self.restarts += 1
                    failures = 0
                except (EngineFailed, OSError) as exc:
                    failures += 1
                    if failures >= 5:
                        self.error = f"{self.name} failed to restart 5 times: {exc}"
                        log.error(self.error)
                        return
                    time.sleep(min(30.0, 2.0**failures))

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
