"""`llamaforge chat`: talk to a run or a model in the terminal."""

from __future__ import annotations

import sys

from llamaforge.commands._common import formatter
from llamaforge.commands.generate import add_generation_arguments

EPILOG = """examples:
  llamaforge chat runs/quickstart
  llamaforge chat smollm2-135m-instruct --system "Answer briefly."
  echo "Who are you?" | llamaforge chat runs/quickstart      # one answer per input line
Type /reset to start over, /exit (or Ctrl-D) to leave.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="interactive chat with a run or model",
        epilog=EPILOG,
        formatter_class=formatter(),
        description="Multi-turn chat using the run's own chat template and stop tokens.",
    )
    add_generation_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from llamaforge.commands._common import setup_logging
    from llamaforge.data.types import Message
    from llamaforge.generation import generate
    from llamaforge.runs import load_for_inference

    setup_logging()
    model, tokenizer, template = load_for_inference(args.source, template_name=args.template)
    interactive = sys.stdin.isatty()
    history: list[Message] = [Message("system", args.system)] if args.system else []
    if interactive:
        print(f"chatting with {args.source} (template {template.name}); /reset, /exit")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append(Message("user", text))
        reply = generate(
            model,
            tokenizer,
            template,
            [history],
            max_new_tokens=args.max_new_tokens,
            batch_size=1,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )[0]
        history.append(Message("assistant", reply))
        print(f"assistant> {reply}" if interactive else reply, flush=True)
    return 0
