"""The `llamaforge` command. Each subcommand lives in `llamaforge/commands/<name>.py` and exposes
`register(subparsers)`; heavy imports happen inside the command, so `--help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import sys

from llamaforge.errors import LlamaforgeError

# Order is the order shown in `llamaforge --help`.
COMMANDS = ["prepare", "train", "eval", "chat", "generate", "merge", "export", "serve", "plan", "sweep",
            "config", "models", "studio"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamaforge",
        description="Fine-tune, evaluate, export and serve Llama-family models from one job file.",
        epilog="Example: llamaforge train examples/quickstart.yaml train.lr=1e-4",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"llamaforge.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"llamaforge.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `train job.yaml --dry-run key=value`: overrides may also come after options
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LlamaforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
