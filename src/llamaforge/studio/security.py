"""Who may use the studio: loopback only without keys, API keys (the server's) anywhere else.

An ASGI middleware in front of everything, gateway included:
- on a loopback address without keys, the Host header must name the loopback too, so a web page
  that rebinds its own domain to 127.0.0.1 cannot drive the studio (DNS rebinding);
- a state-changing request that carries an Origin must come from the studio's own origin (another
  site's form or script cannot launch jobs);
- with keys (serve.api_keys_file / LLAMAFORGE_API_KEYS, exactly as `llamaforge serve`), every request
  needs `Authorization: Bearer <key>` or the cookie set by the login page; the gateway's serve app
  gets the cookie's key as its Authorization header and checks it itself.
"""

from __future__ import annotations

from http.cookies import SimpleCookie
from urllib.parse import urlsplit

from llamaforge.serve.auth import Auth, is_loopback, load_keys

COOKIE = "llamaforge_studio_key"
OPEN_PATHS = ("/login", "/static/")
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}


def studio_auth(host: str, api_keys_file: str | None, api_keys_env: str = "LLAMAFORGE_API_KEYS") -> Auth:
    """The serve module's Auth: refuses a non-loopback host without keys (ConfigError)."""
    return Auth(load_keys(api_keys_file, api_keys_env), host)


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _hostname(host_header: str) -> str:
    return (urlsplit(f"//{host_header}").hostname or "").lower()


class StudioGuard:
    def __init__(self, app, auth: Auth, host: str):
        self.app, self.auth, self.loopback_only = app, auth, is_loopback(host) or host == "localhost"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        host = headers.get("host", "")
        if self.loopback_only and not self.auth.required and _hostname(host) not in LOOPBACK_NAMES:
            await _deny(
                scope, receive, send, 403, f"the studio listens on loopback only; Host {host!r} refused"
            )
            return
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and origin and urlsplit(origin).netloc != host:
            await _deny(scope, receive, send, 403, f"cross-origin request from {origin} refused")
            return
        path = scope["path"]
        if self.auth.required and not path.startswith(OPEN_PATHS):
            given = headers.get("authorization")
            if not given:
                cookie = SimpleCookie(headers.get("cookie", ""))
                if COOKIE in cookie:
                    given = f"Bearer {cookie[COOKIE].value}"
            if self.auth.identify(given) is None:
                if scope["method"] == "GET" and "text/html" in headers.get("accept", ""):
                    await _redirect(scope, receive, send, "/login")
                else:
                    await _deny(scope, receive, send, 401, "missing or invalid API key")
                return
            if "authorization" not in headers:  # the gateway's serve app reads the header
                scope = dict(scope)
                scope["headers"] = [*scope["headers"], (b"authorization", given.encode("latin-1"))]
        await self.app(scope, receive, send)


async def _deny(scope, receive, send, status: int, message: str) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse({"error": {"message": message, "type": "permission_error"}}, status)(
        scope, receive, send
    )


async def _redirect(scope, receive, send, to: str) -> None:
    from starlette.responses import RedirectResponse

    await RedirectResponse(to, 303)(scope, receive, send)
