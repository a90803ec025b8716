"""The serving engines `llamaforge serve --engine NAME` can start (registry.ENGINES).

`llamaforge`: the in-process gateway (keys, limits, hot-swapped adapters, audit, metrics) on the
transformers engine. `vllm`: vLLM's OpenAI server started with the equivalent arguments (GPU).
"""

from __future__ import annotations

from llamaforge.registry import ENGINES, Engine
from llamaforge.serve.config import ServeConfig


def serve_in_process(cfg: ServeConfig) -> int:
    import uvicorn

    from llamaforge.serve.app import create_app

    app = create_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


def serve_vllm(cfg: ServeConfig) -> int:
    from llamaforge.serve.vllm import launch

    return launch(cfg)


ENGINES.register(Engine("llamaforge", serve_in_process, "the in-process gateway on the transformers engine"))
ENGINES.register(Engine("vllm", serve_vllm, "vLLM's OpenAI server with the equivalent arguments (GPU)"))
