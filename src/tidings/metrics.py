"""Prometheus metrics, one registry per hub so several hubs can live in one process (tests)."""

from __future__ import annotations

import contextlib
from typing import Any

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
        self.webhook_attempts = Counter(
            "tidings_webhook_attempts",
            "Webhook attempts by endpoint and outcome (delivered, retry, gone)",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.webhook_failed = Counter(
            "tidings_webhook_failed_events",
            "Events failed for an endpoint after their last attempt (kept, replayable)",
            ["endpoint"],
            registry=r,
        )
        self.webhook_seconds = Histogram(
            "tidings_webhook_attempt_seconds",
            "Duration of webhook attempts, from sending to the response's status",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0),
            registry=r,
        )
        self.webhook_lag = Gauge(
            "tidings_webhook_lag_seconds",
            "Age of the oldest event an endpoint has read and not yet delivered or failed",
            ["endpoint"],
            registry=r,
        )
        self.relay_connected = Gauge(
            "tidings_relay_connected", "1 while a relay is connected to its broker", ["relay"],
            registry=r,
        )  # fmt: skip
        self.relay_events = Counter(
            "tidings_relay_events",
            "Events relayed: out (confirmed by the broker) and in (published from the broker)",
            ["relay", "direction"],
            registry=r,
        )
        self.relay_dropped = Counter(
            "tidings_relay_dropped_messages",
            "Inbound broker messages refused (dead-lettered or dropped), by reason",
            ["relay", "reason"],
            registry=r,
        )
        self.relay_lost = Counter(
            "tidings_relay_lost_events",
            "Events removed by retention before a relay sent them",
            ["relay"],
            registry=r,
        )
        self.relay_refused = Counter(
            "tidings_relay_refused_events",
            "Events a broker cannot take (over its maximum packet size), skipped and logged",
            ["relay", "reason"],
            registry=r,
        )
        self.relay_lag = Gauge(
            "tidings_relay_lag_seconds",
            "Age of the oldest event a relay has not yet had confirmed by its broker",
            ["relay"],
            registry=r,
        )
        for transport in TRANSPORTS:
            self.delivered.labels(transport)
            self.subscribers.labels(transport)
            self.lagged.labels(transport)

    def forget_endpoint(self, endpoint: str) -> None:
        """Drop a deleted webhook endpoint's series."""
        series: list[tuple[Any, tuple[str, ...]]] = [
            (self.webhook_failed, (endpoint,)),
            (self.webhook_seconds, (endpoint,)),
            (self.webhook_lag, (endpoint,)),
        ]
        series += [(self.webhook_attempts, (endpoint, v)) for v in ("delivered", "retry", "gone")]
        for family, labels in series:
            with contextlib.suppress(KeyError):  # never observed
                family.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)
