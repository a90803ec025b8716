"""Hand over to vLLM: the `vllm serve` command equivalent to a llamaforge serve config.

The run's base model, its adapters (`--enable-lora --lora-modules name=path`, `--max-lora-rank` the
smallest vLLM accepts that fits the largest adapter rank) and its chat template (the one training
used, passed inline in vLLM's single-line form) map one to one; API keys go through VLLM_API_KEY,
never the command line.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

from llamaforge.errors import ConfigError
from llamaforge.serve.config import ServeConfig

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _resolve(cfg: ServeConfig) -> tuple[str, dict[str, str], Path | None]:
    """(base model path, adapters name->path, folder holding the template) from a run dir or a source."""
    from llamaforge.models import local_path
    from llamaforge.runs import Run, is_run_dir

    adapters = {name: str(Path(p).resolve()) for name, p in cfg.adapters.items()}
    source, template_dir = cfg.model, None
    if is_run_dir(source):
        run = Run.open(Path(source).resolve())
        if run.is_adapter:
            adapters.setdefault(run.dir.name, str(run.weights_dir))
            source = run.base_model
        else:
            source = str(run.weights_dir)
        template_dir = run.weights_dir
    elif adapters:
        template_dir = Path(next(iter(adapters.values())))
    return str(local_path(source)), adapters, template_dir


def max_lora_rank(adapter_paths: list[str]) -> int:
    ranks = []
    for path in adapter_paths:
        config = Path(path) / "adapter_config.json"
        if not config.is_file():
            raise ConfigError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
        data = json.loads(config.read_text())
        ranks.append(max([int(data.get("r", 8)), *map(int, (data.get("rank_pattern") or {}).values())]))
    need = max(ranks, default=8)
    fit = next((r for r in VLLM_LORA_RANKS if r >= need), None)
    if fit is None:
        raise ConfigError(
            f"adapter rank {need} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})"
        )
    return fit


def _template_text(template_dir: Path | None) -> str | None:
    if template_dir is None:
        return None
    saved = template_dir / "llamaforge_template.json"
    if saved.is_file():
        return json.loads(saved.read_text())["jinja"]
    return None


def vllm_args(cfg: ServeConfig) -> list[str]:
    base, adapters, template_dir = _resolve(cfg)
    args = [
        "vllm",
        "serve",
        base,
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        "--served-model-name",
        cfg.served_model_name or cfg.model,
        "--dtype",
        "bfloat16" if cfg.dtype == "bfloat16" else "auto",
    ]
    if cfg.max_model_len:
        args += ["--max-model-len", str(cfg.max_model_len)]
    args += ["--max-num-seqs", str(max(cfg.max_batch_size, 1))]
    if adapters:
        args += [
            "--enable-lora",
            "--max-loras",
            str(len(adapters)),
            "--max-lora-rank",
            str(max_lora_rank(list(adapters.values()))),
            "--lora-modules",
        ]
        args += [f"{name}={path}" for name, path in adapters.items()]
    jinja = _template_text(template_dir)
    if jinja:
        # vLLM reads a value that is not a file and holds "{", "}" or "\n" as a template, unescaping it.
        args += ["--chat-template", jinja.encode("unicode_escape").decode("ascii")]
    return args


def vllm_env(cfg: ServeConfig) -> dict[str, str]:
    """Extra environment: API keys (vLLM takes one; the first is used) and runtime LoRA updating."""
    from llamaforge.serve.auth import load_keys

    env = {}
    keys = list(load_keys(cfg.api_keys_file, cfg.api_keys_env))
    if keys:
        env["VLLM_API_KEY"] = keys[0]
    if cfg.allow_adapter_loading:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return env


def command_line(cfg: ServeConfig) -> str:
    env = vllm_env(cfg)
    shown = [f"{k}={'<key>' if k == 'VLLM_API_KEY' else v}" for k, v in env.items()]
    return " ".join(shown + [shlex.quote(a) for a in vllm_args(cfg)])


def launch(cfg: ServeConfig) -> int:
    """Replace this process with vLLM's server (GPU machines with vLLM installed)."""
    exe = shutil.which("vllm")
    if exe is None:
        raise ConfigError(
            "--engine vllm needs vLLM (`pip install vllm`, on a machine with a GPU); "
            "`llamaforge serve --print-vllm-command` prints the command to run there"
        )
    args = vllm_args(cfg)
    os.execve(exe, args, {**os.environ, **vllm_env(cfg)})
    return 0  # not reached


# ---------------------------------------------------------------------------------------------
# vLLM behind the gateway


def gateway_argv(cfg: ServeConfig, base: str, served_name: str, adapters: dict[str, str], max_rank: int):
    """argv(port, key) for `vllm serve` as the gateway's private engine: loopback, runtime LoRA loading
    (the gateway confines and checks each path first), the adapters of the run at start. The key goes
    through VLLM_API_KEY (gateway_env), never the command line."""

    def argv(port: int, key: str) -> list[str]:
        args = [
            "vllm",
            "serve",
            base,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            served_name,
            "--dtype",
            "bfloat16" if cfg.dtype == "bfloat16" else "auto",
            "--max-num-seqs",
            str(max(cfg.max_batch_size, 1)),
        ]
        if cfg.max_model_len:
            args += ["--max-model-len", str(cfg.max_model_len)]
        if adapters or (cfg.allow_adapter_loading and cfg.max_adapters):
            args += [
                "--enable-lora",
                "--max-loras",
                str(max(1, cfg.max_adapters)),
                "--max-lora-rank",
                str(max_rank),
            ]
        if adapters:
            args += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
        return args

    return argv


def gateway_rank(cfg: ServeConfig, adapter_paths: list[str]) -> int:
    """--max-lora-rank: the largest rank of the runs served at start (16 when none), rounded up to a rank
    vLLM accepts and capped by serve.max_lora_rank; adapters loaded later must fit it."""
    need = max_lora_rank(adapter_paths) if adapter_paths else 16
    if need > cfg.max_lora_rank:
        raise ConfigError(f"an adapter has rank {need}, over serve.max_lora_rank={cfg.max_lora_rank}")
    return need


def completions_body(req, model: str) -> dict:
    """vLLM's /v1/completions for a GenRequest: token ids in, text and token ids out; the template's
    stop tokens go as stop_token_ids, the stop strings are the gateway's."""
    return {
        "model": model,
        "prompt": list(req.prompt_ids),
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed if req.seed is not None else req.id,
        "stream": True,
        "stop_token_ids": sorted(req.stop_ids),
        "skip_special_tokens": True,
        "return_token_ids": True,
    }


class VllmBackend:
    name = "vLLM"
    max_rank = 16

    def start(self, engine):
        from llamaforge.catalog import home
        from llamaforge.serve.engine_process import EngineProcess

        exe = shutil.which("vllm")
        if exe is None:
            raise ConfigError("--engine vllm needs vLLM (`pip install vllm`, on a machine with a GPU)")
        paths = {name: a.path for name, a in engine.adapters.items()}
        self.max_rank = gateway_rank(engine.cfg, list(paths.values()))
        argv = gateway_argv(engine.cfg, str(engine.base_dir), engine.base_name, paths, self.max_rank)
        process = EngineProcess(
            "vllm",
            argv,
            env=lambda key: {"VLLM_API_KEY": key, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
            log_path=home() / "logs" / f"vllm-{os.getpid()}.log",
            start_timeout_s=engine.cfg.engine_start_timeout_s,
        )
        process.start()
        return process

    def request(self, engine, req) -> tuple[str, dict]:
        return "/v1/completions", completions_body(req, req.adapter or engine.base_name)

    def read(self, engine, req, chunk: dict) -> bool:
        choice = (chunk.get("choices") or [{}])[0]
        if engine.accept_text(req, choice.get("text") or "", list(choice.get("token_ids") or [])):
            return True
        if choice.get("finish_reason"):
            engine.finish(req, "length" if choice["finish_reason"] == "length" else "stop")
            return True
        return False

    def _post(self, engine, path: str, body: dict) -> None:
        import httpx

        process = engine.process
        resp = httpx.post(process.base_url + path, json=body, headers=process.headers, timeout=300)
        if resp.status_code != 200:
            raise ConfigError(f"vLLM refused {path} ({resp.status_code}): {resp.text[:400]}")

    def add_adapter(self, engine, adapter) -> None:
        if adapter.rank > self.max_rank:
            raise ConfigError(
                f"adapter '{adapter.name}' has rank {adapter.rank}, over the engine's --max-lora-rank "
                f"{self.max_rank} (the largest rank of the adapters served at start)"
            )
        self._post(engine, "/v1/load_lora_adapter", {"lora_name": adapter.name, "lora_path": adapter.path})

    def remove_adapter(self, engine, name: str) -> None:
        self._post(engine, "/v1/unload_lora_adapter", {"lora_name": name})

    def rename_metrics(self, text: str) -> str:
        """vLLM's own metrics carry the names the gateway uses: they are shown as vllm_engine:*."""
        return text.replace("vllm:", "vllm_engine:")
