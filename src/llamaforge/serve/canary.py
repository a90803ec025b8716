"""Canary routing at the gateway: which loaded model answers a request for a served name.

A route for NAME says which adapter serves it now (`stable`, NAME itself until a promotion), an
optional `candidate` and the `share` of callers sent to it. The choice happens before dispatch, in
the gateway, so it holds whatever engine runs behind it. A caller is bucketed by a stable hash of
(NAME, key name, the request's `user` field), so one user always sees the same adapter while a
canary runs, and the fraction of users on the candidate is close to the share.

Every change is one assignment under a lock: requests in flight keep the adapter they were routed
to, new ones see the new table, so promoting and rolling back never fail a request. Adapters are
never unloaded here (the previous stable stays loaded for a rollback). Admin endpoints (an admin
key when the server has keys): `GET /v1/routes`, `POST /v1/routes` {name, candidate, share},
`POST /v1/routes/promote` {name}, `POST /v1/routes/rollback` {name}.

The table outlives a restart: each change is written (atomically) to `routes.json` in
`serve.state_dir` (default: beside the audit log) with the folders of the adapters it names, and
read back once the engine has loaded. An adapter that is gone or no longer loads is left out with a
warning: a lost candidate ends its canary, a lost stable sends NAME back to NAME itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fastapi import Request
from pydantic import Field

from llamaforge.atomic import atomic_write_text
from llamaforge.serve.guard import caller_of
from llamaforge.serve.protocol import APIError, Strict

log = logging.getLogger("llamaforge.serve")
STATE_FILE = "routes.json"


@dataclass(frozen=True)
class Route:
    name: str
    stable: str
    candidate: str | None = None
    share: float = 0.0
    previous: tuple[str, ...] = field(default_factory=tuple)  # earlier stables, newest last


def bucket(name: str, caller: str) -> float:
    """A caller's place in [0, 1) for this name: the same on every request and every restart."""
    digest = hashlib.sha256(f"{name}\x00{caller}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Routes:
    def __init__(self, state: Path | None = None) -> None:
        self.table: dict[str, Route] = {}
        self.lock = threading.Lock()
        self.state = state  # routes.json, or None: the table lives in memory only
        self.restored = threading.Event()  # the server answers 503 until a saved table is back
        if state is None or not state.is_file():
            self.restored.set()

    def save(self, paths: dict[str, str]) -> None:
        """Write the table and the folders of the adapters it names (`paths`: adapter -> folder)."""
        if self.state is None:
            return
        with self.lock:
            routes = {n: self.describe(n) for n in sorted(self.table)}
        named = {a for r in routes.values() for a in (r["stable"], r["candidate"], *r["previous"]) if a}
        adapters = {a: paths[a] for a in sorted(named) if a in paths}
        self.state.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.state, json.dumps({"routes": routes, "adapters": adapters}, indent=1) + "\n")

    def restore(self, loaded: list[str], load) -> None:
        """Read the saved table back: `load(name, folder)` hot-loads an adapter that is not in `loaded`
        (raising when it cannot); what cannot be loaded is dropped from its route with a warning."""
        try:
            self._restore(loaded, load)
        finally:
            self.restored.set()

    def _restore(self, loaded: list[str], load) -> None:
        if self.state is None or not self.state.is_file():
            return
        try:
            saved = json.loads(self.state.read_text(encoding="utf-8"))
            routes, folders = saved["routes"], saved.get("adapters", {})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable (%s); serving every name as itself", self.state, exc)
            return
        have = set(loaded)

        def usable(adapter: str | None) -> bool:
            if adapter is None or adapter in have:
                return adapter is not None
            if adapter not in folders:
                log.warning("%s: adapter %s is neither loaded nor has a saved folder", self.state, adapter)
                return False
            try:
                load(adapter, folders[adapter])
            except Exception as exc:  # noqa: BLE001 - any failure leaves the adapter out, said why
                log.warning(
                    "%s: adapter %s (%s) does not load: %s", self.state, adapter, folders[adapter], exc
                )
                return False
            have.add(adapter)
            return True

        table = {}
        for name, r in routes.items():
            try:
                if not usable(r["stable"]):
                    log.warning("%s: route %s falls back to %s itself", self.state, name, name)
                    continue
                candidate = r["candidate"] if usable(r["candidate"]) else None
                previous = tuple(p for p in r["previous"] if usable(p))
                share = float(r["share"]) if candidate else 0.0
            except (KeyError, TypeError, ValueError) as exc:
                log.warning(
                    "%s: route %s is malformed (%s); %s serves as itself", self.state, name, exc, name
                )
                continue
            table[name] = Route(name, r["stable"], candidate, share, previous)
        with self.lock:
            self.table = table
        log.info("routes restored from %s: %s", self.state, ", ".join(sorted(table)) or "none")

    def choose(self, name: str, caller: str) -> str:
        route = self.table.get(name)
        if route is None:
            return name
        if route.candidate is not None and bucket(name, caller) < route.share:
            return route.candidate
        return route.stable

    def canary(self, name: str, candidate: str, share: float) -> Route:
        with self.lock:
            route = self.table.get(name) or Route(name, name)
            self.table[name] = route = replace(route, candidate=candidate, share=share)
        return route

    def promote(self, name: str) -> Route:
        with self.lock:
            route = self.table.get(name)
            if route is None or route.candidate is None:
                raise APIError(
                    409, f"'{name}' has no candidate to promote (start a canary first)", param="name"
                )
            self.table[name] = route = Route(
                name, route.candidate, None, 0.0, (*route.previous, route.stable)
            )
        return route

    def rollback(self, name: str, loaded=lambda model: True) -> Route:
        """Drop the candidate if one is on canary, else restore the stable before the current one
        (refused when that adapter is no longer loaded: its callers would get 404s)."""
        with self.lock:
            route = self.table.get(name)
            if route is not None and route.candidate is not None:
                route = replace(route, candidate=None, share=0.0)
            elif route is not None and route.previous:
                route = Route(name, route.previous[-1], None, 0.0, route.previous[:-1])
                if not loaded(route.stable):
                    raise APIError(
                        409,
                        f"cannot roll '{name}' back to {route.stable}: it is no longer loaded",
                        param="name",
                    )
            else:
                raise APIError(409, f"'{name}' has nothing to roll back to", param="name")
            self.table[name] = route
        return route

    def describe(self, name: str) -> dict:
        route = self.table.get(name) or Route(name, name)
        return {**asdict(route), "previous": list(route.previous)}


class CanaryBody(Strict):
    name: str = Field(min_length=1, max_length=128)
    candidate: str = Field(min_length=1, max_length=128)
    share: float = Field(ge=0.0, le=1.0)


class NameBody(Strict):
    name: str = Field(min_length=1, max_length=128)


def state_file(cfg) -> Path | None:
    """routes.json in serve.state_dir, else beside the audit log; None when neither is set."""
    folder = cfg.state_dir or (str(Path(cfg.audit.path).parent) if cfg.audit.path else None)
    return Path(folder) / STATE_FILE if folder else None


def adapter_folders(engine) -> dict[str, str]:
    return {n: a.path for n, a in getattr(engine, "adapters", {}).items() if getattr(a, "path", None)}


def restore(server) -> None:
    """After the engine has loaded: the saved table, its adapters hot-loaded again."""
    engine = server.engine
    server.routes.restore(engine.model_names(), lambda name, path: engine.load_adapter(name, path))


def register(app, server) -> None:
    """The routing table on `server.routes` and its admin endpoints."""
    routes = server.routes = Routes(state_file(server.cfg))

    def saved(route: Route) -> dict:
        routes.save(adapter_folders(server.engine))
        return routes.describe(route.name)

    def admin(request: Request) -> None:
        if not caller_of(request.scope).admin:
            raise APIError(
                403, "Changing routes takes an admin key (`name:key:admin`)", type="permission_error"
            )
        server.check_ready()

    def loaded(name: str, param: str) -> None:
        if name not in server.engine.model_names():
            raise APIError(404, f"The model `{name}` is not loaded", param=param, code="model_not_found")

    @app.get("/v1/routes")
    async def list_routes(request: Request):
        admin(request)
        return {"object": "list", "data": [routes.describe(n) for n in sorted(routes.table)]}

    @app.post("/v1/routes")
    async def start_canary(body: CanaryBody, request: Request):
        admin(request)
        loaded(body.candidate, "candidate")
        current = routes.table.get(body.name)
        loaded(current.stable if current else body.name, "name")
        return saved(routes.canary(body.name, body.candidate, body.share))

    @app.post("/v1/routes/promote")
    async def promote(body: NameBody, request: Request):
        admin(request)
        return saved(routes.promote(body.name))

    @app.post("/v1/routes/rollback")
    async def rollback(body: NameBody, request: Request):
        admin(request)
        loaded_now = server.engine.model_names()
        return saved(routes.rollback(body.name, lambda m: m in loaded_now))
