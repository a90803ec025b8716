"""Helpers shared by the command modules."""

from __future__ import annotations

import argparse
import logging

from llamaforge.quiet import silence_known_noise


def add_job_arguments(parser: argparse.ArgumentParser, *, job_required: bool = False) -> None:
    parser.add_argument(
        "job", nargs=None if job_required else "?", help="job YAML file (defaults if omitted)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override any config value")


def split_job_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """argparse cannot tell an omitted job from a first override; a token with '=' is an override."""
    job, overrides = args.job, list(args.overrides)
    if job and "=" in job and not job.endswith((".yaml", ".yml")):
        overrides.insert(0, job)
        job = None
    return job, overrides


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    silence_known_noise()


def formatter() -> type[argparse.HelpFormatter]:
    return argparse.RawDescriptionHelpFormatter
