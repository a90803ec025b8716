"""Prometheus metrics under vLLM's names (so vLLM's dashboards and ours are interchangeable),
labelled by the served model name (the base or an adapter), plus process memory and refusals."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    def __init__(self, prefix: str = "vllm:", registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.engine_exposition: Callable[[], bytes] | None = None  # set by a gateway engine
        r, p, label = self.registry, prefix, ["model_name"]
        self.ttft = Histogram(
            f"{p}time_to_first_token_seconds", "Time to first token", label, registry=r, buckets=_LATENCY
        )
        self.itl = Histogram(
            f"{p}inter_token_latency_seconds",
            "Time between output tokens",
            label,
            registry=r,
            buckets=_TOKEN_LATENCY,
        )
        self.e2e = Histogram(
            f"{p}e2e_request_latency_seconds",
            "End-to-end request latency",
            label,
            registry=r,
            buckets=_LATENCY,
        )
        self.queue_time = Histogram(
            f"{p}request_queue_time_seconds",
            "Time waiting before the first forward",
            label,
            registry=r,
            buckets=_LATENCY,
        )
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prefill tokens processed", label, registry=r)
        self.generation_tokens = Counter(f"{p}generation_tokens", "Generated tokens", label, registry=r)
        self.success = Counter(
            f"{p}request_success",
            "Finished requests by finish reason",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.running = Gauge(f"{p}num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge(f"{p}num_requests_waiting", "Requests waiting in the queue", registry=r)
        self.rejected = Counter(
            f"{p}request_rejected", "Requests refused before generation", ["reason"], registry=r
        )  # queue_full, rate_limited, unauthorized, invalid
        self.moderation = Counter(
            f"{p}moderation_blocked",
            "Requests or answers blocked by moderation",
            ["model_name", "stage"],
            registry=r,
        )
        self.prefix_queries = Counter(
            f"{p}prefix_cache_queries", "Prefix cache queries, in prompt tokens looked up", label, registry=r
        )
        self.prefix_hits = Counter(
            f"{p}prefix_cache_hits", "Prefix cache hits, in prompt tokens reused", label, registry=r
        )
        self.feedback = Counter(
            f"{p}feedback_ratings", "Ratings received on /v1/feedback", ["model_name", "rating"], registry=r
        )  # rating: up, down, or 1-5
        self.adapters_loaded = Gauge(f"{p}lora_adapters_loaded", "LoRA adapters in memory", registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
        PlatformCollector(registry=r)

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def prefix_cache(self, model: str, queried: int, hit: int) -> None:
        """vLLM v1's pair: hits / queries is the fraction of prompt tokens whose prefill was skipped."""
        self.prefix_queries.labels(model).inc(queried)
        self.prefix_hits.labels(model).inc(hit)

    def finished(
        self, model: str, reason: str, prompt_tokens: int, completion_tokens: int, seconds: float
    ) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        self.success.labels(model, reason).inc()
        self.e2e.labels(model).observe(seconds)

    def exposition(self) -> bytes:
        """Ours, then the engine process's own metrics when one runs behind the gateway."""
        extra = self.engine_exposition() if self.engine_exposition else b""
        return generate_latest(self.registry) + extra
