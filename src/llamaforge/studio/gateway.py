"""Chat through the serving code path: one `llamaforge serve` app per base model, inside the studio.

The playground's requests go to /gateway/<id>/v1/chat/completions, which this module hands, as raw
ASGI, to the serve app (llamaforge.serve.app.create_app) for that base: same chat template and stop
tokens (the adapter's own template), same batching engine, same API keys, same streaming. A run's
adapter is loaded into its base's engine on first use (Engine.load_adapter); models load in a
background thread while the page polls the gateway's /health.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from llamaforge.errors import ConfigError
from llamaforge.studio import workspace as ws

log = logging.getLogger(__name__)


@dataclass
class Gateway:
    id: str
    base: str  # the model source as the engine loads it
    app: object  # the serve FastAPI app
    server: object  # its llamaforge.serve.app.Server

    @property
    def engine(self):
        return self.server.engine


def absolute_source(source: str, workspace: Path) -> str:
    """A relative model path in a run.json is relative to the workspace (jobs run there)."""
    candidate = workspace / source
    if not Path(source).is_absolute() and candidate.exists():
        return str(candidate.resolve())
    return source


class Gateways:
    def __init__(self, workspace: Path, *, host: str, api_keys_file: str | None):
        self.workspace, self.host, self.api_keys_file = workspace.resolve(), host, api_keys_file
        self.gateways: dict[str, Gateway] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Thread] = {}

    def _make(self, base: str) -> Gateway:
        from llamaforge.serve.app import create_app
        from llamaforge.serve.config import ServeConfig

        gid = hashlib.sha256(base.encode()).hexdigest()[:12]
        cfg = ServeConfig(
            model=base,
            adapter_dirs=[str(self.workspace)],
            host=self.host,
            api_keys_file=self.api_keys_file,
            dtype="float32",
            precision="fp32",
        )
        app = create_app(cfg, load=False)
        gateway = Gateway(gid, base, app, app.state.server)
        thread = threading.Thread(target=self._load, args=(gateway,), daemon=True, name=f"studio-load-{gid}")
        self._loading[gid] = thread
        thread.start()
        return gateway

    @staticmethod
    def _load(gateway: Gateway) -> None:
        try:
            gateway.engine.load()
        except Exception:  # noqa: BLE001 - the engine keeps load_error; the page shows it from /health
            log.exception("loading %s failed", gateway.base)

    def for_base(self, base: str) -> Gateway:
        with self._lock:
            found = next((g for g in self.gateways.values() if g.base == base), None)
            if found is None:
                found = self._make(base)
                self.gateways[found.id] = found
            return found

    def for_run(self, run_dir: Path) -> tuple[Gateway, str]:
        """The gateway serving this run and the model name of the run in it (an adapter, or the base
        for a fully fine-tuned run). The adapter is loaded when its base is ready."""
        info = ws.run_info(run_dir)
        if info.get("status") != "completed":
            raise ConfigError(
                f"run {run_dir.name} has not finished (status {info.get('status', 'unknown')}): "
                "its weights are not saved yet"
            )
        if info.get("weights") != "adapter":
            gateway = self.for_base(str(run_dir))  # serve loads a full run's own weights and template
            return gateway, gateway.engine.base_name
        gateway = self.for_base(absolute_source(str(info["base_model"]), self.workspace))
        name = ws.run_id(self.workspace, run_dir).replace("/", "--")
        adapter = run_dir / "adapter"
        threading.Thread(target=self._add_adapter, args=(gateway, name, adapter), daemon=True).start()
        return gateway, name

    def _add_adapter(self, gateway: Gateway, name: str, path: Path) -> None:
        thread = self._loading.get(gateway.id)
        if thread is not None:
            thread.join()
        engine = gateway.engine
        if not engine.ready or name in engine.adapters:
            return
        try:
            engine.load_adapter(name, str(path))
        except ConfigError as exc:
            if "already loaded" not in str(exc):
                log.error("adapter %s: %s", name, exc)
        except Exception:  # noqa: BLE001 - shown as "not loaded" on the page
            log.exception("adapter %s failed to load", name)

    def status(self, gateway: Gateway) -> dict:
        engine = gateway.engine
        return {
            "id": gateway.id,
            "base": gateway.base,
            "ready": engine.ready,
            "error": engine.load_error,
            "loaded": engine.model_names() if engine.ready else [],
        }

    def get(self, gid: str) -> Gateway | None:
        with self._lock:
            return self.gateways.get(gid)

    def shutdown(self) -> None:
        with self._lock:
            gateways = list(self.gateways.values())
        for g in gateways:
            if g.engine.ready:
                g.engine.shutdown()


class GatewayRouter:
    """ASGI: /gateway/<id>/<rest> -> the serve app of gateway <id>, with the path <rest>."""

    def __init__(self, gateways: Gateways):
        self.gateways = gateways

    async def __call__(self, scope, receive, send) -> None:
        path = scope["path"]
        parts = path.split("/", 3)  # "", "gateway", id, rest
        gateway = self.gateways.get(parts[2]) if len(parts) >= 3 else None
        if gateway is None:
            from starlette.responses import JSONResponse

            await JSONResponse(
                {
                    "error": {
                        "message": "no such model gateway: open the chat page again",
                        "type": "not_found_error",
                    }
                },
                404,
            )(scope, receive, send)
            return
        inner = dict(scope)
        inner["path"] = "/" + (parts[3] if len(parts) > 3 else "")
        inner["raw_path"] = inner["path"].encode()
        inner["root_path"] = ""
        await gateway.app(inner, receive, send)
