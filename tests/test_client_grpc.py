"""The client over gRPC: its codecs by plain calls, then real calls to real servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import orjson
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conftest import RunningServer, make_settings
from tidings.client import (
    Client,
    ContinuityLost,
    ProtocolError,
    ReceivedEvent,
    RequestRejected,
    ServerUnavailable,
)
from tidings.client import grpc as client_grpc
from tidings.client.client import default_grpc_target
from tidings.client.grpc import (
    call_metadata,
    channel_options,
    envelope,
    format_time,
    publish_request,
    received_event,
    rpc_error,
    stream_item,
)
from tidings.client.model import Position
from tidings.client.subscription import Received, Subscription
from tidings.events import format_time as json_time
from tidings.v1 import tidings_pb2 as pb

GUARD = 30  # seconds; only a guard against a hang, never a timing assertion
SECRET = "test-secret-with-at-least-32-bytes-of-key"
Code = grpc.StatusCode


def event_message(**fields: Any) -> pb.Event:
    base: dict[str, Any] = {
        "id": "e1:7",
        "channel": "a/b",
        "type": "message",
        "source": "/channels/a/b",
        "time": Timestamp(seconds=1767323045, nanos=678_000_000),
        "datacontenttype": "application/json",
        "data": b'{"x": [1, 2]}',
        "specversion": "1.0",
    }
    base.update(fields)
    return pb.Event(**base)


# -- codecs ----------------------------------------------------------------------------------


def test_the_default_grpc_target_is_the_host_of_the_url_on_port_50051() -> None:
    assert default_grpc_target("http://127.0.0.1:8080") == "127.0.0.1:50051"
    assert default_grpc_target("https://hub.example/tidings") == "hub.example:50051"
    assert default_grpc_target("http://[::1]:8080") == "[::1]:50051"
    assert Client("http://hub:1").grpc_target == "hub:50051"
    assert Client("http://hub:1", grpc_target="other:9").grpc_target == "other:9"


def test_call_metadata_forwards_the_callers_headers_only() -> None:
    http = httpx.AsyncClient(headers={"Authorization": "Bearer t", "X-Trace": "1"})
    assert call_metadata(http.headers) == (("authorization", "Bearer t"), ("x-trace", "1"))


def test_keepalive_pings_within_the_idle_timeout_but_at_most_every_10_s() -> None:
    options = dict(channel_options(45.0))
    assert (options["grpc.keepalive_time_ms"], options["grpc.keepalive_timeout_ms"]) == (
        22_500,
        22_500,
    )
    assert options["grpc.http2.ping_timeout_ms"] == 22_500  # what grpcio waits for an answer
    assert options["grpc.http2.max_pings_without_data"] == 0  # a quiet stream keeps pinging
    options = dict(channel_options(4.0))
    assert (options["grpc.keepalive_time_ms"], options["grpc.keepalive_timeout_ms"]) == (
        10_000,
        2_000,
    )


def test_the_envelope_embeds_json_keeps_text_and_base64_encodes_the_rest() -> None:
    assert envelope(event_message()) == {
        "specversion": "1.0",
        "id": "e1:7",
        "source": "/channels/a/b",
        "type": "message",
        "channel": "a/b",
        "time": "2026-01-02T03:04:05.678Z",
        "datacontenttype": "application/json",
        "data": {"x": [1, 2]},
    }
    text = envelope(event_message(datacontenttype="text/plain; charset=utf-8", data="é".encode()))
    assert text["data"] == "é"
    binary = envelope(event_message(datacontenttype="image/png", data=b"\x00\xff"))
    assert binary["data_base64"] == "AP8="
    assert "data" not in binary
    with pytest.raises(ProtocolError):
        envelope(event_message(data=b"{not json"))
    with pytest.raises(ProtocolError):
        envelope(event_message(datacontenttype="text/plain", data=b"\xff"))


@pytest.mark.parametrize(
    "moment", [1767323045.678, 1767323045.0, 1767323045.9999996, 1700000000.123, 0.0005]
)
def test_the_time_is_the_string_the_json_envelope_has(moment: float) -> None:
    # As the server builds the Timestamp: whole seconds, then the fraction truncated to ns.
    seconds, fraction = divmod(moment, 1.0)
    stamp = Timestamp(seconds=int(seconds), nanos=int(fraction * 1e9))
    assert format_time(stamp) == json_time(moment)


def test_a_received_event_has_the_data_byte_for_byte() -> None:
    event = received_event(event_message(data=b'{"n": 1.50}'))
    assert event.data == b'{"n": 1.50}'  # not parsed and re-encoded
    assert event.json() == {"n": 1.5}
    assert (event.id, event.channel, event.type) == ("e1:7", "a/b", "message")
    assert event.time.isoformat() == "2026-01-02T03:04:05.678000+00:00"
    assert event.raw["data"] == {"n": 1.5}


def test_stream_items_from_subscribed_and_event_messages() -> None:
    opening = pb.SubscribeResponse(subscribed=pb.Subscribed(cursor="e1:3", recovered=True))
    assert stream_item(opening.SerializeToString()) == Position("e1:3", True, None)
    lost = pb.Subscribed(cursor="e2:0", recovered=False, reason="another log epoch")
    lost_item = stream_item(pb.SubscribeResponse(subscribed=lost).SerializeToString())
    assert lost_item == Position("e2:0", False, "another log epoch")
    item = stream_item(pb.SubscribeResponse(event=event_message()).SerializeToString())
    assert isinstance(item, ReceivedEvent)
    assert item.id == "e1:7"
    assert stream_item(b"") is None  # a kind this client does not know
    with pytest.raises(ProtocolError):
        stream_item(b"\xff\xff\xff")


def test_publish_requests_carry_the_bytes_http_would_send() -> None:
    request = publish_request("c", {"a": 1}, type="t", idempotency_key="k")
    assert (request.channel, request.type, request.idempotency_key) == ("c", "t", "k")
    assert (request.data, request.content_type) == (b'{"a":1}', "application/json")
    request = publish_request("c", "hé")
    assert (request.data, request.content_type) == ("hé".encode(), "text/plain; charset=utf-8")
    request = publish_request("c", b"\x00")
    assert (request.data, request.content_type, request.type) == (b"\x00", "", "")
    assert publish_request("c", b"{}", batch=True).content_type == "application/octet-stream"


TOO_MANY = "too_many_connections"


@pytest.mark.parametrize(
    ("status", "code", "kind", "name"),
    [
        (Code.INVALID_ARGUMENT, "invalid_channel", RequestRejected, "invalid_channel"),
        (Code.UNAUTHENTICATED, "unauthorized", RequestRejected, "unauthorized"),
        (Code.PERMISSION_DENIED, "forbidden", RequestRejected, "forbidden"),
        (Code.UNIMPLEMENTED, None, RequestRejected, "unimplemented"),
        (Code.RESOURCE_EXHAUSTED, "lagged", ServerUnavailable, "lagged"),
        (Code.RESOURCE_EXHAUSTED, "rate_limited", ServerUnavailable, "rate_limited"),
        (Code.RESOURCE_EXHAUSTED, TOO_MANY, ServerUnavailable, TOO_MANY),
        (Code.RESOURCE_EXHAUSTED, None, RequestRejected, "resource_exhausted"),
        (Code.UNAVAILABLE, "unavailable", ServerUnavailable, "unavailable"),
        (Code.UNAVAILABLE, None, ServerUnavailable, "unreachable"),
        (Code.DEADLINE_EXCEEDED, None, ServerUnavailable, "timeout"),
        (Code.CANCELLED, None, ServerUnavailable, "cancelled"),
        (Code.INTERNAL, None, ServerUnavailable, "internal"),
    ],
)
def test_status_codes_map_to_reconnect_or_refusal(
    status: grpc.StatusCode, code: str | None, kind: type, name: str
) -> None:
    error = rpc_error(status, "why", code, "h:1")
    assert isinstance(error, kind)
    assert error.code == name
    assert "why" in error.detail
    assert error.status is None


# -- against a real server -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.node.grpc_port}"


def connect(server: RunningServer, **kwargs: Any) -> Client:
    return Client(server.url, grpc_target=target(server), **kwargs)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(GUARD):
        while not condition():  # noqa: ASYNC110 — the state belongs to the client's iterator
            await asyncio.sleep(0.01)


async def take(subscription: Subscription, n: int) -> list[Received]:
    out: list[Received] = []
    async with asyncio.timeout(GUARD):
        while len(out) < n:
            out.append(await anext(subscription))
    return out


async def events(subscription: Subscription, n: int) -> list[ReceivedEvent]:
    items = await take(subscription, n)
    assert all(isinstance(i, ReceivedEvent) for i in items), items
    return [i for i in items if isinstance(i, ReceivedEvent)]


@asynccontextmanager
async def iterating(subscription: Subscription) -> AsyncIterator[asyncio.Queue[Any]]:
    """Iterate ``subscription`` in a task, so that it connects while the test publishes."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def run() -> None:
        try:
            async for item in subscription:
                queue.put_nowait(item)
        except Exception as exc:
            queue.put_nowait(exc)

    task = asyncio.create_task(run())
    try:
        await until(lambda: subscription.cursor is not None or not queue.empty())
        yield queue
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await subscription.aclose()


async def drain(queue: asyncio.Queue[Any], n: int) -> list[Any]:
    out = []
    async with asyncio.timeout(GUARD):
        while len(out) < n:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            out.append(item)
    return out


def counting(subscription: Subscription) -> list[str | None]:
    """The cursors of the connections ``subscription`` makes from now on."""
    transport: Any = subscription._transport
    stream, cursors = transport.stream, []
    transport.stream = lambda cursor: (cursors.append(cursor), stream(cursor))[1]
    return cursors


# A little of everything publish sends: JSON, text, declared types, bytes recognised or not.
SAMPLES: list[tuple[str, object, dict[str, Any]]] = [
    ("g/json", {"a": [1, "x"], "f": 1.5}, {"type": "order.paid"}),
    ("g/text", "héllo\nwörld", {}),
    ("g/bin", bytes(range(256)), {}),
    ("g/png", b"\x00\xff\n", {"content_type": "image/png"}),
    ("g/sniffed", b'{"b": 2}', {}),
    ("g/xml", "<a/>", {"content_type": "application/xml"}),
    ("g/jsontext", '{"c": 3}', {"content_type": "application/json"}),
    ("g/empty", b"", {}),
]


async def test_subscribe_via_grpc_gets_the_envelopes_published_over_http(
    server: RunningServer,
) -> None:
    async with connect(server) as client:
        old = await client.publish("g/old", 0)
        async with iterating(client.subscribe(["g/*"], via="grpc", since=old["id"])) as queue:
            sent = [await client.publish(c, d, **kw) for c, d, kw in SAMPLES]
            await client.publish("elsewhere", 1)
            got = await drain(queue, len(sent))
    assert [e.raw for e in got] == sent  # the same envelope, with the same cursor, as on HTTP
    assert got[0].json() == {"a": [1, "x"], "f": 1.5}
    assert got[1].text() == "héllo\nwörld"
    assert (got[2].data, got[2].content_type) == (bytes(range(256)), "application/octet-stream")
    assert (got[3].data, got[3].content_type) == (b"\x00\xff\n", "image/png")
    assert got[4].data == b'{"b": 2}'
    assert got[7].data == b""


async def test_publish_via_grpc_returns_the_envelope_http_returns(server: RunningServer) -> None:
    async with connect(server) as client:
        for channel, data, kwargs in SAMPLES:
            over_grpc = await client.publish(channel, data, via="grpc", **kwargs)
            over_http = await client.publish(channel, data, **kwargs)
            assert over_grpc.keys() == over_http.keys()
            for name in over_http.keys() - {"id", "time"}:
                assert over_grpc[name] == over_http[name], (channel, name)
            epoch, _, seq = over_grpc["id"].partition(":")
            assert over_http["id"] == f"{epoch}:{int(seq) + 1}"
    async with httpx.AsyncClient(base_url=server.url) as http:
        history = (await http.get("/history", params={"channel": "g/*"})).json()
    # What the publish answered is what history holds, time included.
    assert over_grpc in history["events"]


async def test_publish_via_grpc_reaches_sse_with_the_same_cursor(server: RunningServer) -> None:
    async with (
        connect(server) as client,
        iterating(client.subscribe("p/**", via="sse")) as queue,
    ):
        sent = [
            await client.publish("p/1", {"n": 1}, via="grpc"),
            await client.publish("p/2", "two", via="grpc", type="t.two"),
            await client.publish("p/3", b"\x00\xff", via="grpc"),
        ]
        got = await drain(queue, 3)
    assert [e.raw for e in got] == sent
    assert (got[1].type, got[1].text()) == ("t.two", "two")
    assert (got[2].content_type, got[2].data) == ("application/octet-stream", b"\x00\xff")


async def test_binary_data_round_trips_over_grpc_both_ways(server: RunningServer) -> None:
    blob = os.urandom(60_000) + b"\n\r\x00"
    async with (
        connect(server) as client,
        iterating(client.subscribe("bin", via="grpc")) as queue,
    ):
        sent = await client.publish("bin", blob, via="grpc", content_type="application/x-blob")
        [got] = await drain(queue, 1)
    assert got.data == blob
    assert got.content_type == "application/x-blob"
    assert got.raw == sent
    assert got.id == sent["id"]


async def test_publish_batch_via_grpc_returns_the_envelopes_http_returns(
    server: RunningServer,
) -> None:
    batch: list[Any] = [
        {"channel": "b/1", "data": {"n": 1}, "type": "t"},
        {"channel": "b/2", "data": "two"},
        {"channel": "b/3", "data": b"\x03"},
        {"channel": "b/4", "data": b"{}"},  # bytes are octet-stream in a batch, over both
    ]
    async with connect(server) as client:
        over_grpc = await client.publish_batch(batch, via="grpc")
        over_http = await client.publish_batch(batch)
        with pytest.raises(RequestRejected) as caught:
            await client.publish_batch([], via="grpc")
    strip = ("id", "time")
    assert [{k: v for k, v in e.items() if k not in strip} for e in over_grpc] == [
        {k: v for k, v in e.items() if k not in strip} for e in over_http
    ]
    cursors = [int(e["id"].split(":")[1]) for e in over_grpc + over_http]
    assert cursors == list(range(cursors[0], cursors[0] + 8))  # in order, atomically
    assert caught.value.code == "invalid_event"


async def test_a_publish_retried_with_its_idempotency_key_via_grpc_is_stored_once(
    server: RunningServer,
) -> None:
    async with connect(server) as client:
        first = await client.publish("k", {"v": 1}, via="grpc", idempotency_key="order-1")
        again = await client.publish("k", {"v": 1}, via="grpc", idempotency_key="order-1")
        over_http = await client.publish("k", {"v": 1}, idempotency_key="order-1")
    assert first == again == over_http


@pytest.mark.parametrize(
    ("channel", "kwargs", "code"),
    [
        ("a//b", {}, "invalid_channel"),
        ("a/*", {}, "invalid_channel"),
        ("a", {"type": "tidings.reserved"}, "invalid_event"),
        ("a", {"content_type": "application/json", "data": b"{not json"}, "invalid_event"),
        ("a", {"data": b"x" * 70_000}, "payload_too_large"),
    ],
)
async def test_refused_publish_via_grpc_raises_with_the_servers_code_and_detail(
    server: RunningServer, channel: str, kwargs: dict[str, Any], code: str
) -> None:
    data = kwargs.pop("data", 1)
    async with connect(server) as client:
        with pytest.raises(RequestRejected) as caught:
            await client.publish(channel, data, via="grpc", **kwargs)
        assert caught.value.code == code
        assert caught.value.detail and caught.value.detail != code
        # The channel stays usable after a refusal.
        assert (await client.publish("a", 2, via="grpc"))["data"] == 2


@pytest.mark.parametrize(
    ("pattern", "since", "code"),
    [("a/**/b", None, "invalid_pattern"), ("a", "not-a-cursor", "invalid_cursor")],
)
async def test_refused_subscription_via_grpc_raises_without_retrying(
    server: RunningServer, pattern: str, since: str | None, code: str
) -> None:
    async with connect(server) as client:
        subscription = client.subscribe([pattern], via="grpc", since=since)
        cursors = counting(subscription)
        with pytest.raises(RequestRejected) as caught:
            await take(subscription, 1)
    assert caught.value.code == code
    assert caught.value.detail and caught.value.detail != code
    assert len(cursors) == 1


def token(subscribe: list[str], publish: list[str], **claims: Any) -> str:
    payload: dict[str, Any] = {
        "sub": "alice",
        "exp": int(time.time()) + 600,
        "tidings": {"subscribe": subscribe, "publish": publish, "admin": False},
    }
    payload.update(claims)
    return jwt.encode(payload, SECRET, algorithm="HS256")


@pytest.fixture
def secured(make_server: Callable[..., RunningServer]) -> RunningServer:
    return make_server(auth_jwt_algorithms="HS256", auth_jwt_secret=SECRET)


async def test_the_clients_authorization_header_goes_as_call_metadata(
    secured: RunningServer,
) -> None:
    headers = {"Authorization": f"Bearer {token(['orders/**'], ['orders/*'])}"}
    async with (
        connect(secured, headers=headers) as client,
        iterating(client.subscribe("orders/**", via="grpc")) as queue,
    ):
        sent = await client.publish("orders/1", {"paid": True}, via="grpc")
        [event] = await drain(queue, 1)
    assert event.raw == sent


async def test_forbidden_subscribe_and_publish_via_grpc_raise_with_the_detail(
    secured: RunningServer,
) -> None:
    headers = {"Authorization": f"Bearer {token(['orders/**'], ['orders/*'])}"}
    async with connect(secured, headers=headers) as client:
        with pytest.raises(RequestRejected) as caught:
            await take(client.subscribe("admin/**", via="grpc"), 1)
        assert caught.value.code == "forbidden"
        assert "admin/**" in caught.value.detail
        with pytest.raises(RequestRejected) as caught:
            await client.publish("admin/x", 1, via="grpc")
        assert caught.value.code == "forbidden"
        assert "admin/x" in caught.value.detail


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer nonsense"}, {}])
async def test_a_bad_or_missing_credential_is_unauthenticated(
    secured: RunningServer, headers: dict[str, str]
) -> None:
    async with connect(secured, headers=headers) as client:
        with pytest.raises(RequestRejected) as caught:
            await take(client.subscribe("orders/**", via="grpc"), 1)
        assert caught.value.code == "unauthorized"
        with pytest.raises(RequestRejected) as caught:
            await client.publish("orders/1", 1, via="grpc")
        assert caught.value.code == "unauthorized"
        assert caught.value.detail


async def test_unreachable_server_raises_server_unavailable_on_publish() -> None:
    async with Client("http://127.0.0.1:1", grpc_target=f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(ServerUnavailable) as caught:
            await client.publish("a", 1, via="grpc")
    assert caught.value.code == "unreachable"
    assert caught.value.detail.startswith("cannot reach 127.0.0.1:")


async def test_cursor_from_another_epoch_surfaces_continuity_lost(server: RunningServer) -> None:
    async with connect(server) as client:
        head = (await client.publish("x", 1))["id"]
        subscription = client.subscribe("x", via="grpc", since="zz00:5")
        [notice] = await take(subscription, 1)
        assert isinstance(notice, ContinuityLost)
        assert (notice.requested, notice.resumed_at) == ("zz00:5", head)
        assert "another log epoch" in notice.reason
        async with iterating(subscription) as queue:
            new = await client.publish("x", 2, via="grpc")
            [event] = await drain(queue, 1)
        assert event.id == new["id"]


def restartable(tmp_path: Path) -> Callable[[], RunningServer]:
    """Servers on the same HTTP and gRPC ports and the same SQLite file, one after another."""
    ports = {"server_port": free_port(), "grpc_port": free_port()}
    return lambda: RunningServer(make_settings(tmp_path, **ports))


async def test_resume_after_a_restart_delivers_exactly_the_missed_events_once(
    tmp_path: Path,
) -> None:
    new_server = restartable(tmp_path)
    first = new_server().start()
    second: RunningServer | None = None
    try:
        async with connect(first) as client:
            subscription = client.subscribe("r/**", via="grpc")
            cursors = counting(subscription)
            first_item = asyncio.create_task(anext(subscription))
            await until(lambda: subscription.connected)
            before = [(await client.publish("r/1", i, via="grpc"))["id"] for i in range(3)]
            got = [await first_item, *await take(subscription, 2)]
            assert [e.id for e in got if isinstance(e, ReceivedEvent)] == before
            # Nobody reads while the server restarts and these are published: the
            # subscription finds its call ended at its next read, and resumes.
            await asyncio.to_thread(first.stop)
            second = new_server()
            await asyncio.to_thread(second.start)
            missed = [(await client.publish("r/2", i, via="grpc"))["id"] for i in range(3, 6)]
            assert [e.id for e in await events(subscription, 3)] == missed
            assert cursors == [None, before[-1]]
            # Live again: a repeated event would come before these.
            live = [(await client.publish("r/3", i))["id"] for i in range(6, 8)]
            assert [e.id for e in await events(subscription, 2)] == live
            await subscription.aclose()
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_restart_with_a_new_log_surfaces_continuity_lost(tmp_path: Path) -> None:
    port, grpc_port = free_port(), free_port()
    first = RunningServer(make_settings(tmp_path / "one", server_port=port, grpc_port=grpc_port))
    first.start()
    second: RunningServer | None = None
    try:
        async with (
            connect(first) as client,
            iterating(client.subscribe("g", via="grpc")) as queue,
        ):
            old = await client.publish("g", 1, via="grpc")
            assert [e.id for e in await drain(queue, 1)] == [old["id"]]
            await asyncio.to_thread(first.stop)
            settings = make_settings(tmp_path / "two", server_port=port, grpc_port=grpc_port)
            second = RunningServer(settings)
            await asyncio.to_thread(second.start)
            [notice] = await drain(queue, 1)
            assert isinstance(notice, ContinuityLost)
            assert notice.requested == old["id"]
            assert "epoch" in notice.reason
            new = await client.publish("g", 2, via="grpc")
            assert [e.id for e in await drain(queue, 1)] == [new["id"]]
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_a_lagged_subscription_resumes_from_its_cursor(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(hub_queue_size=4)
    async with connect(server) as client:
        subscription = client.subscribe("lag/*", via="grpc")
        cursors = counting(subscription)
        first = asyncio.create_task(anext(subscription))
        await until(lambda: subscription.connected or first.done())
        sent = await client.publish("lag/0", 0, via="grpc")
        assert (await first).id == sent["id"]  # type: ignore[union-attr]
        # Not reading while more than the flow-control window is published: the hub drops
        # the subscriber, the stream ends with RESOURCE_EXHAUSTED (lagged), and it resumes.
        filler = "x" * 4000
        burst = []
        for start in range(0, 1000, 200):
            items: list[Any] = [
                {"channel": f"lag/{i}", "data": {"i": i, "f": filler}}
                for i in range(start, start + 200)
            ]
            burst += await client.publish_batch(items, via="grpc")
        got = await events(subscription, 1000)
        assert [e.id for e in got] == [e["id"] for e in burst]
        assert len(cursors) >= 2  # it did lag, and resumed
        await subscription.aclose()


async def test_closing_a_subscription_ends_a_wait_in_another_task_at_once(
    server: RunningServer,
) -> None:
    async with connect(server) as client:
        subscription = client.subscribe("c", via="grpc")
        waiting = asyncio.create_task(anext(subscription))
        await until(lambda: subscription.connected)
        await subscription.aclose()
        with pytest.raises(StopAsyncIteration):
            async with asyncio.timeout(GUARD):
                await waiting
        # The client's channel is still open for others.
        assert (await client.publish("c", 1, via="grpc"))["channel"] == "c"


class Proxy:
    """A TCP proxy that can go silent: bytes stop flowing, yet no connection closes."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.silent = False
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._done: list[asyncio.Future[Any]] = []

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if not self.silent:
                    writer.write(data)
                    await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.silent = False  # a new connection after a silence is let through
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self._writers += [writer, up_writer]
        pipes = asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._done.append(pipes)
        await pipes

    async def __aenter__(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.gather(*self._done, return_exceptions=True)


async def test_a_connection_that_stops_answering_pings_is_reconnected(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ping every 0.5 s instead of 10 s, to be quick: the server tolerates it (its
    # grpc.http2.max_ping_strikes is 0: it never tells a client off for pinging too often).
    monkeypatch.setattr(client_grpc, "MIN_PING_INTERVAL", 0.5)
    proxy = Proxy(server.node.grpc_port)
    async with proxy as port:
        client = Client(server.url, grpc_target=f"127.0.0.1:{port}", idle_timeout=1.0)
        async with client:
            subscription = client.subscribe("quiet", via="grpc")
            cursors = counting(subscription)
            async with iterating(subscription) as queue:
                proxy.silent = True  # the peer is gone without a word
                await until(lambda: len(cursors) == 2)
                sent = await client.publish("quiet", 1, via="grpc")
                [event] = await drain(queue, 1)
    assert event.id == sent["id"]
    assert proxy.connections == 2


# -- the command line ------------------------------------------------------------------------


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(extra)
    return env


def tidings(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tidings", *args],
        capture_output=True,
        timeout=60,
        env=env or environment(),
        check=False,
    )


@contextmanager
def background(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidings", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(),
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate()


def test_cli_publish_via_grpc_prints_the_stored_envelope(server: RunningServer) -> None:
    args = ("publish", "cli/1", '{"total": 5}', "--via", "grpc", "--url", server.url)
    result = tidings(*args, "--grpc-target", target(server))
    assert result.returncode == 0, result.stderr
    envelope = orjson.loads(result.stdout)
    history = httpx.get(f"{server.url}/history", params={"channel": "cli/1"}).json()
    assert history["events"] == [envelope]
    assert envelope["data"] == {"total": 5}
    refused = tidings("publish", "a//b", "1", "--via", "grpc", "--grpc-target", target(server))
    assert refused.returncode == 1
    [message] = refused.stderr.decode().splitlines()
    assert message.startswith("tidings: ")
    assert "'a//b'" in message


def test_cli_grpc_target_from_the_environment(server: RunningServer) -> None:
    env = environment(TIDINGS_URL=server.url, TIDINGS_GRPC_TARGET=target(server))
    result = tidings("publish", "cli/env", "hi", "--via", "grpc", env=env)
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["data"] == "hi"
    unreachable = f"127.0.0.1:{free_port()}"
    result = tidings("publish", "cli/env", "hi", "--via", "grpc", "--grpc-target", unreachable)
    assert result.returncode == 1
    [message] = result.stderr.decode().splitlines()
    assert message.startswith(f"tidings: cannot reach {unreachable}")


def test_cli_subscribe_via_grpc_prints_what_sse_prints(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url) as http:
        since = http.get("/healthz").json()["cursor"]
        for body, content_type in [
            (b'{"n": 1}', None),
            (b"plain text", None),
            (b"\x00\xff", None),
            (b"<a/>", "application/xml"),
        ]:
            headers = {} if content_type is None else {"Content-Type": content_type}
            http.post("/channels/s/x", content=body, headers=headers)
    common = ("subscribe", "s/*", "--since", since, "--count", "4", "--url", server.url)
    over_sse = tidings(*common)
    over_grpc = tidings(*common, "--via", "grpc", "--grpc-target", target(server))
    assert over_grpc.returncode == over_sse.returncode == 0, over_grpc.stderr
    assert over_grpc.stdout == over_sse.stdout
    assert len(over_grpc.stdout.splitlines()) == 4


def test_cli_subscribe_via_grpc_prints_live_events(server: RunningServer) -> None:
    since = httpx.get(f"{server.url}/healthz").json()["cursor"]
    args = ("subscribe", "live/**", "--via", "grpc", "--since", since, "--count", "2")
    with background(*args, "--url", server.url, "--grpc-target", target(server)) as proc:
        assert proc.stdout is not None
        first = httpx.post(f"{server.url}/channels/live/a", content=b"1").json()
        assert orjson.loads(proc.stdout.readline()) == first
        second = httpx.post(f"{server.url}/channels/live/b", content=b"\x01").json()
        assert orjson.loads(proc.stdout.readline()) == second
        assert proc.wait(GUARD) == 0


def test_cli_publish_via_grpc_uses_tls_when_the_url_is_https(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    from test_grpc import self_signed  # the server's TLS tests' certificate for 127.0.0.1

    cert_file, key_file, _ = self_signed(tmp_path)
    server = make_server(grpc_tls_cert_file=cert_file, grpc_tls_key_file=key_file)
    # gRPC's own variable: trust this certificate instead of the system's roots.
    env = environment(GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=cert_file)
    args = ("publish", "tls", "1", "--via", "grpc", "--grpc-target", target(server))
    over_tls = tidings(*args, "--url", "https://127.0.0.1:1", env=env)
    assert over_tls.returncode == 0, over_tls.stderr
    assert orjson.loads(over_tls.stdout)["channel"] == "tls"
    plaintext = tidings(*args, "--url", "http://127.0.0.1:1", env=env)
    assert plaintext.returncode == 1
    assert plaintext.stderr.startswith(b"tidings: cannot reach")
