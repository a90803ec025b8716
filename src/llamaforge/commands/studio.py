"""`llamaforge studio`: the web UI over a workspace of runs (runs, live curves, new jobs, chat)."""

from __future__ import annotations

from llamaforge.commands._common import formatter, setup_logging

EPILOG = """examples:
  llamaforge studio                                    # the current folder, on http://127.0.0.1:7860
  llamaforge studio --workspace ~/tuning --port 8080
  LLAMAFORGE_API_KEYS=me:sk-0123456789 llamaforge studio --host 0.0.0.0   # other addresses need API keys
"""


def register(sub) -> None:
    p = sub.add_parser(
        "studio",
        help="web UI: runs, live curves, job form and launch, data review, eval and grading, serve, chat",
        epilog=EPILOG,
        formatter_class=formatter(),
        description="Serve the studio: the workspace's runs with live loss curves, data cards and "
        "rejects; a new-job form generated from the job schema that launches `llamaforge train`; "
        "prepare reports and expert review; eval results with blind A/B grading; sweeps; run actions "
        "(evaluate, serve, export, stop, resume); a chat playground with two models side by side "
        "(base models, runs' adapters, a served run) through the serving code.",
    )
    p.add_argument("--workspace", default=".", help="folder holding the runs, jobs and data (default: .)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="listen address (default 127.0.0.1; any other needs the server's API keys)",
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-keys-file", help="file with one API key (or name:key) per line, as for `serve`")
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from llamaforge.studio.app import create_app

    setup_logging()
    app = create_app(args.workspace, host=args.host, api_keys_file=args.api_keys_file)
    print(f"llamaforge studio on http://{args.host}:{args.port}  (workspace {args.workspace})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
