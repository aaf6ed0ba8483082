"""The Python client: codecs, backoff and resume logic by plain calls, then against real servers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
from collections.abc import AsyncGenerator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, get_args

import httpx
import pytest

from conftest import RunningServer, make_settings
from tidings.client import (
    Backoff,
    Client,
    ContinuityLost,
    ProtocolError,
    Received,
    ReceivedEvent,
    RequestRejected,
    ServerUnavailable,
    Subscription,
    TidingsClientError,
    Via,
)
from tidings.client.client import channel_path
from tidings.client.errors import error_for
from tidings.client.model import Position, batch_item, decode_event, encode_data
from tidings.client.polling import etag_cursor
from tidings.client.transport import Item
from tidings.exceptions import ConfigError

GUARD = 30  # seconds; only a guard against a hang, never a timing assertion
VIAS: tuple[Via, ...] = get_args(Via)


def envelope(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "specversion": "1.0",
        "id": "e1:7",
        "source": "/channels/a/b",
        "type": "message",
        "channel": "a/b",
        "time": "2026-01-02T03:04:05.678Z",
    }
    base.update(fields)
    return base


# -- codecs ----------------------------------------------------------------------------------


def test_decode_event_turns_json_data_into_json_bytes() -> None:
    raw = envelope(datacontenttype="application/json", data={"x": [1, 2]})
    event = decode_event(raw)
    assert event.id == event.cursor == "e1:7"
    assert (event.channel, event.type, event.content_type) == ("a/b", "message", "application/json")
    assert event.time == datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert event.data == b'{"x":[1,2]}'
    assert event.json() == {"x": [1, 2]}
    assert event.raw is raw


def test_decode_event_json_string_data_stays_json() -> None:
    event = decode_event(envelope(datacontenttype="application/cloudevents+json", data="hi"))
    assert event.data == b'"hi"'
    assert event.json() == "hi"


def test_decode_event_text_and_base64_data() -> None:
    text = decode_event(envelope(datacontenttype="text/plain; charset=utf-8", data="héllo"))
    assert text.data == "héllo".encode()
    assert text.text() == "héllo"
    binary = decode_event(
        envelope(
            datacontenttype="application/octet-stream",
            data_base64=base64.b64encode(b"\x00\xff").decode(),
        )
    )
    assert binary.data == b"\x00\xff"


def test_decode_event_rejects_what_is_not_an_envelope() -> None:
    with pytest.raises(ProtocolError):
        decode_event({"id": "e1:1"})
    with pytest.raises(ProtocolError):
        decode_event(envelope(datacontenttype="application/octet-stream", data_base64="!!"))


def test_encode_data_follows_the_python_type() -> None:
    assert encode_data(b'{"a":1}', None) == (b'{"a":1}', None)  # the server recognises it
    assert encode_data(b"\x00", "application/octet-stream") == (b"\x00", "application/octet-stream")
    assert encode_data("hi", None) == (b"hi", "text/plain; charset=utf-8")
    assert encode_data("<a/>", "application/xml") == (b"<a/>", "application/xml")
    assert encode_data('{"a":1}', "application/json") == (b'{"a":1}', "application/json")
    assert encode_data({"a": 1}, None) == (b'{"a":1}', "application/json")
    assert encode_data(None, None) == (b"null", "application/json")


def test_batch_item_encodes_data_as_publish_does() -> None:
    assert batch_item("c", {"a": 1}, type="t", idempotency_key="k") == {
        "channel": "c",
        "type": "t",
        "idempotency_key": "k",
        "data": {"a": 1},
        "datacontenttype": "application/json",
    }
    assert batch_item("c", "hi") == {
        "channel": "c",
        "data": "hi",
        "datacontenttype": "text/plain; charset=utf-8",
    }
    assert batch_item("c", b"\x01") == {"channel": "c", "data_base64": "AQ=="}


def test_channel_path_escapes_so_the_server_sees_the_channel_as_given() -> None:
    assert channel_path("orders/42/status") == "/channels/orders/42/status"
    assert channel_path("a/../b") == "/channels/a/%2E%2E/b"
    assert channel_path("a b/?x") == "/channels/a%20b/%3Fx"
    assert channel_path("v1.2/a:b/c-d_e") == "/channels/v1.2/a:b/c-d_e"


def test_etag_cursor() -> None:
    assert etag_cursor('"e1:5"') == "e1:5"
    assert etag_cursor('W/"e1:5"') == "e1:5"
    assert etag_cursor(None) is None


def test_error_for_maps_status_and_body() -> None:
    rejected = error_for(400, b'{"error":"invalid_pattern","detail":"bad"}')
    assert isinstance(rejected, RequestRejected)
    assert (rejected.code, rejected.detail, rejected.status) == ("invalid_pattern", "bad", 400)
    busy = error_for(503, b'{"error":"unavailable","detail":"shutting down"}')
    assert isinstance(busy, ServerUnavailable)
    assert busy.code == "unavailable"
    assert isinstance(error_for(429, b""), ServerUnavailable)  # worth retrying later
    proxy = error_for(502, b"Bad Gateway")
    assert isinstance(proxy, ServerUnavailable)
    assert proxy.detail == "HTTP 502: Bad Gateway"


def test_client_refuses_a_url_that_is_not_http() -> None:
    for url in ("ftp://host", "localhost:8080", "http://"):
        with pytest.raises(ValueError):
            Client(url)


def test_unknown_transport_is_refused_when_subscribing() -> None:
    client = Client("http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="sse"):
        client.subscribe(["a"], via="carrier-pigeon")  # type: ignore[arg-type]


# -- backoff ---------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_and_starts_over_after_reset() -> None:
    top = Backoff(initial=0.1, cap=10, random=lambda: 0.0)
    assert [round(top.next(), 3) for _ in range(10)] == [
        0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10, 10, 10,
    ]  # fmt: skip
    top.reset()
    assert top.next() == pytest.approx(0.1)


def test_backoff_jitter_takes_off_at_most_half() -> None:
    low = Backoff(initial=1, cap=10, random=lambda: 0.999999)
    assert [round(low.next(), 2) for _ in range(6)] == [0.5, 1, 2, 4, 5, 5]


def test_backoff_survives_very_many_attempts() -> None:
    backoff = Backoff(random=lambda: 0.0)
    backoff.attempt = 10_000
    assert backoff.next() == 10


# -- the resume loop, over a scripted transport ----------------------------------------------


def received(cursor: str) -> ReceivedEvent:
    return decode_event(envelope(id=cursor, datacontenttype="text/plain", data=cursor))


class ScriptedTransport:
    """A transport whose connections follow a script: items to yield, then how it ends."""

    def __init__(self, *connections: tuple[list[Item], BaseException | None]) -> None:
        self.connections = list(connections)
        self.cursors: list[str | None] = []  # the cursor each connection was asked to resume

    async def stream(self, cursor: str | None) -> AsyncGenerator[Item, None]:
        self.cursors.append(cursor)
        if not self.connections:
            await asyncio.Event().wait()  # the script is over: stay connected, idle
        items, ending = self.connections.pop(0)
        for item in items:
            yield item
        if ending is not None:
            raise ending


class RecordedBackoff(Backoff):
    """The real schedule without jitter, recorded; the subscription pauses 0 s instead."""

    def __init__(self) -> None:
        super().__init__(random=lambda: 0.0)
        self.delays: list[float] = []

    def next(self) -> float:
        self.delays.append(super().next())
        return 0.0


async def take(subscription: Subscription, n: int) -> list[Received]:
    out: list[Received] = []
    async with asyncio.timeout(GUARD):
        while len(out) < n:
            out.append(await anext(subscription))
    return out


async def test_resume_loop_reconnects_from_the_last_cursor_with_backoff() -> None:
    transport = ScriptedTransport(
        ([Position("e:0"), received("e:1"), received("e:2")], httpx.ReadError("reset")),
        ([], httpx.ConnectError("refused")),
        ([], ServerUnavailable("unavailable", "shutting down", 503)),
        ([Position("e:2"), received("e:3")], None),  # the server closed the stream
        ([Position("e:3"), Position("e:5"), received("e:6")], None),
    )
    backoff = RecordedBackoff()
    subscription = Subscription(transport, None, backoff=backoff)
    items = await take(subscription, 4)
    assert [i.id for i in items if isinstance(i, ReceivedEvent)] == ["e:1", "e:2", "e:3", "e:6"]
    assert transport.cursors == [None, "e:2", "e:2", "e:2", "e:3"]
    # Two failures back off further; each success starts the schedule over.
    assert backoff.delays == pytest.approx([0.1, 0.2, 0.4, 0.1])
    assert subscription.cursor == "e:6"
    await subscription.aclose()


async def test_resume_loop_yields_continuity_lost_and_goes_on_from_the_new_position() -> None:
    transport = ScriptedTransport(
        ([Position("e:4"), received("e:5")], httpx.ReadError("reset")),
        ([Position("f:9", False, "another epoch"), received("f:10")], None),
    )
    subscription = Subscription(transport, "e:4", backoff=RecordedBackoff())
    items = await take(subscription, 3)
    assert items[0] == received("e:5")
    assert items[1] == ContinuityLost("e:5", "f:9", "another epoch")
    assert items[2] == received("f:10")
    await subscription.aclose()


@pytest.mark.parametrize(
    "error", [RequestRejected("invalid_cursor", "bad", 400), ProtocolError("protocol", "?")]
)
async def test_resume_loop_does_not_retry_what_retrying_cannot_fix(
    error: TidingsClientError,
) -> None:
    transport = ScriptedTransport(([], error))
    subscription = Subscription(transport, None, backoff=RecordedBackoff())
    with pytest.raises(type(error)):
        await take(subscription, 1)
    assert len(transport.cursors) == 1


# -- against a real server -------------------------------------------------------------------


async def until(condition: Callable[[], bool]) -> None:
    """Wait, bounded, until ``condition()`` holds."""
    async with asyncio.timeout(GUARD):
        # The state belongs to the client's iterator: there is no event to wait on, so look.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


class Collector:
    """Iterates a subscription in a task; ``take(n)`` waits (bounded) for the next n items."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.queue: asyncio.Queue[Received | BaseException] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        try:
            async for item in self.subscription:
                self.queue.put_nowait(item)
        except Exception as exc:
            self.queue.put_nowait(exc)

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.subscription.aclose()

    async def take(self, n: int) -> list[Received]:
        out: list[Received] = []
        async with asyncio.timeout(GUARD):
            while len(out) < n:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                out.append(item)
        return out

    async def events(self, n: int) -> list[ReceivedEvent]:
        items = await self.take(n)
        assert all(isinstance(i, ReceivedEvent) for i in items), items
        return [i for i in items if isinstance(i, ReceivedEvent)]

    async def subscribed(self) -> None:
        """Wait until the subscription knows its position on the server (it is registered)."""
        await until(lambda: self.subscription.cursor is not None)

    def nothing_pending(self) -> bool:
        return self.queue.empty()


def connect(server: RunningServer) -> Client:
    """A client of ``server`` on every transport: the test server's gRPC port is not 50051."""
    return Client(server.url, grpc_target=f"127.0.0.1:{server.node.grpc_port}")


def subscribe(client: Client, patterns: Sequence[str], via: Via, **kwargs: Any) -> Collector:
    kwargs.setdefault("poll_interval", 0.05)
    kwargs.setdefault("wait", 5)
    return Collector(client.subscribe(patterns, via=via, **kwargs))


async def publish_n(client: Client, channel: str, n: int, start: int = 0) -> list[str]:
    return [(await client.publish(channel, {"n": i}))["id"] for i in range(start, start + n)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_publish_returns_the_envelope_and_data_round_trips(server: RunningServer) -> None:
    async with Client(server.url) as client:
        sent = [
            await client.publish("t/json", {"a": [1, "x"]}, type="order.paid"),
            await client.publish("t/text", "héllo"),
            await client.publish("t/bin", b"\x00\xff", content_type="application/octet-stream"),
            await client.publish("t/sniffed", b'{"b": 2}'),
            await client.publish("t/xml", "<a/>", content_type="application/xml"),
        ]
        assert sent[0]["type"] == "order.paid"
        assert sent[0]["data"] == {"a": [1, "x"]}
        assert sent[2]["data_base64"] == "AP8="
        assert sent[3]["datacontenttype"] == "application/json"
        first = sent[0]["id"].split(":")[0] + ":0"
        async with subscribe(client, ["t/*"], "sse", since=first) as sub:
            got = await sub.events(5)
    assert [e.raw for e in got] == sent
    assert got[0].type == "order.paid"
    assert got[0].json() == {"a": [1, "x"]}
    assert got[1].data == "héllo".encode()
    assert got[2].data == b"\x00\xff"
    assert got[3].json() == {"b": 2}
    assert (got[4].data, got[4].content_type) == (b"<a/>", "application/xml")


async def test_publish_with_an_idempotency_key_is_logged_once(server: RunningServer) -> None:
    async with Client(server.url) as client:
        first = await client.publish("k", {"v": 1}, idempotency_key="order-1")
        again = await client.publish("k", {"v": 1}, idempotency_key="order-1")
    assert first == again


async def test_publish_batch_returns_envelopes_in_order(server: RunningServer) -> None:
    async with Client(server.url) as client:
        envelopes = await client.publish_batch(
            [
                {"channel": "b/1", "data": {"n": 1}, "type": "t"},
                {"channel": "b/2", "data": "two"},
                {"channel": "b/3", "data": b"\x03"},
            ]
        )
    assert [e["channel"] for e in envelopes] == ["b/1", "b/2", "b/3"]
    assert [e["type"] for e in envelopes] == ["t", "message", "message"]
    assert envelopes[1]["data"] == "two"
    assert envelopes[2]["data_base64"] == "Aw=="


async def test_publish_to_an_invalid_channel_raises_with_the_server_code(
    server: RunningServer,
) -> None:
    async with Client(server.url) as client:
        for channel in ("a/*", "a//b", "a/../b", ""):
            with pytest.raises(RequestRejected) as caught:
                await client.publish(channel, 1)
            assert caught.value.code == "invalid_channel"
            assert caught.value.status == 400
            assert caught.value.detail


async def test_publish_to_an_unreachable_server_raises_server_unavailable() -> None:
    async with Client(f"http://127.0.0.1:{free_port()}", timeout=5) as client:
        with pytest.raises(ServerUnavailable) as caught:
            await client.publish("a", 1)
    assert caught.value.code == "unreachable"


@pytest.mark.parametrize("via", VIAS)
async def test_subscribe_from_a_cursor_in_the_middle_gets_exactly_the_later_events(
    server: RunningServer, via: Via
) -> None:
    async with connect(server) as client:
        sent = await publish_n(client, "m/a", 4)
        await client.publish("other", 0)  # not matching
        sent += await publish_n(client, "m/b", 4, start=4)
        async with subscribe(client, ["m/*"], via, since=sent[2], limit=2) as sub:
            got = await sub.events(5)
            assert [e.id for e in got] == sent[3:]
            assert [e.json()["n"] for e in got] == [3, 4, 5, 6, 7]
            live = await publish_n(client, "m/a", 3, start=8)
            assert [e.id for e in await sub.events(3)] == live
            assert sub.nothing_pending()


@pytest.mark.parametrize("via", VIAS)
async def test_subscribe_without_a_cursor_starts_at_the_live_edge(
    server: RunningServer, via: Via
) -> None:
    async with connect(server) as client:
        await publish_n(client, "edge", 3)
        async with subscribe(client, ["edge"], via) as sub:
            await sub.subscribed()
            later = await publish_n(client, "edge", 2, start=3)
            assert [e.id for e in await sub.events(2)] == later


@pytest.mark.parametrize("via", VIAS)
async def test_subscription_resumes_across_a_server_restart_without_loss_or_duplicates(
    tmp_path: Path, via: Via
) -> None:
    # The same ports (HTTP and gRPC), the same SQLite file.
    settings = make_settings(tmp_path, server_port=free_port(), grpc_port=free_port())
    first = RunningServer(settings).start()
    second: RunningServer | None = None
    try:
        async with connect(first) as client, subscribe(client, ["r/**"], via) as sub:
            await sub.subscribed()
            before = await publish_n(client, "r/1", 3)
            assert [e.id for e in await sub.events(3)] == before
            await asyncio.to_thread(first.stop)
            ports = {"server_port": settings.server.port, "grpc_port": settings.grpc.port}
            second = RunningServer(make_settings(tmp_path, **ports))
            await asyncio.to_thread(second.start)
            after = await publish_n(client, "r/2", 3, start=3)
            assert before[0].split(":")[0] == after[0].split(":")[0]  # the same log
            assert [e.id for e in await sub.events(3)] == after
            more = await publish_n(client, "r/3", 2, start=6)
            assert [e.id for e in await sub.events(2)] == more
            assert sub.nothing_pending()
    finally:
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.parametrize("via", ["sse", "longpoll"])
async def test_restart_with_a_new_log_surfaces_continuity_lost(tmp_path: Path, via: Via) -> None:
    port = free_port()
    first = RunningServer(make_settings(tmp_path / "one", server_port=port)).start()
    second: RunningServer | None = None
    try:
        async with Client(first.url) as client, subscribe(client, ["g"], via) as sub:
            await sub.subscribed()
            [old] = await publish_n(client, "g", 1)
            assert [e.id for e in await sub.events(1)] == [old]
            await asyncio.to_thread(first.stop)
            second = RunningServer(make_settings(tmp_path / "two", server_port=port))
            await asyncio.to_thread(second.start)
            [notice] = await sub.take(1)
            assert isinstance(notice, ContinuityLost)
            assert notice.requested == old
            assert "epoch" in notice.reason
            [new] = await publish_n(client, "g", 1)
            assert [e.id for e in await sub.events(1)] == [new]
    finally:
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.parametrize("via", VIAS)
async def test_cursor_from_another_log_surfaces_continuity_lost(
    server: RunningServer, via: Via
) -> None:
    async with connect(server) as client:
        [head] = await publish_n(client, "x", 1)
        async with subscribe(client, ["x"], via, since="zz00:5") as sub:
            [notice] = await sub.take(1)
            assert isinstance(notice, ContinuityLost)
            assert (notice.requested, notice.resumed_at) == ("zz00:5", head)
            assert "another log epoch" in notice.reason
            [new] = await publish_n(client, "x", 1)
            assert [e.id for e in await sub.events(1)] == [new]


@pytest.mark.parametrize("via", VIAS)
async def test_gap_removed_by_retention_surfaces_continuity_lost(
    make_server: Callable[..., RunningServer], via: Via
) -> None:
    server = make_server(log_max_events=3)
    async with connect(server) as client:
        sent = await publish_n(client, "old", 6)
        server.run_coroutine(server.hub.log.trim())
        async with subscribe(client, ["old"], via, since=sent[0]) as sub:
            [notice] = await sub.take(1)
            assert isinstance(notice, ContinuityLost)
            assert (notice.requested, notice.resumed_at) == (sent[0], sent[-1])
            assert "retention" in notice.reason
            [new] = await publish_n(client, "old", 1)
            assert [e.id for e in await sub.events(1)] == [new]


async def test_sse_stream_that_lags_resumes_from_its_cursor(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(hub_queue_size=4)
    async with Client(server.url) as client, subscribe(client, ["lag/*"], "sse") as sub:
        await sub.subscribed()
        [first] = await publish_n(client, "lag/0", 1)
        assert [e.id for e in await sub.events(1)] == [first]  # the server side is live now
        burst = await client.publish_batch([{"channel": f"lag/{i}", "data": i} for i in range(40)])
        got = await sub.events(40)
        assert [e.id for e in got] == [e["id"] for e in burst]
        assert sub.nothing_pending()


class CountingTransport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


# Over WebSocket a refusal is an error message, not an HTTP status, and the handshake does not
# go through the httpx transport counted here: test_client_ws.py covers it. gRPC has a status
# code, not an HTTP status, and no httpx request either: test_client_grpc.py covers it.
@pytest.mark.parametrize("via", [v for v in VIAS if v not in ("ws", "grpc")])
@pytest.mark.parametrize(
    ("pattern", "since", "code"),
    [("a/**/b", None, "invalid_pattern"), ("a", "not-a-cursor", "invalid_cursor")],
)
async def test_refused_subscription_raises_without_retrying(
    server: RunningServer, via: Via, pattern: str, since: str | None, code: str
) -> None:
    counter = CountingTransport()
    async with Client(server.url, transport=counter) as client:
        subscription = client.subscribe([pattern], via=via, since=since)
        with pytest.raises(TidingsClientError) as caught:
            await take(subscription, 1)
    assert isinstance(caught.value, RequestRejected)
    assert caught.value.code == code
    assert caught.value.status == 400
    assert len(counter.requests) == 1


@pytest.mark.parametrize("via", VIAS)
async def test_closing_the_client_ends_subscriptions_waiting_in_other_tasks(
    server: RunningServer, via: Via
) -> None:
    client = connect(server)
    subscription = client.subscribe("c", via=via, wait=30, poll_interval=0.05)
    items: list[Received] = []

    async def consume() -> None:
        async for item in subscription:
            items.append(item)

    async with asyncio.timeout(GUARD), asyncio.TaskGroup() as tasks:
        tasks.create_task(consume())
        await until(lambda: subscription.cursor is not None)
        await client.aclose()  # the consumer ends: no error, no reconnect
    assert items == []
    with pytest.raises(StopAsyncIteration):
        await anext(subscription)


async def test_leaving_the_subscription_block_stops_iteration(server: RunningServer) -> None:
    async with Client(server.url) as client:
        async with client.subscribe("c") as subscription:
            await client.publish("c", 1)
        with pytest.raises(StopAsyncIteration):
            await anext(subscription)
