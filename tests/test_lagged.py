"""A slow subscriber never slows the others: it is disconnected as lagged at its queue bound.

The stuck subscriber is a raw socket with a small receive buffer that never calls ``recv()``;
events are large so the kernel buffers on both sides fill and the server's writes stall.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from conftest import RunningServer
from streaming import SSEClient, StreamEnded, wait_for

ServerFactory = Callable[..., RunningServer]

EVENT_BYTES = 60 * 1024  # under http.max_event_bytes (64 KiB)
MAX_PUBLISHES = 2000  # ~120 MB: far past any socket buffering, so the test cannot loop forever


def stuck_subscriber(url: str, channel: str) -> socket.socket:
    """An SSE request from a client that will never read its response."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: sets the window
    sock.settimeout(10)
    sock.connect((parts.hostname, parts.port))
    sock.sendall(
        f"GET /sse?channel={channel} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    return sock


def _read_response(sock: socket.socket, timeout: float = 30) -> bytes:
    """Everything the server sends on ``sock`` until the chunked response ends (bounded)."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            raise AssertionError(
                f"stalled after {len(data)} bytes: {bytes(data[-300:])!r}"
            ) from None
        if not chunk:
            return bytes(data)
        data += chunk
        if data.endswith(b"\r\n0\r\n\r\n"):
            return bytes(data)
    raise AssertionError(f"response still open after {timeout} s")


class Reader(threading.Thread):
    """A subscriber that keeps reading in the background; collects event ids."""

    def __init__(self, url: str, channel: str) -> None:
        super().__init__(daemon=True)
        self.stream = SSEClient(url, channel, timeout=30)
        self.stream.subscribed()
        self.ids: list[str] = []
        self.kinds: list[str] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                event = self.stream.next()
                self.kinds.append(event.event)
                if event.id is not None and not event.event.startswith("tidings."):
                    self.ids.append(event.id)
                    if orjson.loads(event.data)["data"] == "end":
                        return
        except StreamEnded:
            pass
        except BaseException as exc:
            if not self.stop.is_set():  # closing the stream under the thread is expected
                self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.stream.close()
        self.join(10)


def lagged_count(client: httpx.Client, transport: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'tidings_lagged_disconnects_total{{transport="{transport}"}}'):
            return float(line.split()[-1])
    raise AssertionError("no tidings_lagged_disconnects_total metric")


def test_subscriber_that_stops_reading_is_dropped_as_lagged_and_others_get_everything(
    make_server: ServerFactory,
) -> None:
    server = make_server(hub_queue_size=16, log_backend="memory", sse_write_timeout=2)
    readers = [Reader(server.url, "big/*") for _ in range(2)]
    for r in readers:
        r.start()
    stuck = stuck_subscriber(server.url, "big/*")
    published: list[str] = []
    payload = orjson.dumps({"pad": "x" * EVENT_BYTES})[: EVENT_BYTES - 10] + b'"}'
    try:
        wait_for(lambda: server.hub.subscriber_count == 3, what="three subscribers")
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert lagged_count(client, "sse") == 0
            for i in range(MAX_PUBLISHES):
                response = client.post(
                    f"/channels/big/{i % 3}",
                    content=payload,
                    headers={"Content-Type": "application/json"},
                )
                assert response.status_code == 201, response.text
                published.append(response.json()["id"])
                if server.hub.subscriber_count < 3:
                    break
            # The stuck one is gone; the hub keeps serving the others.
            assert server.hub.subscriber_count == 2, "the stuck subscriber was never dropped"
            assert lagged_count(client, "sse") >= 1
            for data in [*range(5), "end"]:
                response = client.post("/channels/big/after", json=data)
                published.append(response.json()["id"])
            for r in readers:
                r.join(30)
                assert not r.is_alive(), f"a reader got {len(r.ids)} of {len(published)} events"
        # The lagged connection is not kept open: reading it now reaches its end.
        # The lagged response is not kept open: it ends (with the lagged notice if the
        # stalled write completed in time, cut short if ``sse.write_timeout`` passed first).
        tail = _read_response(stuck)[-4096:]
        if tail.endswith(b"0\r\n\r\n"):
            assert b"event: tidings.lagged" in tail
    finally:
        stuck.close()
        for r in readers:
            r.close()
    for r in readers:
        assert r.error is None, r.error
        assert r.ids == published
        assert "tidings.lagged" not in r.kinds


def test_lagged_metric_counts_by_transport(make_server: ServerFactory) -> None:
    server = make_server(hub_queue_size=1, log_backend="memory")
    with (
        httpx.Client(base_url=server.url, timeout=10) as client,
        SSEClient(server.url, "q") as stream,
    ):
        stream.subscribed()
        client.post("/channels/q", json=0)
        stream.events(1)
        items: list[dict[str, Any]] = [{"channel": "q", "data": i} for i in range(5)]
        assert client.post("/publish", json={"events": items}).status_code == 201
        assert stream.rest()[-1].event == "tidings.lagged"
        wait_for(lambda: lagged_count(client, "sse") == 1, what="lagged metric")
        assert lagged_count(client, "longpoll") == 0
        assert lagged_count(client, "poll") == 0


def test_subscriber_that_takes_no_write_within_write_timeout_is_dropped(
    make_server: ServerFactory,
) -> None:
    # A queue far larger than what is published: only the write timeout can end this one.
    server = make_server(hub_queue_size=100_000, log_backend="memory", sse_write_timeout=0.5)
    stuck = stuck_subscriber(server.url, "slow")
    items = [{"channel": "slow", "data": "y" * EVENT_BYTES}] * 10
    try:
        wait_for(lambda: server.hub.subscriber_count == 1, what="the subscriber")
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for _ in range(MAX_PUBLISHES // 10):
                response = client.post("/publish", json={"events": items})
                assert response.status_code == 201, response.text
                if server.hub.subscriber_count == 0:
                    break
            wait_for(lambda: server.hub.subscriber_count == 0, what="the stuck subscriber dropped")
            assert lagged_count(client, "sse") == 0
    finally:
        stuck.close()


def _overtaken_by_retention(make_server: ServerFactory) -> tuple[RunningServer, list[str], str]:
    """A catch-up stalled on its socket while retention removes what it has yet to read.

    Catch-up reads pages of 512 events. The transport writes a page, reads the next one, and
    only then waits for the socket: with ~6 MB pages and a client that does not read, it
    stalls holding pages 1-2 of 3. Retention then removes page 3 under it. Returns the server,
    the published cursors and everything the client received.
    """
    server = make_server(log_max_events=50)
    pad = "r" * 12_000
    with httpx.Client(base_url=server.url, timeout=10) as client:
        cursors: list[str] = []
        for start in range(0, 1120, 80):
            items = [{"channel": "r", "data": [i, pad]} for i in range(start, start + 80)]
            response = client.post("/publish", json={"events": items})
            assert response.status_code == 201, response.text
            cursors.extend(e["id"] for e in response.json()["events"])
        epoch = cursors[0].split(":")[0]
        stuck = stuck_subscriber(server.url, f"r&since={epoch}:0")
        try:
            wait_for(lambda: server.hub.subscriber_count == 1, what="the subscriber")
            for i in range(100):
                client.post("/channels/r", json=[1120 + i, "later"])
            removed = server.run_coroutine(server.hub.log.trim())
            assert removed > 1024  # retention is now past where the stalled reader stands
            text = _read_response(stuck).decode("latin-1")
        finally:
            stuck.close()
    return server, cursors, text


def _lagged_notice(text: str) -> dict[str, Any]:
    assert "event: tidings.lagged" in text
    tail = text[text.rindex("event: tidings.lagged") :]
    assert "\nid:" not in tail and '\ndata: {"specversion"' not in tail  # nothing after it
    notice: dict[str, Any] = orjson.loads(tail.split("data: ", 1)[1].split("\n", 1)[0])
    return notice


def test_retention_overtaking_a_stalled_catch_up_ends_it_as_lagged_never_partial(
    make_server: ServerFactory,
) -> None:
    server, cursors, text = _overtaken_by_retention(make_server)
    notice = _lagged_notice(text)
    ids = [line[4:] for line in text.split("\n") if line.startswith("id: ")]
    # What was delivered is an exact prefix of the history it asked for; nothing skipped.
    assert ids[1:] == cursors[: len(ids) - 1]
    assert notice["cursor"] == ids[-1]
    # Its next connection is told that continuity was lost.
    with SSEClient(server.url, "r", since=notice["cursor"]) as again:
        state = again.subscribed()
    assert state["recovered"] is False
    assert "retention" in state["reason"]


def test_lagged_notice_says_why_when_retention_overtook_the_reader(
    make_server: ServerFactory,
) -> None:
    # The notice should not claim a queue overflow when the queue never overflowed.
    _, _, text = _overtaken_by_retention(make_server)
    assert "retention" in _lagged_notice(text)["reason"]
