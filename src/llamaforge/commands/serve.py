"""`llamaforge serve`: an OpenAI-compatible server for a base model and its LoRA adapters."""

from __future__ import annotations

import inspect
from pathlib import Path

from llamaforge.commands._common import formatter, setup_logging
from llamaforge.registry import ENGINES

EPILOG = """examples:
  llamaforge serve runs/try2                                  # the run's base + its adapter, on 127.0.0.1:8000
  llamaforge serve smollm2-135m-instruct --lora support=runs/support/adapter --lora legal=runs/legal/adapter
  LLAMAFORGE_API_KEYS=team-a:sk-0123456789 llamaforge serve runs/try2 --host 0.0.0.0
  LLAMAFORGE_API_KEYS=ops:sk-admin-98765:admin,team-a:sk-0123456789 llamaforge serve runs/try2 --host 0.0.0.0
                                                              # only `:admin` keys may load/unload adapters
  llamaforge serve runs/try2 --engine llamacpp                # llama.cpp's llama-server behind the gateway
  llamaforge serve runs/try2 --print-vllm-command             # the equivalent `vllm serve` command line
  llamaforge serve --config job.yaml serve.audit.path=logs/audit.jsonl serve.moderation.blocklist=[foo]

then: curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "try2", "messages": [{"role": "user", "content": "Hi"}]}'
"""


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server with hot-swappable adapters and /metrics",
        epilog=EPILOG,
        formatter_class=formatter(),
        description="Serve a run or a model over an OpenAI-compatible HTTP API: chat and text "
        "completions (streamed or not), adapters loaded and unloaded at runtime, dynamic "
        "batching, API keys, Prometheus metrics, audit log and moderation.",
    )
    p.add_argument("model", nargs="?", help="run directory or model source (default: serve.model)")
    p.add_argument("overrides", nargs="*", metavar="serve.key=value", help="override any serve setting")
    p.add_argument("--config", help="job YAML whose `serve:` section is used")
    p.add_argument(
        "--lora", action="append", default=[], metavar="NAME=PATH", help="an adapter to load at start"
    )
    p.add_argument("--host", help="listen address (default 127.0.0.1; other addresses need API keys)")
    p.add_argument("--port", type=int)
    p.add_argument("--api-keys-file", help="file with one API key (or name:key) per line")
    p.add_argument(
        "--engine",
        choices=ENGINES.names(),
        help="what decodes behind the gateway (default serve.engine, auto): llamacpp (CPU, `make serve-cpu`), "
        "vllm (GPU), transformers (in process); auto picks the fastest one present",
    )
    p.add_argument(
        "--print-vllm-command", action="store_true", help="print the `vllm serve` command and exit"
    )
    p.set_defaults(func=run)


def build_config(args):
    from llamaforge.config import apply_overrides, load_yaml
    from llamaforge.errors import ConfigError
    from llamaforge.serve.config import ServeConfig

    data = dict(load_yaml(args.config).get("serve") or {}) if args.config else {}
    overrides, model, given = [], args.model, list(args.overrides)
    if model and "=" in model and not Path(model).exists():  # `serve serve.port=9000`: no model given
        given, model = [model, *given], None
    for text in given:
        if "=" not in text:
            raise ConfigError(f"'{text}' is not a serve.key=value override")
        overrides.append(text[len("serve.") :] if text.startswith("serve.") else text)
    data = apply_overrides(data, overrides)
    if model:
        data["model"] = model
    for item in args.lora:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--lora {item}: expected NAME=PATH")
        data.setdefault("adapters", {})[name] = path
    for key in ("host", "port", "api_keys_file", "engine"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if data.get("engine") == "llamaforge":  # the transformers engine's former name
        data["engine"] = "transformers"
    from pydantic import ValidationError

    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        import difflib

        lines = ["invalid serve config:"]
        for err in exc.errors():
            dotted = "serve." + ".".join(str(p) for p in err["loc"])
            hint = ""
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(str(err["loc"][-1]), list(ServeConfig.model_fields), n=1)
                hint = f" (did you mean serve.{close[0]}?)" if close and len(err["loc"]) == 1 else ""
            lines.append(f"  {dotted}: {err['msg']}{hint}")
        raise ConfigError("\n".join(lines)) from None


def run(args) -> int:
    setup_logging()
    cfg = build_config(args)
    from llamaforge.runs import Run, is_run_dir

    if cfg.model and is_run_dir(cfg.model):
        Run.open(cfg.model)  # an unfinished run is refused, saying why
    if args.print_vllm_command:
        from llamaforge.serve.vllm import command_line

        print(command_line(cfg))
        return 0
    from llamaforge.export.gguf import export_gguf
    from llamaforge.export.gguf_lora import export_lora_gguf

    exporters = (export_gguf, lambda adapter, base, out: export_lora_gguf(adapter, base, out, dtype="f32"))
    serve = ENGINES.get(cfg.engine, field="serve.engine").serve
    params = inspect.signature(serve).parameters.values()
    if any(p.name == "exporters" or p.kind is p.VAR_KEYWORD for p in params):
        return serve(cfg, exporters=exporters)
    return serve(cfg)  # an engine registered elsewhere: serve(cfg), as docs/extending.md shows
