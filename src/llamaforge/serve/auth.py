"""Bearer API keys (from a file or an environment variable) and per-key rate limits.

Without keys the server only listens on loopback: an open model endpoint on a network is refused,
and it answers only requests whose `Host` names the loopback (a web page's script reaching it
through DNS rebinding sends its own host name). Keys are compared in constant time; only a key's
name (or a hash prefix) ever reaches the logs. A key is `key`, `name:key`, or `name:key:admin`: only
admin keys may load and unload adapters.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from llamaforge.errors import ConfigError


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's name (never the key) and whether it may administer adapters."""

    name: str
    admin: bool = False


ANONYMOUS = Caller("anonymous", admin=True)  # no keys: a loopback-only server, its one user is the admin


def parse_keys(lines: list[str]) -> dict[str, Caller]:
    """key -> caller. A line is `key`, `name:key` or `name:key:admin`; blank lines and # comments are skipped."""
    keys: dict[str, Caller] = {}
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        admin = line.count(":") >= 2 and line.endswith(":admin")
        body = line.removesuffix(":admin") if admin else line
        name, sep, key = body.partition(":")
        if not sep:
            key, name = body, "key-" + hashlib.sha256(body.encode()).hexdigest()[:8]
        if len(key) < 8:
            raise ConfigError(f"API key '{name}' is shorter than 8 characters")
        keys[key] = Caller(name, admin)
    return keys


def load_keys(keys_file: str | None, env_var: str) -> dict[str, Caller]:
    lines: list[str] = []
    if keys_file:
        path = Path(keys_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"serve.api_keys_file {path} does not exist")
        lines += path.read_text().splitlines()
    lines += [k for k in os.environ.get(env_var, "").split(",") if k.strip()]
    return parse_keys(lines)


class Auth:
    def __init__(self, keys: dict[str, Caller], host: str, rate_limit_per_minute: int = 0):
        if not keys and not is_loopback(host):
            raise ConfigError(
                f"refusing to serve on {host} without API keys: set serve.api_keys_file or the API keys "
                "environment variable, or listen on 127.0.0.1"
            )
        self.keys, self.host = keys, host
        self.limiter = RateLimiter(rate_limit_per_minute) if rate_limit_per_minute else None

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def host_allowed(self, host_header: str | None) -> bool:
        """With keys, any Host; without, only loopback names (or the configured host), so a page served
        from elsewhere cannot reach the keyless server through a rebinding DNS name."""
        if self.keys or not host_header:
            return True
        name = host_header.strip()
        if name.startswith("["):  # [::1]:8000
            name = name[1:].partition("]")[0]
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        name = name.rstrip(".").lower()
        return name == self.host.lower() or is_loopback(name) or name == "localhost"

    def identify(self, authorization: str | None) -> Caller | None:
        """The caller for a valid `Bearer <key>` header, ANONYMOUS when no keys are set, else None."""
        if not self.keys:
            return ANONYMOUS
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        given = authorization[7:].strip().encode()
        found = None
        for key, caller in self.keys.items():  # compare against every key: timing says nothing
            if hmac.compare_digest(given, key.encode()):
                found = caller
        return found


class RateLimiter:
    """A token bucket per key: `per_minute` requests a minute, bursts up to the same number."""

    def __init__(self, per_minute: int):
        self.rate, self.capacity = per_minute / 60.0, float(per_minute)
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def take(self, key_id: str) -> float:
        """0 when allowed, else the seconds until a request would be."""
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(key_id, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self.buckets[key_id] = (tokens - 1, now)
                return 0.0
            self.buckets[key_id] = (tokens, now)
            return (1 - tokens) / self.rate
