"""Prometheus metrics, one registry per hub so several hubs can live in one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TRANSPORTS = ("sse", "ws", "grpc", "longpoll", "poll", "http")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.published = Counter(
            "tidings_published_events", "Events appended to the log by publishes", registry=r
        )
        self.delivered = Counter(
            "tidings_delivered_events", "Events handed to subscribers", ["transport"], registry=r
        )
        self.subscribers = Gauge(
            "tidings_subscribers", "Live subscribers", ["transport"], registry=r
        )
        self.lagged = Counter(
            "tidings_lagged_disconnects",
            "Subscribers disconnected because their queue overflowed",
            ["transport"],
            registry=r,
        )
        self.append_seconds = Histogram(
            "tidings_log_append_seconds",
            "Time for a publish to become durable in the log (includes group-commit wait)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.log_events = Gauge("tidings_log_events", "Events held in history", registry=r)
        self.log_head = Gauge("tidings_log_head_sequence", "Last sequence number", registry=r)
        self.log_bytes = Gauge(
            "tidings_log_data_bytes",
            "Bytes of history: event data (memory), file + WAL (SQLite)",
            registry=r,
        )
        for transport in TRANSPORTS:
            self.delivered.labels(transport)
            self.subscribers.labels(transport)
            self.lagged.labels(transport)

    def render(self) -> bytes:
        return generate_latest(self.registry)
