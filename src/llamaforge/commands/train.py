"""`llamaforge train`: fine-tune a model as a job file describes."""

from __future__ import annotations

from pathlib import Path

from llamaforge.commands._common import add_job_arguments, formatter, setup_logging, split_job_and_overrides

EPILOG = """examples:
  llamaforge train examples/quickstart.yaml
  llamaforge train examples/quickstart.yaml train.lr=1e-4 method.rank=8 output.name=try2
  llamaforge train runs/try2/config.yaml --resume runs/try2      # continue after Ctrl-C
"""


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune (full, LoRA, QLoRA, DoRA, prefix)",
        epilog=EPILOG,
        formatter_class=formatter(),
        description="Fine-tune a model as the job file describes; "
        "writes a run directory with the adapter, metrics, loss plot and data card.",
    )
    add_job_arguments(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="RUN_DIR",
        help="continue from the latest checkpoint of RUN_DIR (default: output.dir/output.name)",
    )
    p.add_argument("--dry-run", action="store_true", help="validate the config and stop")
    p.set_defaults(func=run)


def run(args) -> int:
    from llamaforge.config import load_config, to_yaml
    from llamaforge.errors import ConfigError

    setup_logging()
    job, overrides = split_job_and_overrides(args)
    cfg = load_config(job, overrides)
    if args.dry_run:
        check_sources(cfg)
        print(to_yaml(cfg))
        print(dry_run_report(cfg))
        return 0
    from llamaforge.hardware import preload_allocator

    print(
        preload_allocator(cfg.train.allocator, may_reexec=getattr(args, "from_command_line", False)),
        flush=True,
    )
    from llamaforge.train.recipe import run_training

    run_dir = None
    if args.resume is not None:
        if args.resume:
            run_dir = Path(args.resume)
        elif cfg.output.name:
            run_dir = Path(cfg.output.dir) / cfg.output.name
        else:
            raise ConfigError("--resume needs RUN_DIR or output.name")
    run_dir, summary = run_training(cfg, run_dir=run_dir, resume=args.resume is not None)
    print_summary(run_dir, summary)
    return 0


def check_sources(cfg) -> None:
    """Every data file the run would read exists and is a readable regular data file (or a catalog dataset)."""
    from llamaforge import catalog
    from llamaforge.data.readers import check_file
    from llamaforge.errors import DataError

    for key in ("sources", "val_sources"):
        for i, src in enumerate(getattr(cfg.data, key)):
            entry = catalog.CATALOG.get(src.path)
            if entry is not None and entry.kind == "dataset":
                continue
            try:
                check_file(Path(src.path).expanduser())
            except DataError as exc:
                raise DataError(f"data.{key}[{i}]: {exc.reason}", path=exc.path) from None


def dry_run_report(cfg) -> str:
    """Parameter counts from the model's config on the meta device: no weights are loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llamaforge.models import local_path
    from llamaforge.train.adapters import attach_method, count_parameters

    config = AutoConfig.from_pretrained(
        local_path(cfg.model.source), trust_remote_code=cfg.model.trust_remote_code
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        model = attach_method(model, cfg.method)
    trainable, total = count_parameters(model)
    lines = [
        f"# {cfg.method.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    ]
    try:
        from llamaforge.planning.dry_run import memory_lines

        lines += memory_lines(cfg, config)
    except ImportError:
        pass
    return "\n".join(lines)


def print_summary(run_dir: Path, summary: dict) -> None:
    before, after = summary.get("before", {}), summary.get("after", {})
    print(
        f"\nrun: {run_dir}  ({summary['steps']} steps in {summary['train_seconds']} s, "
        f"{summary['tokens_per_s']} tokens/s, {summary['target_tokens_per_s']} target tokens/s)"
    )
    if "eval_loss" in before and "eval_loss" in after:
        print(
            f"eval loss: {before['eval_loss']:.4f} before -> {after['eval_loss']:.4f} after "
            f"(perplexity {before['eval_ppl']:.2f} -> {after['eval_ppl']:.2f})"
        )
    elif "eval_loss" in after:
        print(f"eval loss: {after['eval_loss']:.4f} (perplexity {after['eval_ppl']:.2f})")
    for prompt, answer in after.get("answers", {}).items():
        print(f"\n> {prompt}")
        if prompt in before.get("answers", {}):
            print(f"  before: {before['answers'][prompt]}")
        print(f"  after:  {answer}")
    print(f"\nsummary: {run_dir / 'summary.json'}")
