"""Prometheus metrics of one server (its own registry, so several apps can share a process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = tuple(2 ** k for k in range(4, 18))


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pplfast_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("pplfast_request_seconds", "time from request to answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pplfast_prompt_tokens", "tokens received in requests",
                                     ["model"], registry=r)
        self.scored_tokens = Counter("pplfast_scored_tokens", "positions read from the model",
                                     ["model"], registry=r)
        self.queue_depth = Gauge("pplfast_queue_depth", "requests waiting for a scoring worker",
                                 ["model"], registry=r)
        self.batch_tokens = Histogram("pplfast_batch_tokens", "tokens per forward pass, "
                                      "padding included", ["model"], buckets=TOKEN_BUCKETS,
                                      registry=r)
        self.pass_seconds = Histogram("pplfast_pass_seconds", "time of one forward pass and "
                                      "its head", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.shared_tokens = Counter("pplfast_shared_prefix_tokens", "tokens not fed again "
                                     "because sequences shared a prefix row", ["model"],
                                     registry=r)
        self.cancelled = Counter("pplfast_cancelled_requests", "requests whose client left "
                                 "before the answer", ["model"], registry=r)
        self.failed_passes = Counter("pplfast_failed_passes", "forward passes that raised",
                                     ["model"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
