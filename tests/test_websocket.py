"""``GET /ws`` against a real server, with the ``websockets`` client and raw sockets.

What docs/websocket.md promises: the handshake's refusals, every message and its reply, the same
cursor as the other transports, resume, auth and grants, binary frames, keep-alive, lagged
clients, shutdown and compression.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from conftest import RunningServer
from streaming import SSEClient, envelope, publish, wait_for
from test_access import SECRET, token

TIMEOUT = 10


def ws_url(server: RunningServer, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/ws" + (f"?{query}" if query else "")


def send(ws: ClientConnection, **message: Any) -> None:
    ws.send(orjson.dumps(message).decode())


def recv(ws: ClientConnection) -> dict[str, Any]:
    message = ws.recv(timeout=TIMEOUT)
    assert isinstance(message, str), f"expected a text frame, got {message!r}"
    body: dict[str, Any] = orjson.loads(message)
    return body


def ask(ws: ClientConnection, **message: Any) -> dict[str, Any]:
    send(ws, **message)
    return recv(ws)


def subscribe(ws: ClientConnection, sub: str, *channels: str, **extra: Any) -> dict[str, Any]:
    reply = ask(ws, op="subscribe", id=sub, channels=list(channels), **extra)
    assert reply["op"] == "subscribed", reply
    return reply


def events(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    out = []
    while len(out) < count:
        message = recv(ws)
        assert message["op"] == "event", message
        out.append(message)
    return out


def closed_with(ws: ClientConnection) -> tuple[int | None, str]:
    """Read until the server closes; the close code and reason it sent."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=TIMEOUT)
    frame = info.value.rcvd
    return (frame.code, frame.reason) if frame is not None else (None, "")


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture
def ws(server: RunningServer) -> Iterator[ClientConnection]:
    with connect(ws_url(server), open_timeout=TIMEOUT) as conn:
        yield conn


# -- the handshake -----------------------------------------------------------------------------


def test_a_plain_get_is_told_to_upgrade(http: httpx.Client) -> None:
    response = http.get("/ws")
    assert response.status_code == 426
    assert response.headers["upgrade"] == "websocket"
    assert response.json()["error"] == "upgrade_required"


def refusal(url: str, **kwargs: Any) -> httpx.Response | Any:
    with pytest.raises(InvalidStatus) as info, connect(url, open_timeout=TIMEOUT, **kwargs):
        pass
    return info.value.response


def test_handshake_refusals_are_http_errors_with_a_json_body(server: RunningServer) -> None:
    base = ws_url(server)
    response = refusal(base.replace("/ws", "/sse"))
    assert response.status_code == 404
    assert orjson.loads(response.body)["error"] == "not_found"
    response = refusal(base + "?chanel=a")
    assert response.status_code == 400
    body = orjson.loads(response.body)
    assert body["error"] == "invalid_parameter" and "chanel" in body["detail"]
    response = refusal(base + "?channel=a/**/b")
    assert orjson.loads(response.body)["error"] == "invalid_pattern"
    response = refusal(base + "?channel=a&since=nope")
    assert orjson.loads(response.body)["error"] == "invalid_cursor"
    response = refusal(base + "?since=abc:1")
    assert response.status_code == 400 and b"since" in response.body


def test_a_malformed_upgrade_is_refused_with_400(server: RunningServer) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"  # no Sec-WebSocket-Key
        )
        answer = sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    document = orjson.loads(body)
    assert document["error"] == "bad_request" and "Sec-WebSocket-Key" in document["detail"]


def test_origins_not_on_the_list_are_refused_at_the_handshake(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(http_origins="https://app.example")
    response = refusal(ws_url(server), origin="https://evil.example")
    assert response.status_code == 403
    assert orjson.loads(response.body)["error"] == "origin_not_allowed"
    with connect(ws_url(server), origin="https://app.example") as ws:
        assert ask(ws, op="ping", id=1) == {"op": "pong", "id": 1}


def test_open_connections_count_against_the_stream_limit(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(limits_max_streams_per_address=1)
    with connect(ws_url(server)) as first:
        response = refusal(ws_url(server))
        assert response.status_code == 429
        assert orjson.loads(response.body)["error"] == "too_many_connections"
        assert ask(first, op="ping") == {"op": "pong"}
    # Closing frees the slot.
    wait_for(lambda: server.node.context.limits.streams.total == 0, what="slot released")
    with connect(ws_url(server)) as again:
        assert ask(again, op="ping") == {"op": "pong"}


# -- subscribe, events, the same cursor everywhere ---------------------------------------------


def test_subscribe_then_events_published_over_http_with_their_cursor(
    ws: ClientConnection, http: httpx.Client
) -> None:
    reply = subscribe(ws, "orders", "orders/**")
    assert reply["recovered"] is True and reply["id"] == "orders"
    cursors = [publish(http, "orders/1", {"n": 1}), publish(http, "users/1", 2)]
    cursors.append(
        publish(http, "orders/2/items", content=b"plain", headers={"content-type": "text/plain"})
    )
    got = events(ws, 2)
    assert [m["event"]["id"] for m in got] == [cursors[0], cursors[2]]
    assert all(m["sub"] == "orders" for m in got)
    assert got[0]["event"]["data"] == {"n": 1}
    assert got[1]["event"]["data"] == "plain"
    # Byte for byte the envelope the other transports send.
    history = http.get("/history", params={"channel": "orders/**", "since": reply["cursor"]}).json()
    assert [e for e in history["events"]] == [m["event"] for m in got]


def test_publish_over_websocket_reaches_sse_long_poll_and_websocket_with_one_cursor(
    server: RunningServer, http: httpx.Client
) -> None:
    start = http.get("/healthz").json()["cursor"]
    with (
        SSEClient(server.url, "chat/**") as sse,
        connect(ws_url(server)) as listener,
        connect(ws_url(server)) as publisher,
    ):
        sse.subscribed()
        subscribe(listener, 7, "chat/*")  # an integer id works too
        ack = ask(publisher, op="publish", id="p1", channel="chat/lobby", type="chat.line",
                  data={"text": "hi"})  # fmt: skip
        assert ack == {"op": "published", "id": "p1", "cursor": ack["cursor"], "replayed": False}
        cursor = ack["cursor"]
        [message] = events(listener, 1)
        assert message["sub"] == 7 and message["event"]["id"] == cursor
        assert message["event"]["type"] == "chat.line" and message["event"]["data"] == {
            "text": "hi"
        }
        [streamed] = sse.events(1)
        assert streamed.id == cursor and envelope(streamed) == message["event"]
    polled = http.get("/poll", params={"channel": "chat/**", "since": start, "wait": 5}).json()
    assert [e["id"] for e in polled["events"]] == [cursor]
    assert polled["events"][0] == message["event"]


def test_subscribe_in_the_url(server: RunningServer, http: httpx.Client) -> None:
    first = publish(http, "news/a", 1)
    with connect(ws_url(server, f"channel=news/*&channel=misc&since={first}")) as ws:
        opening = recv(ws)
        assert opening["op"] == "subscribed" and opening["id"] == "url"
        assert opening["cursor"] == first
        second = publish(http, "news/b", 2)
        [message] = events(ws, 1)
        assert message["sub"] == "url" and message["event"]["id"] == second


def test_overlapping_subscriptions_each_get_the_event(
    ws: ClientConnection, http: httpx.Client
) -> None:
    subscribe(ws, "all", "a/**")
    subscribe(ws, "one", "a/b")
    cursor = publish(http, "a/b", 1)
    got = events(ws, 2)
    assert sorted(m["sub"] for m in got) == ["all", "one"]
    assert {m["event"]["id"] for m in got} == {cursor}


def test_unsubscribe_stops_events_and_reports_where_it_stopped(
    ws: ClientConnection, http: httpx.Client
) -> None:
    subscribe(ws, "s", "x")
    cursor = publish(http, "x", 1)
    events(ws, 1)
    reply = ask(ws, op="unsubscribe", id=5, sub="s")
    assert reply == {"op": "unsubscribed", "id": 5, "sub": "s", "cursor": cursor}
    publish(http, "x", 2)
    assert ask(ws, op="ping", id="after") == {"op": "pong", "id": "after"}  # no event between
    reply = ask(ws, op="unsubscribe", id=6, sub="s")
    assert reply["op"] == "error" and reply["error"] == "not_subscribed" and reply["id"] == 6
    subscribe(ws, "s", "x")  # the id is free again


def test_subscription_ids_are_unique_per_connection_and_bounded(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(websocket_max_subscriptions=2)
    with connect(ws_url(server)) as ws:
        subscribe(ws, "a", "x")
        reply = ask(ws, op="subscribe", id="a", channels=["y"])
        assert reply["error"] == "duplicate_subscription" and reply["id"] == "a"
        subscribe(ws, "b", "y")
        reply = ask(ws, op="subscribe", id="c", channels=["z"])
        assert reply["error"] == "too_many_subscriptions"
        assert "websocket.max_subscriptions" in reply["detail"]


# -- resume ------------------------------------------------------------------------------------


def test_resume_after_a_dropped_connection_delivers_exactly_the_missed_events(
    server: RunningServer, http: httpx.Client
) -> None:
    with connect(ws_url(server)) as ws:
        subscribe(ws, "s", "feed/**")
        before = [publish(http, "feed/a", i) for i in range(3)]
        got = events(ws, 3)
        assert [m["event"]["id"] for m in got] == before
        last = got[-1]["event"]["id"]
        # Drop the TCP connection without a close handshake.
        ws.socket.shutdown(socket.SHUT_RDWR)
    missed = [publish(http, "feed/b", i) for i in range(5)]
    publish(http, "elsewhere", 0)
    with connect(ws_url(server)) as ws:
        reply = subscribe(ws, "s", "feed/**", since=last)
        assert reply["cursor"] == last and reply["recovered"] is True
        live = publish(http, "feed/c", 9)
        got = events(ws, 6)
        assert [m["event"]["id"] for m in got] == [*missed, live]
        assert ask(ws, op="ping") == {"op": "pong"}  # and nothing more


def test_a_long_replay_arrives_in_order_with_live_events_after_it(
    server: RunningServer, http: httpx.Client
) -> None:
    start = http.get("/healthz").json()["cursor"]
    batch = [{"channel": "bulk", "data": i} for i in range(1000)]
    cursors = [e["id"] for e in http.post("/publish", json={"events": batch}).json()["events"]]
    cursors += [e["id"] for e in http.post("/publish", json={"events": batch}).json()["events"]]
    with connect(ws_url(server)) as ws:
        subscribe(ws, "s", "bulk", since=start)
        cursors.append(publish(http, "bulk", "live"))
        got = events(ws, len(cursors))
        assert [m["event"]["id"] for m in got] == cursors


def test_a_cursor_outside_history_gets_recovered_false(
    ws: ClientConnection, http: httpx.Client
) -> None:
    reply = subscribe(ws, "s", "x", since="0ther:5")
    assert reply["recovered"] is False and "another log epoch" in reply["reason"]
    assert reply["cursor"] == http.get("/healthz").json()["cursor"]
    cursor = publish(http, "x", 1)
    [message] = events(ws, 1)
    assert message["event"]["id"] == cursor


def test_events_removed_by_retention_get_recovered_false(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(log_backend="memory", log_max_events=3)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        first = publish(http, "x", 0)
        for i in range(5):
            publish(http, "x", i)
        with connect(ws_url(server)) as ws:
            reply = subscribe(ws, "s", "x", since=first)
            assert reply["recovered"] is False and "retention" in reply["reason"]


# -- publish -----------------------------------------------------------------------------------


def test_publish_errors_are_replies_and_the_connection_stays_usable(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(http_max_event_bytes=100)
    with connect(ws_url(server)) as ws:
        reply = ask(ws, op="publish", id=1, channel="bad//name", data=1)
        assert reply["op"] == "error" and reply["error"] == "invalid_channel" and reply["id"] == 1
        reply = ask(ws, op="publish", id=2, channel="x", data="y" * 200)
        assert reply["error"] == "payload_too_large" and "http.max_event_bytes" in reply["detail"]
        reply = ask(ws, op="publish", id=3, channel="x", type="tidings.fake", data=1)
        assert reply["error"] == "invalid_event"
        reply = ask(ws, op="publish", id=4, channel="x", data_base64="!!")
        assert reply["error"] == "invalid_event"
        assert ask(ws, op="publish", id=5, channel="x", data=1)["op"] == "published"


def test_publish_data_forms_and_idempotency(ws: ClientConnection) -> None:
    subscribe(ws, "s", "forms")
    send(ws, op="publish", id=1, channel="forms", data={"a": [1, 2]})
    send(ws, op="publish", id=2, channel="forms", data="words", datacontenttype="text/plain")
    send(ws, op="publish", id=3, channel="forms", data_base64=base64.b64encode(b"\0\1").decode())
    send(ws, op="publish", id=4, channel="forms", data=1, idempotency_key="k1")
    received = [recv(ws) for _ in range(8)]  # four acks and four events, in any interleaving
    acks = {m["id"]: m for m in received if m["op"] == "published"}
    by_cursor = {m["event"]["id"]: m["event"] for m in received if m["op"] == "event"}
    assert sorted(acks) == [1, 2, 3, 4] and len(by_cursor) == 4
    assert by_cursor[acks[1]["cursor"]]["data"] == {"a": [1, 2]}
    assert by_cursor[acks[2]["cursor"]]["data"] == "words"
    assert by_cursor[acks[3]["cursor"]]["data_base64"] == "AAE="
    assert by_cursor[acks[3]["cursor"]]["datacontenttype"] == "application/octet-stream"
    # A retry with the same key is the same event: acknowledged again, not published again.
    replay = ask(ws, op="publish", id=5, channel="forms", data=2, idempotency_key="k1")
    assert replay == {"op": "published", "id": 5, "cursor": acks[4]["cursor"], "replayed": True}


def test_pipelined_publishes_are_all_acknowledged(ws: ClientConnection) -> None:
    for i in range(300):
        send(ws, op="publish", id=i, channel="pipe", data=i)
    acks = [recv(ws) for _ in range(300)]
    assert sorted(a["id"] for a in acks) == list(range(300))
    assert all(a["op"] == "published" for a in acks)
    assert len({a["cursor"] for a in acks}) == 300


def test_publish_rate_limit_is_a_reply_with_retry_after(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(limits_publish_rate=1, limits_publish_burst=2)
    with connect(ws_url(server)) as ws:
        replies = [ask(ws, op="publish", id=i, channel="x", data=i) for i in range(3)]
        assert [r["op"] for r in replies] == ["published", "published", "error"]
        assert replies[2]["error"] == "rate_limited" and replies[2]["retry_after"] > 0


# -- binary frames -----------------------------------------------------------------------------


def test_binary_subscriptions_get_raw_bytes_and_binary_frames_publish(
    ws: ClientConnection, http: httpx.Client
) -> None:
    subscribe(ws, "b", "files", binary=True)
    blob = bytes(range(256))
    publish(http, "files", content=blob, headers={"content-type": "application/octet-stream"})
    frame = ws.recv(timeout=TIMEOUT)
    assert isinstance(frame, bytes)
    head, _, data = frame.partition(b"\n")
    message = orjson.loads(head)
    assert message["op"] == "event" and message["sub"] == "b" and data == blob
    assert "data_base64" not in message["event"] and "data" not in message["event"]
    # JSON events still come as text.
    publish(http, "files", {"j": 1})
    assert recv(ws)["event"]["data"] == {"j": 1}
    # Publishing raw bytes: JSON, newline, data.
    ws.send(orjson.dumps({"op": "publish", "id": "bin", "channel": "files"}) + b"\n" + blob)
    replies = [ws.recv(timeout=TIMEOUT), ws.recv(timeout=TIMEOUT)]
    ack = next(orjson.loads(r) for r in replies if isinstance(r, str))
    assert ack["op"] == "published" and ack["id"] == "bin"
    echoed = next(r for r in replies if isinstance(r, bytes))
    assert echoed.partition(b"\n")[2] == blob
    stored = http.get(
        "/history", params={"channel": "files", "since": ack["cursor"].split(":")[0] + ":0"}
    )
    assert stored.json()["events"][-1]["data_base64"] == base64.b64encode(blob).decode()


# -- auth and grants ---------------------------------------------------------------------------


@pytest.fixture
def secured(make_server: Callable[..., RunningServer]) -> RunningServer:
    return make_server(
        auth_jwt_algorithms="HS256", auth_jwt_secret=SECRET, websocket_auth_timeout="1s"
    )


def test_without_a_credential_only_auth_and_ping_are_served(secured: RunningServer) -> None:
    with connect(ws_url(secured)) as ws:
        assert ask(ws, op="ping") == {"op": "pong"}
        reply = ask(ws, op="subscribe", id="s", channels=["orders/**"])
        assert reply["error"] == "unauthorized" and reply["id"] == "s"
        reply = ask(ws, op="auth", id=1, token="not-a-jwt")
        assert reply["error"] == "unauthorized" and reply["id"] == 1
        good = token(subscribe=["orders/**"], publish=["orders/*"], sub="alice")
        reply = ask(ws, op="auth", id=2, token=good)
        assert reply["op"] == "authenticated" and reply["subject"] == "alice"
        assert reply["expires"].endswith("Z")
        subscribe(ws, "s", "orders/**")
        reply = ask(ws, op="subscribe", id="t", channels=["users/**"])
        assert reply["error"] == "forbidden" and "users/**" in reply["detail"]
        reply = ask(ws, op="publish", id="p", channel="users/1", data=1)
        assert reply["error"] == "forbidden"
        ack = ask(ws, op="publish", id="q", channel="orders/1", data=1)
        if ack["op"] == "event":
            ack = recv(ws)
        assert ack["op"] == "published"


def test_no_credential_within_the_auth_timeout_closes_4401(secured: RunningServer) -> None:
    with connect(ws_url(secured)) as ws:
        code, reason = closed_with(ws)
    assert code == 4401 and "websocket.auth_timeout" in reason


def test_a_bad_handshake_token_closes_4401_with_the_reason(secured: RunningServer) -> None:
    with connect(ws_url(secured, "token=nonsense")) as ws:
        code, reason = closed_with(ws)
    assert code == 4401 and "malformed token" in reason
    expired = token(subscribe=["**"], exp=int(time.time()) - 100)
    headers = {"Authorization": f"Bearer {expired}"}
    with connect(ws_url(secured), additional_headers=headers) as ws:
        code, reason = closed_with(ws)
    assert code == 4401 and "expired" in reason


def test_a_forbidden_channel_in_the_url_closes_4403(secured: RunningServer) -> None:
    credential = token(subscribe=["orders/**"])
    with connect(ws_url(secured, f"token={credential}&channel=users/**")) as ws:
        code, reason = closed_with(ws)
    assert code == 4403 and "users/**" in reason
    with connect(ws_url(secured, f"token={credential}&channel=orders/*")) as ws:
        assert recv(ws)["op"] == "subscribed"


def test_a_token_expiring_during_the_connection_closes_4401(secured: RunningServer) -> None:
    short = token(subscribe=["**"], exp=int(time.time()) + 2)
    with connect(ws_url(secured, f"token={short}")) as ws:
        subscribe(ws, "s", "x")
        code, reason = closed_with(ws)
    assert code == 4401 and "expired" in reason


def test_a_narrower_new_credential_closes_4403(secured: RunningServer) -> None:
    with connect(ws_url(secured, f"token={token(subscribe=['**'])}")) as ws:
        subscribe(ws, "wide", "users/**")
        reply = ask(ws, op="auth", id=1, token=token(subscribe=["orders/**"]))
        assert reply["op"] == "authenticated"
        code, reason = closed_with(ws)
    assert code == 4403 and "users/**" in reason


def test_cookie_credentials_work_for_allowed_origins(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(
        auth_jwt_algorithms="HS256", auth_jwt_secret=SECRET, http_origins="https://app.example"
    )
    headers = {"Cookie": f"tidings_token={token(subscribe=['**'])}"}
    with connect(
        ws_url(server, "channel=x"),
        origin="https://app.example",
        additional_headers=headers,
    ) as ws:
        assert recv(ws)["op"] == "subscribed"
    response = refusal(
        ws_url(server, "channel=x"), origin="https://evil.example", additional_headers=headers
    )
    assert response.status_code == 403


# -- keep-alive, slow clients, shutdown, compression -------------------------------------------


class RawClient:
    """A WebSocket client on a bare socket that answers nothing and reads only when told."""

    def __init__(self, server: RunningServer, query: str = "", rcvbuf: int | None = None) -> None:
        port = int(server.url.rsplit(":", 1)[1])
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        path = "/ws" + (f"?{query}" if query else "")
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(4096)
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def send_text(self, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert len(payload) < 126
        self.sock.sendall(bytes((0x81, 0x80 | len(payload))) + mask + masked)

    def frames(self) -> Iterator[tuple[int, bytes]]:
        """(opcode, payload) of every frame until the connection ends."""
        while True:
            while True:
                if len(self.buffer) >= 2:
                    length = self.buffer[1] & 0x7F
                    start = 2 + {126: 2, 127: 8}.get(length, 0)
                    if len(self.buffer) >= start:
                        if length == 126:
                            length = struct.unpack("!H", self.buffer[2:4])[0]
                        elif length == 127:
                            length = struct.unpack("!Q", self.buffer[2:10])[0]
                        if len(self.buffer) >= start + length:
                            break
                try:
                    chunk = self.sock.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                self.buffer += chunk
            opcode = self.buffer[0] & 0x0F
            payload = self.buffer[start : start + length]
            self.buffer = self.buffer[start + length :]
            yield opcode, payload

    def close(self) -> None:
        self.sock.close()


def test_a_client_that_never_answers_pings_is_closed(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(websocket_ping_interval="200ms", websocket_ping_timeout="300ms")
    raw = RawClient(server)
    try:
        seen = [opcode for opcode, _ in raw.frames()]
        # Pings (0x9), then a close frame (0x8) with 1011, then the end of the stream.
        assert seen[0] == 0x9 and seen[-1] == 0x8
    finally:
        raw.close()
    # A client that answers (the websockets library does) stays open across many intervals.
    with connect(ws_url(server)) as ws:
        time.sleep(1.2)
        assert ask(ws, op="ping") == {"op": "pong"}


def test_close_frame_of_an_unanswered_ping_says_why(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(websocket_ping_interval="200ms", websocket_ping_timeout="300ms")
    raw = RawClient(server)
    try:
        close = next(payload for opcode, payload in raw.frames() if opcode == 0x8)
    finally:
        raw.close()
    assert struct.unpack("!H", close[:2])[0] == 1011
    assert close[2:] == b"keepalive ping timeout"


def test_a_client_that_never_reads_is_closed_as_lagged_and_others_are_served(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(hub_queue_size=16)
    slow = RawClient(server, "channel=flood", rcvbuf=4096)
    with connect(ws_url(server)) as healthy, httpx.Client(base_url=server.url) as http:
        subscribe(healthy, "h", "flood")
        blob = "x" * 8000
        cursors = []
        for _ in range(100):  # 6 MB: past any socket buffer (batches stay under the queue bound)
            batch = [{"channel": "flood", "data": blob} for _ in range(8)]
            answer = http.post("/publish", json={"events": batch}).json()["events"]
            cursors += [e["id"] for e in answer]
            got = events(healthy, len(answer))  # the healthy client keeps up all along
            assert [m["event"]["id"] for m in got] == cursors[-len(answer) :]
        metrics = server.hub.metrics
        wait_for(lambda: metrics.lagged.labels("ws")._value.get() == 1, what="lagged")
        # The server dropped the slow connection (close handshake never finished) and holds
        # nothing for it any more.
        wait_for(lambda: len(server.node.websockets.open) == 1, timeout=10, what="dropped")
        assert server.hub.subscriber_count == 1
    # What the slow client finally reads: the events up to where it fell behind, then 4001.
    frames = list(slow.frames())
    slow.close()
    close = [payload for opcode, payload in frames if opcode == 0x8]
    if close:  # the socket may have been dropped before the close frame fit in its buffer
        assert struct.unpack("!H", close[0][:2])[0] == 4001
        assert b"lagged" in close[0]


def test_lagged_close_code_reaches_a_client_that_reads_late(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(hub_queue_size=4)
    slow = RawClient(server, "channel=burst")
    try:
        _, payload = next(slow.frames())
        assert orjson.loads(payload)["op"] == "subscribed"
        # Events arrive faster than one loop turn delivers them: one batch larger than the
        # queue overflows it before the connection is written.
        with httpx.Client(base_url=server.url) as http:
            batch = [{"channel": "burst", "data": i} for i in range(50)]
            assert http.post("/publish", json={"events": batch}).status_code == 201
        frames = list(slow.frames())
    finally:
        slow.close()
    assert frames[-1][0] == 0x8
    code = struct.unpack("!H", frames[-1][1][:2])[0]
    assert code == 4001 and b"resume" in frames[-1][1]


def test_shutdown_closes_with_going_away(make_server: Callable[..., RunningServer]) -> None:
    server = make_server()
    with connect(ws_url(server)) as ws:
        subscribe(ws, "s", "x")
        server.call(server.node.request_shutdown)
        code, reason = closed_with(ws)
    assert code == 1001 and "reconnect" in reason


@pytest.mark.parametrize("compression", [False, True])
def test_compression_is_off_by_default_and_works_when_on(
    make_server: Callable[..., RunningServer], compression: bool
) -> None:
    server = make_server(websocket_compression=compression)
    with connect(ws_url(server)) as ws, httpx.Client(base_url=server.url) as http:  # offers deflate
        extensions = ws.protocol.extensions
        assert bool(extensions) is compression
        subscribe(ws, "s", "z")
        cursors = [publish(http, "z", {"i": i, "pad": "y" * 500}) for i in range(3)]
        assert [m["event"]["id"] for m in events(ws, 3)] == cursors
        assert ask(ws, op="publish", id=1, channel="z", data=1)["op"] in ("published", "event")


def test_metrics_count_websocket_subscribers_and_deliveries(
    server: RunningServer, ws: ClientConnection, http: httpx.Client
) -> None:
    subscribe(ws, "s", "m")
    publish(http, "m", 1)
    events(ws, 1)
    text = http.get("/metrics").text
    assert 'tidings_subscribers{transport="ws"} 1.0' in text
    assert 'tidings_delivered_events_total{transport="ws"} 1.0' in text
