"""The server's Prometheus metrics (GET /metrics), in a registry of its own per server.

    slmctl_requests_total{endpoint, status}          finished HTTP requests by status code
    slmctl_prompt_tokens_total                       encoder tokens of admitted requests
    slmctl_generation_tokens_total                   tokens generated
    slmctl_queue_depth, slmctl_active_sequences      waiting / decoding now
    slmctl_time_to_first_token_seconds               submit -> first token (queueing included)
    slmctl_time_per_output_token_seconds             between consecutive tokens of a request
    slmctl_request_finish_total{reason}              stop | length | cancelled | error
    slmctl_draft_tokens_total, slmctl_draft_accepted_total   drafted tokens checked, and kept (--draft)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no *_created series: a creation timestamp per counter is noise here

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("slmctl_requests", "Finished HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("slmctl_prompt_tokens", "Prompt (encoder) tokens of finished requests", registry=r)
        self.generation_tokens = Counter("slmctl_generation_tokens", "Generated tokens", registry=r)
        self.queue_depth = Gauge("slmctl_queue_depth", "Requests waiting for a slot", registry=r)
        self.active = Gauge("slmctl_active_sequences", "Sequences being decoded", registry=r)
        self.ttft = Histogram("slmctl_time_to_first_token_seconds", "Time from submission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("slmctl_time_per_output_token_seconds", "Time between consecutive tokens of a request",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.finishes = Counter("slmctl_request_finish", "Generations by how they ended", ["reason"], registry=r)
        self.drafted = Counter("slmctl_draft_tokens", "Drafted tokens checked by the model (--draft)", registry=r)
        self.accepted = Counter("slmctl_draft_accepted", "Drafted tokens the model kept (--draft)", registry=r)

    # called from the engine thread (prometheus_client is thread-safe)
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.tpot.observe(seconds)

    def drafts(self, drafted: int, accepted: int) -> None:
        self.drafted.inc(drafted)
        self.accepted.inc(accepted)

    def depth(self, waiting: int, active: int) -> None:
        self.queue_depth.set(waiting)
        self.active.set(active)

    def finished(self, request, reason: str) -> None:
        self.finishes.labels(reason).inc()
        self.prompt_tokens.inc(request.prompt_tokens)
        self.generation_tokens.inc(len(request.tokens))

    # called from the HTTP side
    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict:
        """Every sample as {name{labels}: value}: the run's metrics.json at exit."""
        out = {}
        for family in self.registry.collect():
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out
