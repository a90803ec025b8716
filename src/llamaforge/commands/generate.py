"""`llamaforge generate`: answers from a run or a model, for one prompt or a JSONL file of them."""

from __future__ import annotations

import json
import sys

from llamaforge.commands._common import formatter

EPILOG = """examples:
  llamaforge generate runs/quickstart --prompt "Who are you?"
  llamaforge generate smollm2-135m-instruct --prompt "Name three colours." --max-new-tokens 32
  llamaforge generate runs/quickstart --input prompts.jsonl --output answers.jsonl
    (each input line: {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]})
"""


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate answers from a run or model",
        epilog=EPILOG,
        formatter_class=formatter(),
        description="Batched generation with the run's own chat template and stop tokens.",
    )
    add_generation_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a user prompt (repeatable)")
    src.add_argument("--input", help="JSONL file of prompts")
    p.add_argument("--output", help="write JSONL here instead of stdout")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=run)


def add_generation_arguments(p) -> None:
    p.add_argument(
        "source", metavar="RUN_OR_MODEL", help="run directory, model folder, .gguf file or catalog name"
    )
    p.add_argument("--template", default="auto", help="for plain models: auto|model|llama3|chatml|alpaca|raw")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def read_prompts(path: str, system: str | None):
    from llamaforge.data.types import Message
    from llamaforge.errors import DataError

    conversations = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"not valid JSON: {exc.msg}", path=path, line=line_no) from None
            if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
                msgs = [Message("user", row["prompt"])]
            elif isinstance(row, dict) and isinstance(row.get("messages"), list):
                msgs = [Message(m["role"], m["content"]) for m in row["messages"]]
            else:
                raise DataError(
                    "expected a non-empty 'prompt' string or a 'messages' list",
                    path=path,
                    line=line_no,
                    field="prompt",
                )
            if system and msgs[0].role != "system":
                msgs.insert(0, Message("system", system))
            conversations.append(msgs)
    if not conversations:
        raise DataError("no prompts in file", path=path)
    return conversations


def run(args) -> int:
    from llamaforge.commands._common import setup_logging
    from llamaforge.data.types import Message
    from llamaforge.generation import generate
    from llamaforge.runs import load_for_inference

    setup_logging()
    if args.input:
        conversations = read_prompts(args.input, args.system)
    else:
        conversations = [
            ([Message("system", args.system)] if args.system else []) + [Message("user", p)]
            for p in args.prompt
        ]
    model, tokenizer, template = load_for_inference(args.source, template_name=args.template)
    answers = generate(
        model,
        tokenizer,
        template,
        conversations,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    lines = [
        json.dumps({"prompt": conv[-1].content, "output": text}, ensure_ascii=False) + "\n"
        for conv, text in zip(conversations, answers)
    ]
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.writelines(lines)
    else:
        sys.stdout.writelines(lines)
    return 0
