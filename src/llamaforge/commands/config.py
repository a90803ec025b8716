"""`llamaforge config show`: the fully resolved job config, every default visible."""

from __future__ import annotations

from llamaforge.commands._common import add_job_arguments, formatter, split_job_and_overrides

EPILOG = """examples:
  llamaforge config show examples/quickstart.yaml
  llamaforge config show examples/quickstart.yaml method.rank=8
  llamaforge config show            # the built-in defaults
"""


def register(sub) -> None:
    p = sub.add_parser(
        "config",
        help="show the resolved job config",
        epilog=EPILOG,
        formatter_class=formatter(),
        description="Print the job config with every default filled in (after overrides).",
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    show = verbs.add_parser(
        "show", help="print the resolved config as YAML", epilog=EPILOG, formatter_class=formatter()
    )
    add_job_arguments(show)
    show.set_defaults(func=run)


def run(args) -> int:
    from llamaforge.config import load_config, to_yaml

    job, overrides = split_job_and_overrides(args)
    print(to_yaml(load_config(job, overrides)), end="")
    return 0
