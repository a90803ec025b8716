"""`llamaforge promote`: gate a run's adapter against the one a server serves, then canary or promote it."""

from __future__ import annotations

import os
import sys

from llamaforge.commands._common import formatter

EPILOG = """examples:
  llamaforge promote runs/kto --server http://127.0.0.1:8000 --as support \\
      --gate "candidate.rougeL < served.rougeL" --canary 0.1
  llamaforge promote --full --server http://127.0.0.1:8000 --as support runs/kto
  llamaforge promote --rollback --server http://127.0.0.1:8000 --as support
  llamaforge promote runs/kto --server http://127.0.0.1:8000 --as support \
      --gate "candidate.rougeL < served.rougeL" --canary 0.2 --watch 600 --min-ratings 20

The gate is a --fail-if rule over the candidates `served` and `candidate`: when it holds, the new
adapter is unloaded and nothing users see changes. The admin key is read from the environment
variable named by --api-key-env. Every step is appended to RUN/promote.jsonl.

--watch SECONDS keeps the canary under watch: the server's counters for the candidate and the served
adapter (failed generations, up/down ratings on /v1/feedback) are read every --poll seconds; a
candidate over --max-error-rate is rolled back at once, and at the end of the window it is promoted
with at least --min-ratings ratings, an up share of at least --min-up-share and not below the served
adapter's, else rolled back. Each reading and the decision go to promote.jsonl.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "promote",
        help="gate a run's adapter against the served one, then canary, promote or roll back",
        epilog=EPILOG,
        formatter_class=formatter(),
        description="Evaluate RUN's adapter against the adapter a running server serves under NAME on the "
        "job's eval task (through the server), and if the gate holds hot-load it with a canary share, or "
        "finish a canary (--full) or undo the last change (--rollback).",
    )
    p.add_argument(
        "run", nargs="?", help="run directory (its log gets promote.jsonl; optional with --rollback)"
    )
    p.add_argument("--server", required=True, help="the server's URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--as", dest="name", required=True, help="the served name users ask for")
    p.add_argument("--gate", action="append", default=[], metavar="RULE", help="a fail-if rule (repeatable)")
    p.add_argument("--canary", type=float, help="route this fraction of NAME's callers to the new adapter")
    p.add_argument(
        "--task", help="eval task file (default: the job's evaluation.task, else the run's val.jsonl)"
    )
    p.add_argument("--full", action="store_true", help="promote NAME's canary to all callers")
    p.add_argument(
        "--rollback", action="store_true", help="drop NAME's canary, or restore its previous adapter"
    )
    p.add_argument(
        "--api-key-env", default="LLAMAFORGE_API_KEY", help="environment variable with the admin key"
    )
    p.add_argument("--watch", type=float, metavar="SECONDS", help="watch the canary this long, then decide")
    p.add_argument("--max-error-rate", type=float, default=0.05, help="roll back above this (0-1)")
    p.add_argument("--min-up-share", type=float, default=0.5, help="share of up ratings to promote (0-1)")
    p.add_argument("--min-ratings", type=int, default=5, help="candidate ratings needed to promote")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between readings of the counters")
    p.set_defaults(func=run)


def watch_rule(args):
    """The --watch options, checked before anything is loaded."""
    from llamaforge.errors import ConfigError
    from llamaforge.serve.watch import WatchRule

    if args.watch is None:
        return None
    if args.canary is None or args.full or args.rollback:
        raise ConfigError("--watch watches a canary: use it with --canary SHARE")
    for flag, value in (("--max-error-rate", args.max_error_rate), ("--min-up-share", args.min_up_share)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{flag} must be in [0, 1], got {value}")
    if args.watch <= 0 or args.poll <= 0 or args.min_ratings < 0:
        raise ConfigError("--watch and --poll must be positive and --min-ratings not negative")
    return WatchRule(args.watch, args.max_error_rate, args.min_up_share, args.min_ratings, args.poll)


def run(args) -> int:
    from llamaforge.errors import ConfigError
    from llamaforge.serve.promotion import finish, promote

    key = os.environ.get(args.api_key_env) or None
    if args.full and args.rollback:
        raise ConfigError("--full and --rollback exclude each other")
    rule = watch_rule(args)
    if args.full or args.rollback:
        out = finish(args.server, args.name, rollback=args.rollback, api_key=key, run_dir=args.run)
        after = out["after"]
        print(
            f"{out['status']}: '{args.name}' is served by {after['stable']}"
            + (f", canary {after['candidate']} at {after['share']:.0%}" if after["candidate"] else "")
        )
        return 0
    if not args.run:
        raise ConfigError("promote needs RUN (or --full / --rollback)")
    if not args.gate:
        raise ConfigError('promote needs at least one --gate rule, e.g. "candidate.rougeL < served.rougeL"')
    if args.canary is not None and not 0 < args.canary <= 1:
        raise ConfigError(f"--canary must be in (0, 1], got {args.canary}")
    out = promote(
        args.run,
        server=args.server,
        name=args.name,
        gate=args.gate,
        canary=args.canary,
        api_key=key,
        task_file=args.task,
    )
    print(out["table"].to_text(out["rules"]))
    if out["status"] == "gate_failed":
        print(
            f"gate failed: '{args.name}' stays on {out['served']}; {out['candidate']} unloaded",
            file=sys.stderr,
        )
        return 1
    if out["status"] == "canary" and rule is not None:
        from llamaforge.serve.promotion import ServerClient
        from llamaforge.serve.watch import watch

        print(
            f"canary: {out['share']:.0%} of '{args.name}' callers get {out['candidate']}; watching {rule.seconds:g} s"
        )
        watched = watch(ServerClient(args.server, key), out["run_dir"], args.name, rule)
        print(f"{watched['status'].replace('_', ' ')}: {watched['reason']}")
        return 0 if watched["status"] == "promoted" else 1
    if out["status"] == "canary":
        print(
            f"canary: {out['share']:.0%} of '{args.name}' callers now get {out['candidate']} "
            f"(finish with --full, undo with --rollback)"
        )
    else:
        print(f"promoted: '{args.name}' is now served by {out['candidate']} (undo with --rollback)")
    return 0
