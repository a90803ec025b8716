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
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import asdict, dataclass, field, replace

from fastapi import Request
from pydantic import Field

from llamaforge.serve.guard import caller_of
from llamaforge.serve.protocol import APIError, Strict


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
    def __init__(self) -> None:
        self.table: dict[str, Route] = {}
        self.lock = threading.Lock()

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


def register(app, server) -> None:
    """The routing table on `server.routes` and its admin endpoints."""
    routes = server.routes = Routes()

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
        return routes.describe(routes.canary(body.name, body.candidate, body.share).name)

    @app.post("/v1/routes/promote")
    async def promote(body: NameBody, request: Request):
        admin(request)
        return routes.describe(routes.promote(body.name).name)

    @app.post("/v1/routes/rollback")
    async def rollback(body: NameBody, request: Request):
        admin(request)
        loaded_now = server.engine.model_names()
        return routes.describe(routes.rollback(body.name, lambda m: m in loaded_now).name)
