"""Server-Sent Events against a real server with a real streaming client (httpx ``iter_raw``).

Covers the wire format (headers, ``retry:``, heartbeats, event types, one-line data, binary),
resume by ``since`` and ``Last-Event-ID`` (which wins), patterns, continuity lost, lagged
readers and the end of the stream on shutdown.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from conftest import RunningServer
from streaming import SSEClient, StreamEnded, envelope, publish, publish_mixed, wait_for
from tidings.events import Cursor

ServerFactory = Callable[..., RunningServer]


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def publish_batch(client: httpx.Client, items: list[dict[str, Any]]) -> list[str]:
    response = client.post("/publish", json={"events": items})
    assert response.status_code == 201, response.text
    return [e["id"] for e in response.json()["events"]]


# -- the wire format -------------------------------------------------------------------------


def test_stream_headers_retry_advice_and_opening_event(
    server: RunningServer, client: httpx.Client
) -> None:
    head = publish(client, "x")
    with SSEClient(server.url, "orders/*") as stream:
        assert stream.response.status_code == 200
        headers = stream.response.headers
        assert headers["content-type"].split(";")[0] == "text/event-stream"
        assert headers["cache-control"] == "no-cache"
        assert headers["x-accel-buffering"] == "no"
        state = stream.subscribed()
        assert stream.decoder.retry_ms == 2000
        assert state == {"cursor": head, "recovered": True}
        assert bytes(stream.raw).startswith(b"retry: 2000\n")


def test_retry_advice_follows_the_setting(make_server: ServerFactory) -> None:
    server = make_server(sse_retry="750ms")
    with SSEClient(server.url, "a") as stream:
        stream.subscribed()
        assert stream.decoder.retry_ms == 750


def test_live_events_carry_the_publish_cursor_as_id(
    server: RunningServer, client: httpx.Client
) -> None:
    with SSEClient(server.url, "orders/*") as stream:
        stream.subscribed()
        cursors = [publish(client, f"orders/{i}", {"n": i}) for i in range(3)]
        publish(client, "other/1", "not for us")
        events = stream.events(3)
    assert [e.id for e in events] == cursors
    assert [e.event for e in events] == ["message"] * 3
    assert [envelope(e)["data"] for e in events] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [envelope(e)["id"] for e in events] == cursors


def test_event_line_only_for_types_other_than_message(
    server: RunningServer, client: httpx.Client
) -> None:
    with SSEClient(server.url, "t") as stream:
        stream.subscribed()
        plain = publish(client, "t", 1)
        typed = publish(client, "t", 2, params={"type": "order.created"})
        first, second = stream.events(2)
        raw = bytes(stream.raw)
    assert (first.event, first.id) == ("message", plain)
    assert (second.event, second.id) == ("order.created", typed)
    assert raw.count(b"event: order.created\n") == 1
    assert b"event: message" not in raw


def test_multi_line_json_data_stays_one_data_line(
    server: RunningServer, client: httpx.Client
) -> None:
    pretty = b'{\n  "a": [\n    1,\n    2\n  ],\r\n  "b": "x\\ny"\n}\n'
    with SSEClient(server.url, "m") as stream:
        stream.subscribed()
        cursor = publish(client, "m", content=pretty, headers={"Content-Type": "application/json"})
        [event] = stream.events(1)
        raw = bytes(stream.raw)
    block = raw[raw.index(b"id: " + cursor.encode()) :]
    block = block[: block.index(b"\n\n") + 2]
    assert block.count(b"data:") == 1, block
    assert envelope(event)["data"] == {"a": [1, 2], "b": "x\ny"}


def test_binary_and_text_data(server: RunningServer, client: httpx.Client) -> None:
    blob = b"\x00\xff\n\r\n binary"
    with SSEClient(server.url, "bin") as stream:
        stream.subscribed()
        publish(client, "bin", content=blob, headers={"Content-Type": "application/octet-stream"})
        publish(client, "bin", content="line1\nline2", headers={"Content-Type": "text/plain"})
        binary, text = stream.events(2)
    assert "data" not in envelope(binary)
    assert base64.b64decode(envelope(binary)["data_base64"]) == blob
    assert envelope(text)["data"] == "line1\nline2"


def test_heartbeat_comments_keep_an_idle_stream_alive(make_server: ServerFactory) -> None:
    server = make_server(sse_heartbeat=0.2)
    with SSEClient(server.url, "quiet") as stream:
        stream.subscribed()
        stream.read_until(lambda: bytes(stream.raw).count(b": ping\n\n") >= 2)
        assert bytes(stream.raw).count(b": ping\n\n") >= 2
        # Still a live stream after the pings.
        with httpx.Client(base_url=server.url, timeout=10) as c:
            cursor = publish(c, "quiet")
        assert stream.events(1)[0].id == cursor


# -- resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["since", "last-event-id"])
def test_resume_from_the_middle_gets_exactly_the_later_events_in_order(
    server: RunningServer, client: httpx.Client, how: str
) -> None:
    published = publish_mixed(client, 20)
    middle = published[9][1]
    expected = [c for ch, c in published[10:] if ch.startswith("orders/") and ch.count("/") == 1]
    kwargs: dict[str, Any] = (
        {"since": middle} if how == "since" else {"headers": {"Last-Event-ID": middle}}
    )
    with SSEClient(server.url, "orders/*", **kwargs) as stream:
        state = stream.subscribed()
        assert state["recovered"] is True
        assert state["cursor"] == middle
        replayed = stream.events(len(expected))
        live = publish(client, "orders/9", "live")
        [after] = stream.events(1)
    assert [e.id for e in replayed] == expected
    assert after.id == live


def test_last_event_id_wins_over_since(server: RunningServer, client: httpx.Client) -> None:
    cursors = [publish(client, "r", i) for i in range(10)]
    with SSEClient(
        server.url, "r", since=cursors[2], headers={"Last-Event-ID": cursors[6]}
    ) as stream:
        assert stream.subscribed()["cursor"] == cursors[6]
        events = stream.events(3)
    assert [e.id for e in events] == cursors[7:]


@pytest.mark.parametrize("pattern", ["orders/*", "orders/**"])
def test_pattern_subscription_resumes_with_one_cursor(
    server: RunningServer, client: httpx.Client, pattern: str
) -> None:
    published = publish_mixed(client, 16)
    since = published[5][1]

    def wanted(channel: str) -> bool:
        if pattern == "orders/*":
            return channel in ("orders/1", "orders/2")
        return channel.startswith("orders/")

    expected = [c for ch, c in published[6:] if wanted(ch)]
    with SSEClient(server.url, pattern, since=since) as stream:
        stream.subscribed()
        events = stream.events(len(expected))
        marker = publish(client, "orders/end")
        [last] = stream.events(1)
    assert [e.id for e in events] == expected
    assert [envelope(e)["channel"] for e in events] == [ch for ch, _ in published[6:] if wanted(ch)]
    assert last.id == marker


def test_several_channel_params_share_one_ordered_stream(
    server: RunningServer, client: httpx.Client
) -> None:
    published = publish_mixed(client, 12)
    expected = [c for ch, c in published[3:] if ch in ("users/1", "orders/1/items")]
    with SSEClient(
        server.url, ["users/1", "orders/1/items", "users/1"], since=published[2][1]
    ) as stream:
        stream.subscribed()
        events = stream.events(len(expected))
    assert [e.id for e in events] == expected


def test_resume_of_a_long_history_arrives_complete_and_in_order(
    server: RunningServer, client: httpx.Client
) -> None:
    cursors: list[str] = []
    for start in range(0, 1300, 500):
        items = [{"channel": "long", "data": i} for i in range(start, min(start + 500, 1300))]
        cursors.extend(publish_batch(client, items))
    with SSEClient(server.url, "long", since=cursors[99]) as stream:
        stream.subscribed()
        events = stream.events(1200)
    assert [e.id for e in events] == cursors[100:]


def test_resume_while_publishing_has_no_gap_and_no_duplicate(
    server: RunningServer, client: httpx.Client
) -> None:
    first = publish(client, "race", -1)
    done = threading.Event()
    published: list[str] = []

    def publisher() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            for i in range(300):
                published.append(publish(c, "race", i))
        done.set()

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        wait_for(lambda: len(published) >= 50, what="50 publishes")
        with SSEClient(server.url, "race", since=first) as stream:
            stream.subscribed()
            thread.join(30)
            assert done.is_set()
            events = stream.events(300)
    finally:
        thread.join(30)
    assert [e.id for e in events] == published


# -- continuity lost -------------------------------------------------------------------------


def _trimmed_server(
    make_server: ServerFactory, **overrides: Any
) -> tuple[RunningServer, list[str]]:
    server = make_server(log_max_events=5, **overrides)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        cursors = [publish(c, "keep", i) for i in range(20)]
    server.run_coroutine(server.hub.log.trim())
    return server, cursors


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
def test_cursor_older_than_retention_reports_continuity_lost_then_goes_live(
    make_server: ServerFactory, backend: str
) -> None:
    server, cursors = _trimmed_server(make_server, log_backend=backend)
    with SSEClient(server.url, "keep", since=cursors[2]) as stream:
        opening = stream.expect("tidings.subscribed")
        state = orjson.loads(opening.data)
        assert state["recovered"] is False
        assert "retention" in state["reason"]
        assert state["cursor"] == cursors[-1]
        assert opening.id == cursors[-1]
        with httpx.Client(base_url=server.url, timeout=10) as c:
            live = publish(c, "keep", "after")
        [event] = stream.events(1)
    assert event.id == live


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
def test_cursor_at_the_retention_edge_still_recovers(
    make_server: ServerFactory, backend: str
) -> None:
    server, cursors = _trimmed_server(make_server, log_backend=backend)
    low = server.run_coroutine(server.hub.log.low())
    edge = f"{server.hub.log.epoch}:{low}"
    with SSEClient(server.url, "keep", since=edge) as stream:
        assert stream.subscribed()["recovered"] is True
        events = stream.events(20 - low)
    assert [e.id for e in events] == cursors[low:]
    before_edge = f"{server.hub.log.epoch}:{low - 1}"
    with SSEClient(server.url, "keep", since=before_edge) as stream:
        assert stream.subscribed()["recovered"] is False


@pytest.mark.parametrize(
    "cursor",
    ["other0epoch:3", "ffffffff:0", "{epoch}:999999"],
    ids=["other-epoch", "other-epoch-zero", "ahead-of-head"],
)
def test_cursor_from_another_epoch_or_the_future_reports_continuity_lost(
    server: RunningServer, client: httpx.Client, cursor: str
) -> None:
    head = [publish(client, "e", i) for i in range(3)][-1]
    cursor = cursor.format(epoch=server.hub.log.epoch)
    with SSEClient(server.url, "e", headers={"Last-Event-ID": cursor}) as stream:
        opening = stream.expect("tidings.subscribed")
        state = orjson.loads(opening.data)
        assert state["recovered"] is False
        assert state["reason"]
        assert opening.id == state["cursor"] == head
        live = publish(client, "e", "live")
        [event] = stream.events(1)
    assert event.id == live


# -- lagging and ending ----------------------------------------------------------------------


def test_reader_that_overflows_its_queue_gets_lagged_then_the_stream_ends(
    make_server: ServerFactory,
) -> None:
    server = make_server(hub_queue_size=2, log_backend="memory")
    with httpx.Client(base_url=server.url, timeout=10) as c, SSEClient(server.url, "l") as stream:
        stream.subscribed()
        first = publish(c, "l", 0)
        assert stream.events(1)[0].id == first  # the subscription is live now
        cursors = publish_batch(c, [{"channel": "l", "data": i} for i in range(20)])
        rest = stream.rest()
        assert stream.ended
        kinds = [e.event for e in rest]
        assert kinds[-1] == "tidings.lagged", kinds
        assert "tidings.lagged" not in kinds[:-1]
        notice = orjson.loads(rest[-1].data)
        assert notice["reason"]
        got = [e.id for e in rest[:-1]]
        assert got == cursors[: len(got)]
        assert notice["cursor"] == (got[-1] if got else first)
        wait_for(lambda: server.hub.subscriber_count == 0, what="subscriber removed")
        # Resuming from the notice's cursor loses nothing.
        with SSEClient(server.url, "l", since=notice["cursor"]) as again:
            assert again.subscribed()["recovered"] is True
            resumed = again.events(len(cursors) - len(got))
        assert [e.id for e in resumed] == cursors[len(got) :]


def test_client_disconnect_removes_the_subscriber(server: RunningServer) -> None:
    with SSEClient(server.url, "gone") as stream:
        stream.subscribed()
        wait_for(lambda: server.hub.subscriber_count == 1, what="one subscriber")
    wait_for(lambda: server.hub.subscriber_count == 0, what="subscriber removed")


def test_server_shutdown_ends_the_stream_cleanly(server: RunningServer) -> None:
    with SSEClient(server.url, "bye") as stream:
        stream.subscribed()
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        try:
            assert stream.rest() == []
        finally:
            stopper.join(30)
        assert stream.ended


def test_stream_ended_by_server_is_reported_not_hung(server: RunningServer) -> None:
    # Guard for the helper itself: a stream that ends raises StreamEnded, never blocks.
    with SSEClient(server.url, "bye2") as stream:
        stream.subscribed()
        server.stop()
        with pytest.raises(StreamEnded):
            stream.next()


def test_opening_cursor_is_a_valid_cursor_of_this_log(server: RunningServer) -> None:
    with SSEClient(server.url, "**") as stream:
        cursor = Cursor.parse(stream.subscribed()["cursor"])
    assert cursor.epoch == server.hub.log.epoch


def test_catch_up_longer_than_the_queue_does_not_lag_even_while_publishing(
    make_server: ServerFactory,
) -> None:
    server = make_server(hub_queue_size=16)
    published: list[str] = []
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for start in range(0, 1000, 250):
            published.extend(
                publish_batch(c, [{"channel": "q", "data": i} for i in range(start, start + 250)])
            )

        def publisher() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as pc:
                for i in range(200):
                    published.append(publish(pc, "q", i))

        thread = threading.Thread(target=publisher)
        with SSEClient(server.url, "q", since=published[9]) as stream:
            thread.start()
            try:
                assert stream.subscribed()["recovered"] is True
                events = stream.events(1190)
            finally:
                thread.join(30)
    assert [e.id for e in events] == published[10:]


def test_event_matching_several_patterns_is_delivered_once(
    server: RunningServer, client: httpx.Client
) -> None:
    with SSEClient(server.url, ["orders/*", "orders/**", "orders/1", "**"]) as stream:
        stream.subscribed()
        cursors = [publish(client, "orders/1"), publish(client, "x"), publish(client, "orders/1")]
        events = stream.events(3)
        marker = publish(client, "end")
        assert stream.events(1)[0].id == marker
    assert [e.id for e in events] == cursors


def test_resume_from_further_back_than_the_recent_event_cache(
    server: RunningServer, client: httpx.Client
) -> None:
    # The SQLite log keeps the last 10,000 events in memory; older reads go to the database
    # (where a pattern is a GLOB superset, re-checked exactly).
    channels = ["a/1", "a/1/x", "b/1", "a/2"]
    published: list[tuple[str, str]] = []
    for start in range(0, 12_000, 1000):
        names = [channels[i % 4] for i in range(start, start + 1000)]
        items: list[dict[str, Any]] = [
            {"channel": name, "data": i} for i, name in enumerate(names, start)
        ]
        published.extend(zip(names, publish_batch(client, items), strict=True))
    since = published[99][1]
    expected = [c for ch, c in published[100:] if ch in ("a/1", "a/2")]
    with SSEClient(server.url, "a/*", since=since) as stream:
        assert stream.subscribed()["recovered"] is True
        events = stream.events(len(expected), timeout=30)
    assert [e.id for e in events] == expected
    page = client.get("/history", params={"channel": "a/*", "since": since, "limit": 1000}).json()
    assert [e["id"] for e in page["events"]] == expected[:1000]


def test_clients_that_hang_up_at_once_leave_no_subscription_behind(
    server: RunningServer, client: httpx.Client
) -> None:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(server.url)
    assert parts.hostname is not None and parts.port is not None
    request = f"GET /sse?channel=churn/** HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    for i in range(60):
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(request)
            if i % 2:
                sock.recv(1)  # half of them wait for the response to start
        if i % 10 == 0:
            publish(client, "churn/x", i)
    wait_for(lambda: server.hub.subscriber_count == 0, what="every subscription released")
    text = client.get("/metrics").text
    assert 'tidings_subscribers{transport="sse"} 0.0' in text
