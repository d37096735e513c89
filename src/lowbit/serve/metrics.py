"""``/metrics`` in Prometheus' text format (prometheus_client): requests by route and status, prompt and completion
tokens, request latency and time to the first token (histograms), sequences waiting and running."""

from __future__ import annotations

__all__ = ["Metrics"]

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lowbit_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("lowbit_prompt_tokens", "prompt tokens read", registry=r)
        self.completion_tokens = Counter("lowbit_completion_tokens", "completion tokens generated", registry=r)
        self.latency = Histogram("lowbit_request_seconds", "time from a request to its last token", ["route"],
                                 buckets=BUCKETS, registry=r)
        self.first_token = Histogram("lowbit_time_to_first_token_seconds", "time from a request to its first token",
                                     buckets=BUCKETS, registry=r)
        Gauge("lowbit_queue_depth", "sequences waiting to be admitted", registry=r).set_function(
            lambda: len(engine.waiting))
        Gauge("lowbit_running_sequences", "sequences being decoded", registry=r).set_function(engine.running)
        Gauge("lowbit_decode_steps", "decode steps run", registry=r).set_function(lambda: engine.steps)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
