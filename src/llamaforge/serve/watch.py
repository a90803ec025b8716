"""The watched canary of `llamaforge promote --watch`: read the server's counters for the candidate and
the served adapter while the canary runs, then promote fully or roll back.

The numbers are what the gateway already counts on `/metrics` (Prometheus text): finished requests by
model and finish reason (`request_success`, reason `error` for a failed generation) and ratings by
model (`feedback_ratings`, from /v1/feedback). Deltas from the start of the window are compared, so
what the served adapter did before the canary does not count. A candidate whose error rate passes
the limit is rolled back at once; at the end of the window it is promoted only with enough ratings,
a share of "up" at least the limit and not below the served adapter's (when that one has enough
ratings too). Each poll and the decision are appended to the run's promote.jsonl with their numbers.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llamaforge.data.feedback import rating_label
from llamaforge.schema import FeedbackOptions
from llamaforge.serve.promotion import PromotionError, ServerClient, log_step

RATING_RULE = FeedbackOptions()  # up/down, and 1-5 ratings by the data's default good_from / bad_to


def rating_kind(rating: str | None) -> bool | None:
    """A /metrics `rating` label as good (True), bad (False) or neutral (None)."""
    if rating in ("up", "down"):
        return rating_label(rating, RATING_RULE)
    return rating_label(int(rating), RATING_RULE) if rating and rating.isdigit() else None


@dataclass
class WatchRule:
    seconds: float
    max_error_rate: float = 0.05
    min_up_share: float = 0.5
    min_ratings: int = 5
    poll: float = 5.0


@dataclass
class Counts:
    requests: float = 0.0
    errors: float = 0.0
    up: float = 0.0
    down: float = 0.0

    def minus(self, other: Counts) -> Counts:
        return Counts(*(a - b for a, b in zip(asdict(self).values(), asdict(other).values(), strict=True)))

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def ratings(self) -> int:
        return int(self.up + self.down)

    @property
    def up_share(self) -> float | None:
        return self.up / self.ratings if self.ratings else None

    def report(self) -> dict:
        return {**asdict(self), "error_rate": round(self.error_rate, 4), "up_share": self.up_share}


def counters(client: ServerClient) -> dict[str, Counts]:
    """Per model: finished requests, failed ones, and up/down ratings, from /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = client.http.get("/metrics")
        r.raise_for_status()
    except httpx.HTTPError as exc:
        raise PromotionError(f"GET {client.url}/metrics: {type(exc).__name__}: {exc}") from None
    out: dict[str, Counts] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            model = s.labels.get("model_name")
            if model is None or not s.name.endswith("_total"):
                continue
            c = out.setdefault(model, Counts())
            if family.name.endswith("request_success"):
                c.requests += s.value
                c.errors += s.value if s.labels.get("finished_reason") == "error" else 0.0
            elif family.name.endswith("feedback_ratings"):
                kind = rating_kind(s.labels.get("rating"))
                c.up += s.value if kind is True else 0.0
                c.down += s.value if kind is False else 0.0
    return out


def verdict(rule: WatchRule, candidate: Counts, served: Counts, final: bool) -> tuple[str, str] | None:
    """("promote" | "rollback", why), or None to keep watching."""
    if candidate.requests and candidate.error_rate > rule.max_error_rate:
        return "rollback", (
            f"error rate {candidate.error_rate:.1%} over --max-error-rate {rule.max_error_rate:.1%} "
            f"({candidate.errors:g} of {candidate.requests:g} requests)"
        )
    if not final:
        return None
    if candidate.ratings < rule.min_ratings:
        return (
            "rollback",
            f"{candidate.ratings} ratings in the window, fewer than --min-ratings {rule.min_ratings}",
        )
    if candidate.ratings and candidate.up_share < rule.min_up_share:
        return "rollback", f"up share {candidate.up_share:.1%} under --min-up-share {rule.min_up_share:.1%}"
    if (
        candidate.ratings
        and served.ratings >= max(rule.min_ratings, 1)
        and candidate.up_share < served.up_share
    ):
        return (
            "rollback",
            f"up share {candidate.up_share:.1%} under the served adapter's {served.up_share:.1%}",
        )
    return "promote", (
        f"up share {candidate.up_share or 0:.1%} of {candidate.ratings} ratings, "
        f"error rate {candidate.error_rate:.1%}"
    )


def watch(client: ServerClient, run_dir: Path, name: str, rule: WatchRule) -> dict:
    """Watch NAME's canary for rule.seconds (or until it breaks the error limit), then finish it."""
    route = client.route(name)
    served, candidate = route["stable"], route["candidate"]
    if candidate is None:
        raise PromotionError(f"'{name}' has no canary to watch")
    start, t0 = counters(client), time.monotonic()
    log_step(run_dir, "watch", candidate=candidate, served=served, **asdict(rule))
    while True:
        final = time.monotonic() - t0 >= rule.seconds
        now = counters(client)
        got = now.get(candidate, Counts()).minus(start.get(candidate, Counts()))
        base = now.get(served, Counts()).minus(start.get(served, Counts()))
        decided = verdict(rule, got, base, final)
        numbers = {"candidate": got.report(), "served": base.report()}
        if decided is None:
            log_step(run_dir, "watch_poll", seconds=round(time.monotonic() - t0, 1), **numbers)
            time.sleep(min(rule.poll, max(0.0, rule.seconds - (time.monotonic() - t0))))
            continue
        action, why = decided
        after = client.call(
            "POST", "/v1/routes/promote" if action == "promote" else "/v1/routes/rollback", {"name": name}
        )
        step = "promote" if action == "promote" else "rollback"
        log_step(run_dir, step, reason=why, watched=round(time.monotonic() - t0, 1), after=after, **numbers)
        return {"status": "promoted" if action == "promote" else "rolled_back", "reason": why, **numbers}
