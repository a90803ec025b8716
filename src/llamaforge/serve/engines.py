"""The serving engines `llamaforge serve --engine NAME` can start (registry.ENGINES).

Each is the same gateway (keys, limits, hot-swapped adapters, audit, moderation, metrics; app.py)
in front of a different decoder: `transformers` in process (any transformers folder, DoRA, prefix
tuning), `llamacpp` llama.cpp's llama-server as a child process (CPU), `vllm` vLLM's server as a
child process (GPU). `auto` picks the fastest one present for the run (`choose`).

`serve(cfg, exporters=...)`: the llama.cpp engine converts to GGUF with the exporters passed in by
the command (the serve layer does not import export/).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from llamaforge.errors import ConfigError
from llamaforge.registry import ENGINES, Engine
from llamaforge.serve.config import ServeConfig

log = logging.getLogger(__name__)


def _run_app(cfg: ServeConfig, engine=None) -> int:
    import uvicorn

    from llamaforge.serve.app import create_app

    app = create_app(cfg, engine)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        if engine is not None:
            engine.shutdown()
    return 0


def serve_in_process(cfg: ServeConfig, **_) -> int:
    return _run_app(cfg)


def llamacpp_engine(cfg: ServeConfig, exporters: tuple | None):
    """The gateway engine on llama-server (not loaded yet)."""
    from llamaforge.serve.gateway_engine import RemoteEngine
    from llamaforge.serve.llamacpp import INSTALL_HINT, LlamaCppBackend, find_binary

    binary = find_binary()
    if binary is None:
        raise ConfigError(f"--engine llamacpp needs llama.cpp's llama-server: {INSTALL_HINT}")
    if exporters is None:
        raise ConfigError("the llama.cpp engine needs the GGUF exporters (llamaforge serve passes them)")
    return RemoteEngine(cfg, LlamaCppBackend(binary, exporters))


def serve_llamacpp(cfg: ServeConfig, exporters: tuple | None = None, **_) -> int:
    return _run_app(cfg, llamacpp_engine(cfg, exporters))


def serve_vllm(cfg: ServeConfig, **_) -> int:
    from llamaforge.serve.gateway_engine import RemoteEngine
    from llamaforge.serve.vllm import VllmBackend

    return _run_app(cfg, RemoteEngine(cfg, VllmBackend()))


def _llama_cpp_can_serve(cfg: ServeConfig) -> str | None:
    """Why llama.cpp cannot serve this model (None when it can): a Llama folder with LoRA adapters only."""
    from llamaforge.models import local_path
    from llamaforge.runs import Run, is_run_dir

    source, adapters = cfg.model, list(cfg.adapters.values())
    if is_run_dir(source):
        run = Run.open(source)
        if run.is_adapter:
            adapters.append(str(run.weights_dir))
            source = run.base_model
        else:
            source = str(run.weights_dir)
    folder = Path(local_path(source))
    config = folder / "config.json"
    if not config.is_file():
        return f"{source} is not a local transformers folder"
    arch = (json.loads(config.read_text()).get("architectures") or ["?"])[0]
    if arch != "LlamaForCausalLM":
        return f"its architecture is {arch} (the GGUF converter handles LlamaForCausalLM)"
    for path in adapters:
        adapter_cfg = Path(path) / "adapter_config.json"
        data = json.loads(adapter_cfg.read_text()) if adapter_cfg.is_file() else {}
        if data.get("peft_type", "LORA") != "LORA" or data.get("use_dora"):
            return f"{path} is not a plain LoRA adapter (DoRA, prefix tuning ... run in process)"
    return None


def choose(cfg: ServeConfig) -> tuple[str, str | None]:
    """(engine name, a hint for the log when a faster engine is missing) for `auto`."""
    import torch

    from llamaforge.serve.llamacpp import INSTALL_HINT, find_binary

    if torch.cuda.is_available():
        if importlib.util.find_spec("vllm") is not None:
            return "vllm", None
        return (
            "transformers",
            "a GPU is present: `pip install vllm` to serve through vLLM (several times the throughput)",
        )
    why_not = _llama_cpp_can_serve(cfg)
    if why_not:
        return "transformers", f"llama.cpp cannot serve this model ({why_not}); using the transformers engine"
    if find_binary() is not None:
        return "llamacpp", None
    return "transformers", (
        f"on CPU, llama.cpp decodes ~7x faster than the transformers engine (q8_0 GGUF): {INSTALL_HINT}"
    )


def serve_auto(cfg: ServeConfig, **kw) -> int:
    name, hint = choose(cfg)
    if hint:
        log.warning("hint: %s", hint)
    log.info("engine: %s", name)
    return ENGINES.get(name).serve(cfg, **kw)


ENGINES.register(
    Engine("auto", serve_auto, "vLLM on CUDA when installed, llama.cpp on CPU when built, else transformers")
)
ENGINES.register(
    Engine("transformers", serve_in_process, "in process (any transformers model, DoRA, prefix tuning)")
)
ENGINES.register(Engine("llamacpp", serve_llamacpp, "llama.cpp's llama-server as a child process (CPU)"))
ENGINES.register(Engine("vllm", serve_vllm, "vLLM's OpenAI server as a child process (GPU)"))
ENGINES.register(Engine("llamaforge", serve_in_process, "the transformers engine (former name)"))
