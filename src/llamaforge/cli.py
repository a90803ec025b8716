"""The `llamaforge` command. Each subcommand lives in `llamaforge/commands/<name>.py` and exposes
`register(subparsers)`; heavy imports happen inside the command, so `--help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import sys

from llamaforge.errors import LlamaforgeError

# Order is the order shown in `llamaforge --help`.
COMMANDS = [
    "prepare",
    "train",
    "eval",
    "chat",
    "generate",
    "merge",
    "export",
    "serve",
    "promote",
    "plan",
    "sweep",
    "config",
    "models",
    "studio",
]
COMPUTE_COMMANDS = {"train", "eval", "chat", "generate", "merge", "export", "serve", "plan", "studio"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamaforge",
        description="Fine-tune, evaluate, export and serve Llama-family models from one job file.",
        epilog="Example: llamaforge train examples/quickstart.yaml train.lr=1e-4",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"llamaforge.commands.{name}").register(sub)
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
    # only a process started as the command itself may be replaced (train's allocator re-exec)
    args.from_command_line = argv is None
    try:
        if args.command in COMPUTE_COMMANDS:  # torch's threads = the cores this process may use
            from llamaforge.hardware import configure_threads

            configure_threads()
        return int(args.func(args) or 0)
    except LlamaforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
