"""``GET /metrics``: publishes, deliveries by transport, subscribers, append latency, log size."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import RunningServer
from streaming import SSEClient, wait_for


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_start_at_zero_for_every_transport(client: httpx.Client) -> None:
    samples = scrape(client)
    assert value(samples, "tidings_published_events_total") == 0
    for transport in ("sse", "longpoll", "poll", "http"):
        assert value(samples, "tidings_delivered_events_total", transport=transport) == 0
        assert value(samples, "tidings_subscribers", transport=transport) == 0
        assert value(samples, "tidings_lagged_disconnects_total", transport=transport) == 0


def test_publishes_are_counted_once_and_replays_not_at_all(client: httpx.Client) -> None:
    for i in range(3):
        assert client.post(f"/channels/m/{i}", json=i).status_code == 201
    items = [{"channel": "m/b", "data": i} for i in range(4)]
    assert client.post("/publish", json={"events": items}).status_code == 201
    key = {"Idempotency-Key": "k"}
    client.post("/channels/m/k", json=1, headers=key)
    client.post("/channels/m/k", json=1, headers=key)  # replayed: not a new event
    client.post("/channels/m//bad", json=1)  # refused: not an event
    samples = scrape(client)
    assert value(samples, "tidings_published_events_total") == 8
    assert value(samples, "tidings_log_head_sequence") == 8
    assert value(samples, "tidings_log_events") == 8
    assert value(samples, "tidings_log_data_bytes") > 0
    # Every publish call that reached the log is one observation of append latency.
    assert value(samples, "tidings_log_append_seconds_count") == 6
    assert value(samples, "tidings_log_append_seconds_sum") > 0
    assert value(samples, "tidings_log_append_seconds_bucket", le="+Inf") == 6


def test_deliveries_and_subscribers_are_counted_by_transport(
    server: RunningServer, client: httpx.Client
) -> None:
    with SSEClient(server.url, "d/*") as first, SSEClient(server.url, "d/**") as second:
        first.subscribed()
        second.subscribed()
        samples = scrape(client)
        assert value(samples, "tidings_subscribers", transport="sse") == 2
        since = client.post("/channels/d/1", json=1).json()["id"]
        client.post("/channels/d/2", json=2)
        first.events(2)
        second.events(2)
        wait_for(
            lambda: value(scrape(client), "tidings_delivered_events_total", transport="sse") == 4,
            what="4 SSE deliveries counted",
        )
    wait_for(lambda: value(scrape(client), "tidings_subscribers", transport="sse") == 0)
    assert client.get("/poll", params={"channel": "d/*", "since": since}).status_code == 200
    params = {"channel": "d/*", "since": since, "wait": "5"}
    assert client.get("/poll", params=params).status_code == 200
    samples = scrape(client)
    assert value(samples, "tidings_delivered_events_total", transport="poll") == 1
    assert value(samples, "tidings_delivered_events_total", transport="longpoll") == 1
    assert value(samples, "tidings_subscribers", transport="poll") == 0
    assert value(samples, "tidings_subscribers", transport="longpoll") == 0


def test_held_long_poll_is_a_subscriber_while_held(
    server: RunningServer, client: httpx.Client
) -> None:
    result: list[int] = []

    def hold() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            result.append(c.get("/poll", params={"channel": "h", "wait": "30"}).status_code)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        wait_for(
            lambda: value(scrape(client), "tidings_subscribers", transport="longpoll") == 1,
            what="the held poll counted",
        )
        client.post("/channels/h", json=1)
    finally:
        thread.join(15)
    assert result == [200]
    assert value(scrape(client), "tidings_subscribers", transport="longpoll") == 0


def test_log_gauges_follow_retention(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(log_max_events=5)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for i in range(12):
            c.post("/channels/r", json=i)
        server.run_coroutine(server.hub.log.trim())
        samples = scrape(c)
    assert value(samples, "tidings_log_head_sequence") == 12
    assert value(samples, "tidings_log_events") == 5
