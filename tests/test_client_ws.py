"""The client over WebSocket: its codecs by plain calls, then real connections to real servers.

A scripted ``websockets`` server stands in for tidings where a test needs the server to do
something at a precise moment (drop a connection mid-publish, acknowledge out of order).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedError
from websockets.frames import Close

from conftest import RunningServer, make_settings
from tidings.client import (
    Client,
    ContinuityLost,
    ProtocolError,
    ReceivedEvent,
    RequestRejected,
    ServerUnavailable,
)
from tidings.client.subscription import Received, Subscription
from tidings.client.ws import (
    close_error,
    decode_message,
    handshake_headers,
    publish_frame,
    received_event,
    reply_error,
    subscribe_message,
    websocket_url,
)

GUARD = 30  # seconds; only a guard against a hang, never a timing assertion
SECRET = "test-secret-with-at-least-32-bytes-of-key"


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


def test_websocket_url_swaps_the_scheme_and_keeps_a_path_prefix() -> None:
    assert websocket_url("http://127.0.0.1:8080/") == "ws://127.0.0.1:8080/ws"
    assert websocket_url("https://hub.example/tidings/") == "wss://hub.example/tidings/ws"
    assert websocket_url("http://[::1]:9") == "ws://[::1]:9/ws"


def test_handshake_headers_forward_the_callers_headers_only() -> None:
    http = httpx.AsyncClient(headers={"Authorization": "Bearer t", "X-Trace": "1"})
    assert handshake_headers(http.headers) == [("authorization", "Bearer t"), ("x-trace", "1")]


def test_subscribe_message_asks_for_binary_and_resumes_after_the_cursor() -> None:
    assert orjson.loads(subscribe_message(("a/*", "b/**"), "e:4")) == {
        "op": "subscribe",
        "id": "s",
        "channels": ["a/*", "b/**"],
        "since": "e:4",
        "binary": True,
    }
    assert "since" not in orjson.loads(subscribe_message(("a",), None))


def test_publish_frame_sends_json_values_and_text_in_the_message() -> None:
    frame, text = publish_frame(1, "c", {"a": 1}, type="t", idempotency_key="k")
    assert text
    assert orjson.loads(frame) == {
        "op": "publish", "id": 1, "channel": "c", "type": "t", "idempotency_key": "k",
        "data": {"a": 1},
    }  # fmt: skip
    frame, text = publish_frame(2, "c", "héllo")
    assert text
    assert orjson.loads(frame) == {
        "op": "publish", "id": 2, "channel": "c",
        "datacontenttype": "text/plain; charset=utf-8", "data": "héllo",
    }  # fmt: skip
    frame, _ = publish_frame(3, "c", "<a/>", content_type="application/xml")
    assert orjson.loads(frame)["datacontenttype"] == "application/xml"
    frame, _ = publish_frame(4, "c", [1], content_type="application/cloudevents+json")
    assert orjson.loads(frame)["datacontenttype"] == "application/cloudevents+json"


@pytest.mark.parametrize(
    ("data", "content_type", "body", "declared"),
    [
        (b"\x00\xff\n", None, b"\x00\xff\n", "application/octet-stream"),
        (b'{"n": 12345678901234567890123}', None, b'{"n": 12345678901234567890123}', None),
        (b'"\xc3\xa9"', "application/json", b'"\xc3\xa9"', "application/json"),
        (b"plain\ntext", None, b"plain\ntext", "text/plain; charset=utf-8"),
        (b"\x01", "image/png", b"\x01", "image/png"),
        ('{"a": 1.50}', "application/json", b'{"a": 1.50}', "application/json"),
        ({"a": 1}, "text/csv", b'{"a":1}', "text/csv"),
    ],
)
def test_publish_frame_sends_other_data_as_the_exact_bytes_http_would_send(
    data: object, content_type: str | None, body: bytes, declared: str | None
) -> None:
    frame, text = publish_frame(5, "c", data, content_type=content_type)
    assert not text
    head, data_part = decode_message(frame)
    assert data_part == body
    if declared is None:  # recognised as the server recognises it; not parsed, so not rounded
        declared = "application/json"
    assert head == {"op": "publish", "id": 5, "channel": "c", "datacontenttype": declared}


def test_decode_message_splits_a_binary_frame_at_the_first_newline() -> None:
    message, data = decode_message(b'{"op":"event","sub":"s"}\n\x00\n\x01')
    assert message == {"op": "event", "sub": "s"}
    assert data == b"\x00\n\x01"
    assert decode_message('{"op":"pong"}') == ({"op": "pong"}, None)


@pytest.mark.parametrize("frame", ["[]", "{}", '{"op": 1}', "nope", b"no newline", b"[]\n"])
def test_malformed_messages_are_protocol_errors(frame: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_message(frame)


def test_an_event_from_a_binary_frame_has_the_raw_data_and_the_whole_envelope() -> None:
    head = envelope(datacontenttype="application/octet-stream")
    event = received_event({"op": "event", "sub": "s", "event": head}, b"\x00\xff")
    assert event.data == b"\x00\xff"
    assert event.content_type == "application/octet-stream"
    assert event.raw == {**head, "data_base64": "AP8="}  # the envelope SSE would carry
    with pytest.raises(ProtocolError):
        received_event({"op": "event", "event": {**head, "data_base64": "AP8="}}, b"\x00")


def test_reply_errors_keep_code_and_detail_and_only_rate_limits_and_shutdowns_retry() -> None:
    refused = reply_error({"op": "error", "id": "s", "error": "forbidden", "detail": "no"})
    assert isinstance(refused, RequestRejected)
    assert (refused.code, refused.detail, refused.status) == ("forbidden", "no", None)
    for code in ("rate_limited", "unavailable"):
        assert isinstance(reply_error({"op": "error", "error": code}), ServerUnavailable)


@pytest.mark.parametrize(
    ("code", "kind", "name"),
    [
        (1001, ServerUnavailable, "going_away"),
        (1011, ServerUnavailable, "internal_error"),
        (4001, ServerUnavailable, "lagged"),
        (4999, ServerUnavailable, "closed"),
        (4401, RequestRejected, "unauthorized"),
        (4403, RequestRejected, "forbidden"),
        (1009, RequestRejected, "message_too_big"),
        (1002, ProtocolError, "protocol_error"),
    ],
)
def test_close_codes_map_to_reconnect_or_refusal(code: int, kind: type, name: str) -> None:
    error = close_error(ConnectionClosedError(Close(code, "why"), None))
    assert isinstance(error, kind)
    assert (error.code, error.detail) == (name, "why")


def test_normal_closure_is_no_error_and_a_lost_connection_reconnects() -> None:
    assert close_error(ConnectionClosed(Close(1000, ""), Close(1000, ""), True)) is None
    lost = close_error(ConnectionClosedError(None, None))
    assert isinstance(lost, ServerUnavailable)
    assert lost.code == "connection_lost"


# -- against a real server -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


async def history(server: RunningServer, pattern: str) -> dict[str, dict[str, Any]]:
    """The envelopes on channels matching ``pattern``, by cursor."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        page = (await http.get("/history", params={"channel": pattern, "limit": 1000})).json()
    return {e["id"]: e for e in page["events"]}


async def test_subscribe_via_ws_gets_the_envelopes_published_over_http(
    server: RunningServer,
) -> None:
    async with Client(server.url) as client:
        old = await client.publish("w/old", 0)
        async with iterating(client.subscribe(["w/*"], via="ws", since=old["id"])) as queue:
            sent = [
                await client.publish("w/json", {"a": [1, "x"]}, type="order.paid"),
                await client.publish("w/text", "héllo"),
                await client.publish("w/bin", b"\x00\xff\n", content_type="image/png"),
                await client.publish("elsewhere", 1),
                await client.publish("w/xml", "<a/>", content_type="application/xml"),
            ]
            del sent[3]
            got = await drain(queue, 4)
    assert [e.raw for e in got] == sent  # the same envelope, with the same cursor, as on HTTP
    assert got[0].json() == {"a": [1, "x"]}
    assert got[1].text() == "héllo"
    assert (got[2].data, got[2].content_type) == (b"\x00\xff\n", "image/png")
    assert got[3].data == b"<a/>"


async def test_publish_via_ws_returns_the_cursor_that_sse_delivers(server: RunningServer) -> None:
    async with (
        Client(server.url) as client,
        iterating(client.subscribe("p/**", via="sse")) as queue,
    ):
        acks = [
            await client.publish("p/1", {"n": 1}, via="ws"),
            await client.publish("p/2", "two", via="ws", type="t.two"),
            await client.publish("p/3", b"\x00\xff", via="ws"),
        ]
        got = await drain(queue, 3)
    assert acks == [{"id": e.id, "replayed": False} for e in got]
    assert got[0].json() == {"n": 1}
    assert (got[1].type, got[1].text()) == ("t.two", "two")
    assert (got[2].content_type, got[2].raw["data_base64"]) == ("application/octet-stream", "AP8=")


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        ({"a": [1, None]}, None),
        ("héllo", None),
        (b'{"n": 1.50, "big": 12345678901234567890}', None),
        (b'{"a": 1}', "application/vnd.x+json"),
        (b"text\nbytes", None),
        (b"\x00\xff", None),
        (b"\x01\x02", "image/png"),
        ("<a/>", "application/xml"),
        ("[1, 2]", "application/json"),
        (None, None),
    ],
)
async def test_publish_via_ws_stores_what_http_would_store(
    server: RunningServer, data: object, content_type: str | None
) -> None:
    async with Client(server.url) as client:
        over_http = await client.publish("same", data, content_type=content_type)
        ack = await client.publish("same", data, content_type=content_type, via="ws")
        stored = (await history(server, "same"))[ack["id"]]
    assert (stored["datacontenttype"], stored.get("data"), stored.get("data_base64")) == (
        over_http["datacontenttype"],
        over_http.get("data"),
        over_http.get("data_base64"),
    )


async def test_binary_data_round_trips_raw_over_ws_both_ways(server: RunningServer) -> None:
    blob = bytes(range(256)) * 64
    async with (
        Client(server.url) as client,
        iterating(client.subscribe("blob", via="ws")) as queue,
    ):
        ack = await client.publish("blob", blob, via="ws")
        [event] = await drain(queue, 1)
    assert (event.id, event.data, event.content_type) == (
        ack["id"],
        blob,
        "application/octet-stream",
    )
    assert base64.b64decode(event.raw["data_base64"]) == blob


async def test_concurrent_publishes_share_one_connection_and_get_their_own_cursor(
    server: RunningServer,
) -> None:
    async with Client(server.url) as client:
        acks = await asyncio.gather(
            *(client.publish(f"c/{i}", {"i": i}, via="ws") for i in range(100))
        )
        by_id = await history(server, "c/*")
    assert [by_id[a["id"]]["data"] for a in acks] == [{"i": i} for i in range(100)]


async def test_publish_via_ws_with_an_idempotency_key_replays_the_first_cursor(
    server: RunningServer,
) -> None:
    async with Client(server.url) as client:
        first = await client.publish("k", 1, idempotency_key="order-1", via="ws")
        again = await client.publish("k", 1, idempotency_key="order-1", via="ws")
        over_http = await client.publish("k", 1, idempotency_key="order-1")
    assert first["replayed"] is False
    assert again == {"id": first["id"], "replayed": True}
    assert over_http["id"] == first["id"]


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
async def test_refused_publish_via_ws_raises_with_the_servers_code_and_detail(
    server: RunningServer, channel: str, kwargs: dict[str, Any], code: str
) -> None:
    data = kwargs.pop("data", 1)
    async with Client(server.url) as client:
        with pytest.raises(RequestRejected) as caught:
            await client.publish(channel, data, via="ws", **kwargs)
        assert caught.value.code == code
        assert caught.value.detail and caught.value.detail != code
        # The connection stays usable after an error reply.
        assert (await client.publish("a", 2, via="ws"))["replayed"] is False


@pytest.mark.parametrize(
    ("pattern", "since", "code"),
    [("a/**/b", None, "invalid_pattern"), ("a", "not-a-cursor", "invalid_cursor")],
)
async def test_refused_subscription_via_ws_raises_with_the_detail(
    server: RunningServer, pattern: str, since: str | None, code: str
) -> None:
    async with Client(server.url) as client:
        subscription = client.subscribe([pattern], via="ws", since=since)
        with pytest.raises(RequestRejected) as caught:
            await take(subscription, 1)
    assert caught.value.code == code
    assert caught.value.detail and caught.value.detail != code


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


async def test_the_clients_headers_carry_the_credential_on_the_handshake(
    secured: RunningServer,
) -> None:
    headers = {"Authorization": f"Bearer {token(['orders/**'], ['orders/*'])}"}
    async with (
        Client(secured.url, headers=headers) as client,
        iterating(client.subscribe("orders/**", via="ws")) as queue,
    ):
        ack = await client.publish("orders/1", {"paid": True}, via="ws")
        [event] = await drain(queue, 1)
    assert event.id == ack["id"]


async def test_forbidden_subscribe_and_publish_via_ws_raise_with_the_detail(
    secured: RunningServer,
) -> None:
    headers = {"Authorization": f"Bearer {token(['orders/**'], ['orders/*'])}"}
    async with Client(secured.url, headers=headers) as client:
        with pytest.raises(RequestRejected) as caught:
            await take(client.subscribe("admin/**", via="ws"), 1)
        assert caught.value.code == "forbidden"
        assert "admin/**" in caught.value.detail
        with pytest.raises(RequestRejected) as caught:
            await client.publish("admin/x", 1, via="ws")
        assert caught.value.code == "forbidden"
        assert "admin/x" in caught.value.detail


async def test_a_bad_token_closes_with_4401_and_ends_the_subscription(
    secured: RunningServer,
) -> None:
    async with Client(secured.url, headers={"Authorization": "Bearer nonsense"}) as client:
        with pytest.raises(RequestRejected) as caught:
            await take(client.subscribe("orders/**", via="ws"), 1)
        assert caught.value.code == "unauthorized"
        with pytest.raises(RequestRejected) as caught:
            await client.publish("orders/1", 1, via="ws")
        assert caught.value.code == "unauthorized"


async def test_no_credential_with_auth_on_is_refused(secured: RunningServer) -> None:
    async with Client(secured.url) as client:
        with pytest.raises(RequestRejected) as caught:
            await take(client.subscribe("orders/**", via="ws"), 1)
        assert caught.value.code == "unauthorized"


async def test_a_handshake_refused_over_http_raises_with_its_status(server: RunningServer) -> None:
    async with Client(f"{server.url}/elsewhere") as client:
        with pytest.raises(RequestRejected) as caught:
            await take(client.subscribe("a", via="ws"), 1)
        assert caught.value.status == 404
        with pytest.raises(RequestRejected) as caught:
            await client.publish("a", 1, via="ws")
        assert caught.value.status == 404


async def test_unreachable_server_raises_server_unavailable_on_publish() -> None:
    async with Client(f"http://127.0.0.1:{free_port()}", timeout=5) as client:
        with pytest.raises(ServerUnavailable) as caught:
            await client.publish("a", 1, via="ws")
    assert caught.value.code == "unreachable"


async def test_cursor_from_another_epoch_surfaces_continuity_lost(server: RunningServer) -> None:
    async with Client(server.url) as client:
        head = (await client.publish("x", 1))["id"]
        subscription = client.subscribe("x", via="ws", since="zz00:5")
        [notice] = await take(subscription, 1)
        assert isinstance(notice, ContinuityLost)
        assert (notice.requested, notice.resumed_at) == ("zz00:5", head)
        assert "another log epoch" in notice.reason
        async with iterating(subscription) as queue:
            new = await client.publish("x", 2)
            [event] = await drain(queue, 1)
        assert event.id == new["id"]


async def test_resume_after_a_restart_delivers_exactly_the_missed_events_once(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, server_port=free_port())  # same port, same SQLite file
    first = RunningServer(settings).start()
    second: RunningServer | None = None
    try:
        async with (
            Client(first.url) as client,
            iterating(client.subscribe("r/**", via="ws")) as queue,
        ):
            before = [(await client.publish("r/1", i, via="ws"))["id"] for i in range(3)]
            assert [e.id for e in await drain(queue, 3)] == before
            await asyncio.to_thread(first.stop)  # closes with 1001: reconnect
            second = RunningServer(make_settings(tmp_path, server_port=settings.server.port))
            await asyncio.to_thread(second.start)
            # The publisher reconnects too.
            after = [(await client.publish("r/2", i, via="ws"))["id"] for i in range(3, 6)]
            # A repeated event would come before them: replay precedes live events.
            assert [e.id for e in await drain(queue, 3)] == after
            assert queue.empty()
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_a_lagged_subscription_resumes_from_its_cursor(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(hub_queue_size=4)
    async with Client(server.url) as client:
        subscription = client.subscribe("lag/*", via="ws")
        transport: Any = subscription._transport
        stream, cursors = transport.stream, []
        transport.stream = lambda cursor: (cursors.append(cursor), stream(cursor))[1]
        first = asyncio.create_task(anext(subscription))
        await until(lambda: subscription.connected or first.done())
        sent = await client.publish("lag/0", 0)
        assert (await first).id == sent["id"]  # type: ignore[union-attr]
        # Not reading while the burst is published: the server closes it with 4001 (lagged).
        burst = await client.publish_batch([{"channel": f"lag/{i}", "data": i} for i in range(400)])
        got = await events(subscription, 400)
        assert [e.id for e in got] == [e["id"] for e in burst]
        assert len(cursors) >= 2  # it did lag, and resumed
        await subscription.aclose()


async def test_closing_the_client_ends_a_ws_subscription_waiting_in_another_task(
    server: RunningServer,
) -> None:
    client = Client(server.url)
    subscription = client.subscribe("c", via="ws")
    items: list[Received] = []

    async def consume() -> None:
        async for item in subscription:
            items.append(item)

    async with asyncio.timeout(GUARD), asyncio.TaskGroup() as tasks:
        tasks.create_task(consume())
        await until(lambda: subscription.cursor is not None)
        await client.aclose()
    assert items == []


# -- against a scripted server: precise moments ----------------------------------------------


@asynccontextmanager
async def scripted(
    handler: Callable[[ServerConnection], Awaitable[None]],
) -> AsyncIterator[str]:
    """A WebSocket server on a free port running ``handler`` per connection; yields its URL."""
    async with serve(handler, "127.0.0.1", 0) as ws_server:
        port = next(iter(ws_server.sockets)).getsockname()[1]
        yield f"http://127.0.0.1:{port}"


async def test_acknowledgements_out_of_order_reach_their_own_publish() -> None:
    async def handler(ws: ServerConnection) -> None:
        first = orjson.loads(await ws.recv())
        second = orjson.loads(await ws.recv())
        for message, cursor in ((second, "e:2"), (first, "e:1")):
            reply = {"op": "published", "id": message["id"], "cursor": cursor, "replayed": False}
            await ws.send(orjson.dumps(reply).decode())
        await ws.wait_closed()

    async with scripted(handler) as url, Client(url) as client:
        one = asyncio.create_task(client.publish("a", 1, via="ws"))
        await asyncio.sleep(0)  # let the first one open the connection and send
        two = asyncio.create_task(client.publish("a", 2, via="ws"))
        assert await one == {"id": "e:1", "replayed": False}
        assert await two == {"id": "e:2", "replayed": False}


@pytest.mark.parametrize(
    ("code", "kind"),
    [(1001, ServerUnavailable), (1011, ServerUnavailable), (4401, RequestRejected)],
)
async def test_a_publish_in_flight_when_the_connection_closes_raises(code: int, kind: type) -> None:
    connections = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        message = orjson.loads(await ws.recv())
        if connections == 1:
            await ws.close(code, "going")
            return
        reply = {"op": "published", "id": message["id"], "cursor": "e:9", "replayed": True}
        await ws.send(orjson.dumps(reply).decode())
        await ws.wait_closed()

    async with scripted(handler) as url, Client(url) as client:
        with pytest.raises(kind):
            await client.publish("a", 1, via="ws", idempotency_key="k")
        # The next publish opens a new connection.
        retried = await client.publish("a", 1, via="ws", idempotency_key="k")
        assert retried == {"id": "e:9", "replayed": True}
    assert connections == 2


async def test_a_subscription_reconnects_after_an_abnormal_closure() -> None:
    connections: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection) -> None:
        subscribe = orjson.loads(await ws.recv())
        connections.append(subscribe)
        cursor = f"e:{len(connections)}"
        await ws.send(orjson.dumps({"op": "subscribed", "id": "s", "cursor": cursor,
                                    "recovered": True}).decode())  # fmt: skip
        event = envelope(id=f"e:{len(connections) + 10}", datacontenttype="text/plain", data="x")
        await ws.send(orjson.dumps({"op": "event", "sub": "s", "event": event}).decode())
        if len(connections) == 1:
            ws.transport.abort()  # no close frame: 1006
        await ws.wait_closed()

    async with scripted(handler) as url, Client(url) as client:
        subscription = client.subscribe("a", via="ws")
        subscription._backoff.next = lambda: 0.0  # type: ignore[method-assign]
        got = await events(subscription, 2)
        await subscription.aclose()
    assert [e.id for e in got] == ["e:11", "e:12"]
    assert [c.get("since") for c in connections] == [None, "e:11"]


async def test_a_connection_that_stops_answering_pings_is_reconnected() -> None:
    connections = 0
    reconnected = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        await ws.recv()
        subscribed = {"op": "subscribed", "id": "s", "cursor": "e:1", "recovered": True}
        await ws.send(orjson.dumps(subscribed).decode())
        if connections == 1:
            ws.transport.pause_reading()  # a peer gone silent: pings go unanswered
            await reconnected.wait()
            ws.transport.abort()
        reconnected.set()
        await ws.wait_closed()

    async with scripted(handler) as url, Client(url, timeout=1, idle_timeout=0.4) as client:
        subscription = client.subscribe("a", via="ws")
        async with iterating(subscription):
            await until(lambda: connections == 2)


# -- the command line ------------------------------------------------------------------------


def tidings(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tidings", *args], capture_output=True, timeout=60, check=False
    )


@contextmanager
def background(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidings", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate()


def test_cli_publish_via_ws_prints_the_acknowledgement(server: RunningServer) -> None:
    result = tidings("publish", "cli/1", '{"total": 5}', "--via", "ws", "--url", server.url)
    assert result.returncode == 0, result.stderr
    ack = orjson.loads(result.stdout)
    assert ack == {"id": ack["id"], "replayed": False}
    history = httpx.get(f"{server.url}/history", params={"channel": "cli/1"}).json()
    assert [(e["id"], e["data"]) for e in history["events"]] == [(ack["id"], {"total": 5})]
    refused = tidings("publish", "a//b", "1", "--via", "ws", "--url", server.url)
    assert refused.returncode == 1
    [message] = refused.stderr.decode().splitlines()
    assert message.startswith("tidings: ")
    assert "'a//b'" in message


def test_cli_subscribe_via_ws_prints_the_envelopes(server: RunningServer) -> None:
    sent = [httpx.post(f"{server.url}/channels/s/{i}", content=b"%d" % i).json() for i in range(4)]
    args = ("subscribe", "s/*", "--via", "ws", "--since", sent[0]["id"], "--count", "4")
    with background(*args, "--url", server.url) as proc:
        assert proc.stdout is not None
        assert [orjson.loads(proc.stdout.readline()) for _ in range(3)] == sent[1:]
        live = httpx.post(f"{server.url}/channels/s/x", content=b"\x00\xff").json()
        assert orjson.loads(proc.stdout.readline()) == live  # binary: data_base64, as on SSE
        assert proc.wait(GUARD) == 0
