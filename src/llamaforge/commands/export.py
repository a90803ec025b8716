"""`llamaforge export`: a run -> merged safetensors, GGUF (+ LoRA GGUF, Modelfile) or quantized weights."""

from __future__ import annotations

from llamaforge.commands._common import formatter
from llamaforge.registry import EXPORTERS

EPILOG = """examples:
  llamaforge export runs/quickstart --format safetensors --dtype bf16 --shard-size 2GB --out exports/qs
  llamaforge export runs/quickstart --format gguf --dtype q8_0 --out exports/qs-gguf
  llamaforge export runs/quickstart --format quantized --bits 4 --out exports/qs-nf4
  ollama create forge -f exports/qs-gguf/Modelfile     # then: ollama run forge

Every export writes manifest.json (source run, dataset sha256, base model, method, dtype, files with
sha256). Nothing is left at --out unless the export completes; an existing --out needs --overwrite.
"""

DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a run: merged safetensors, GGUF for llama.cpp/Ollama, or quantized",
        epilog=EPILOG,
        formatter_class=formatter(),
        description="Merge RUN's adapter into its full-precision base and write it as sharded "
        "safetensors, as a GGUF file (plus the adapter as a llama.cpp LoRA GGUF and an Ollama "
        "Modelfile), or quantized with bitsandbytes (with a merged-vs-quantized quality table).",
    )
    p.add_argument("run", help="run directory (with run.json)")
    p.add_argument("--format", required=True, choices=EXPORTERS.names(), dest="export_format")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="safetensors: f32 (default) | f16 | bf16; gguf: f32 | f16 (default) | bf16 | q8_0 | q4_0 | q4_1",
    )
    p.add_argument(
        "--bits", type=int, choices=[8, 4], default=None, help="quantized: 8 (LLM.int8, default) or 4 (NF4)"
    )
    p.add_argument("--shard-size", default="2GB", help="safetensors: largest shard (default 2GB)")
    p.add_argument("--out", required=True, help="export folder (created; must not exist unless --overwrite)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out (only once the export succeeded)"
    )
    q = p.add_argument_group("quantized: merged vs quantized comparison")
    q.add_argument(
        "--eval-data",
        default=None,
        help="held-out records to compare on (default: the run's validation split)",
    )
    q.add_argument("--eval-samples", type=int, default=32, help="examples compared (default 32)")
    q.add_argument("--eval-max-new-tokens", type=int, default=64, help="generation length for the eval table")
    q.add_argument("--no-generate", action="store_true", help="loss/perplexity only, no generation metrics")
    q.add_argument("--no-eval", action="store_true", help="skip the comparison")
    p.set_defaults(func=run)


def run(args) -> int:
    import time
    from pathlib import Path

    from llamaforge.atomic import MARKER
    from llamaforge.commands._common import setup_logging
    from llamaforge.export.cli_export import export_run
    from llamaforge.export.manifest import human_bytes

    setup_logging()
    extra = {}
    if args.export_format == "quantized":
        extra = dict(
            eval_data=args.eval_data,
            eval_samples=args.eval_samples,
            evaluate=not args.no_eval,
            generate=not args.no_generate,
            max_new_tokens=args.eval_max_new_tokens,
        )
    started = time.perf_counter()
    out = export_run(
        args.run,
        args.out,
        export_format=args.export_format,
        dtype=args.dtype,
        bits=args.bits,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        **extra,
    )
    files = sorted(p for p in Path(out).rglob("*") if p.is_file() and p.name != MARKER)
    for f in files:
        print(f"  {f.relative_to(out)}  {human_bytes(f.stat().st_size)}")
    total = sum(f.stat().st_size for f in files)
    print(f"{out}: {len(files)} files, {human_bytes(total)}, {time.perf_counter() - started:.1f} s")
    quality = Path(out) / "quality.md"
    if quality.is_file():
        print(quality.read_text(encoding="utf-8"))
    return 0
