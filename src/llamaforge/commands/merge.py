"""`llamaforge merge`: adapter + base -> one full-precision safetensors model."""

from __future__ import annotations

from llamaforge.commands._common import formatter

EPILOG = """examples:
  llamaforge merge runs/quickstart --out merged/quickstart
  llamaforge merge runs/quickstart --out merged/qs-bf16 --dtype bfloat16 --overwrite
"""


def register(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a run's adapter into its base model",
        epilog=EPILOG,
        formatter_class=formatter(),
        description="Merge the LoRA/DoRA/QLoRA adapter of RUN into a full-precision copy of its "
        "base and save it (safetensors, tokenizer, chat template, stop tokens).",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from llamaforge.commands._common import setup_logging
    from llamaforge.export.merge import merge_run

    setup_logging()
    print(merge_run(args.run, args.out, dtype=args.dtype, overwrite=args.overwrite))
    return 0
