"""Prometheus metrics of the ingress, labelled by model (base name or adapter name)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

# Latency buckets in seconds: CPU TTFTs run from ~10 ms to many seconds under load.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_RETRIEVAL = (0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)  # tens of ms matter here


class Metrics:
    """One registry per ingress replica (so tests can build several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ragtune_requests", "Requests by endpoint, model and HTTP status.",
                                ["endpoint", "model", "status"], registry=r)
        self.errors = Counter("ragtune_errors", "Error responses by endpoint and error type.",
                              ["endpoint", "type"], registry=r)
        self.inflight = Gauge("ragtune_inflight_requests", "Generation requests in flight (queue depth).", registry=r)
        self.ttft = Histogram("ragtune_time_to_first_token_seconds", "Time to first token.", ["model"],
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("ragtune_inter_token_latency_seconds", "Gap between streamed chunks.", ["model"],
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("ragtune_request_latency_seconds", "End-to-end request latency.", ["model"],
                             buckets=_LATENCY, registry=r)
        self.retrieval = Histogram("ragtune_rag_retrieval_seconds", "RAG retrieval inside a generation request "
                                   "(query embedding, search and the hop to the retriever), by search mode.",
                                   ["mode"], buckets=_RETRIEVAL, registry=r)
        self.prompt_tokens = Counter("ragtune_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.completion_tokens = Counter("ragtune_completion_tokens", "Tokens generated.", ["model"], registry=r)

    def render(self) -> bytes:
        """The exposition text for ``GET /metrics``."""
        return generate_latest(self.registry)
