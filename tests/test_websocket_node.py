"""``GET /ws`` driven by another implementation: Node's ``ws`` client (tests/node).

Each Node client is ``tests/node/relay.js``: it reads commands (frames to send) as JSON lines
on stdin and prints what happens on the connection (messages, binary frames, the close code)
as JSON lines on stdout, which these tests assert on against docs/websocket.md. Events are
published over HTTP, and Node's publishes are checked from a Python ``websockets`` client and
``GET /history``: every transport shows the same envelope under the same cursor.

Needs ``node`` and ``npm``; the ``ws`` package is installed from tests/node/package-lock.json
(``npm ci``) when tests/node/node_modules is missing. Without them the tests skip with the
reason on a laptop, and fail under ``CI=true`` (CI must never skip them silently).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import pytest
from websockets.sync.client import connect

from conftest import RunningServer

NODE = shutil.which("node")
NPM = shutil.which("npm")
NODE_DIR = Path(__file__).parent / "node"
RELAY = NODE_DIR / "relay.js"
SECRET = "node-ws-test-secret-with-32-bytes-or-more"
TIMEOUT = 10.0  # seconds any single wait may take before it counts as a hang

if NODE is None or NPM is None:
    reason = (
        "Node.js is not installed: node and npm are needed (Debian: apt-get install nodejs npm)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the tests against Node's ws client", pytrace=False)
    pytestmark = pytest.mark.skip(reason=reason)

ServerFactory = Callable[..., RunningServer]


@pytest.fixture(scope="session")
def node_ws() -> None:
    """The ``ws`` package in tests/node/node_modules: ``npm ci`` (from the lock) if absent."""
    if (NODE_DIR / "node_modules" / "ws" / "package.json").is_file():
        return
    assert NPM is not None
    verb = "ci" if (NODE_DIR / "package-lock.json").is_file() else "install"
    command = [NPM, verb, "--no-audit", "--no-fund"]
    try:
        done = subprocess.run(
            command, cwd=NODE_DIR, capture_output=True, text=True, timeout=300, check=False
        )
        failure = None if done.returncode == 0 else (done.stderr or done.stdout)[-2000:]
    except subprocess.TimeoutExpired:
        failure = "timed out after 300 s"
    if failure is not None:
        reason = f"`npm {verb}` in tests/node failed, so the ws package is missing: {failure}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


class Node:
    """One ``relay.js`` process: one WebSocket connection made by Node's ``ws``."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        assert NODE is not None
        args = [NODE, str(RELAY), url]
        if headers:
            args.append(json.dumps(headers))
        self.proc = subprocess.Popen(
            args,
            cwd=NODE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr.extend(self.proc.stderr)

    def command(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def send(self, message: dict[str, Any] | str) -> None:
        self.command(text=message)

    def send_binary(self, message: dict[str, Any], data: bytes) -> None:
        self.command(binary=message, data=base64.b64encode(data).decode())

    def next(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        try:
            item = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"Node reported nothing within {timeout} s") from None
        if item is None:
            self.lines.put(None)
            raise AssertionError(f"the Node client exited; stderr: {''.join(self.stderr)}")
        return item

    def opened(self) -> Node:
        assert self.next() == {"kind": "open"}
        return self

    def message(self) -> dict[str, Any]:
        """The next text message (any other report fails the test)."""
        item = self.next()
        assert item["kind"] == "text", item
        message: dict[str, Any] = item["message"]
        return message

    def reply(self, op: str, **fields: Any) -> dict[str, Any]:
        """The next message, which must be ``op`` with these fields (and maybe more)."""
        message = self.message()
        assert message["op"] == op, message
        for name, value in fields.items():
            assert message.get(name) == value, (name, message)
        return message

    def event(self, sub: str | int) -> dict[str, Any]:
        message = self.reply("event", sub=sub)
        assert set(message) == {"op", "sub", "event"}, message
        envelope: dict[str, Any] = message["event"]
        return envelope

    def closed(self, timeout: float = TIMEOUT) -> tuple[int, str]:
        """The close code and reason Node saw; reports before it fail the test."""
        item = self.next(timeout)
        assert item["kind"] == "close", item
        return item["code"], item["reason"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # relay.js closes its connection and exits
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.fixture
def node(node_ws: None) -> Iterator[Callable[..., Node]]:
    """Start Node clients: ``node(url, headers=None)``; all stopped at the end of the test."""
    started: list[Node] = []

    def start(url: str, headers: dict[str, str] | None = None) -> Node:
        client = Node(url, headers)
        started.append(client)
        return client

    yield start
    for client in started:
        client.stop()


def ws_url(server: RunningServer, *query: tuple[str, str]) -> str:
    url = server.url.replace("http://", "ws://", 1) + "/ws"
    return url + ("?" + urlencode(query) if query else "")


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        yield client


def publish(
    http: httpx.Client,
    channel: str,
    data: bytes | str = b"{}",
    content_type: str = "application/json",
    token: str | None = None,
) -> dict[str, Any]:
    """POST /channels/{channel}; returns the envelope the server answered with."""
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    body = data.encode() if isinstance(data, str) else data
    response = http.post(f"/channels/{channel}", content=body, headers=headers)
    assert response.status_code == 201, response.text
    envelope: dict[str, Any] = response.json()
    return envelope


def head_cursor(http: httpx.Client) -> str:
    cursor: str = http.get("/healthz").json()["cursor"]
    return cursor


def token(subscribe: list[str], publish: list[str] | None = None, **claims: Any) -> str:
    payload: dict[str, Any] = {
        "sub": "node-tester",
        "exp": int(time.time()) + 600,
        "tidings": {"subscribe": subscribe, "publish": publish or [], "admin": False},
    }
    payload.update(claims)
    return jwt.encode(payload, SECRET, algorithm="HS256")


# -- subscribing -----------------------------------------------------------------------------


def test_node_subscribes_by_message_and_gets_each_http_event_with_its_cursor(
    server: RunningServer, http: httpx.Client, node: Callable[..., Node]
) -> None:
    before = publish(http, "orders/0", b'{"old": true}')  # history: not for a new subscription
    client = node(ws_url(server)).opened()
    client.send({"op": "subscribe", "id": "orders", "channels": ["orders/**"]})
    subscribed = client.message()
    assert subscribed == {
        "op": "subscribed",
        "id": "orders",
        "cursor": before["id"],
        "recovered": True,
    }

    published = [
        publish(http, "orders/1", b'{"total": 12, "items": [1, 2]}'),
        publish(http, "other/1", b"1"),  # matches no pattern of the subscription
        publish(http, "orders/1/status", "paid ✓", "text/plain; charset=utf-8"),
        publish(http, "orders/2", b"\x00\x01\xff\n", "application/octet-stream"),
    ]
    expected = [e for e in published if e["channel"].startswith("orders/")]
    got = [client.event("orders") for _ in expected]
    assert got == expected  # the envelope of POST /channels, byte for byte: same cursor as id
    assert got[-1]["data_base64"] == base64.b64encode(b"\x00\x01\xff\n").decode()

    marker = publish(http, "orders/3")
    assert client.event("orders") == marker  # nothing else came in between


def test_node_subscribes_with_channels_in_the_url(
    server: RunningServer, http: httpx.Client, node: Callable[..., Node]
) -> None:
    client = node(ws_url(server, ("channel", "orders/**"), ("channel", "alerts"))).opened()
    subscribed = client.message()
    assert subscribed == {
        "op": "subscribed",
        "id": "url",
        "cursor": head_cursor(http),
        "recovered": True,
    }
    first = publish(http, "alerts", b'"fire"')
    publish(http, "alerts/x")  # "alerts" is not "alerts/**"
    second = publish(http, "orders/9", b"[1]")
    assert [client.event("url"), client.event("url")] == [first, second]

    # The URL subscription is an ordinary one: more can be added by message.
    client.send({"op": "subscribe", "id": 2, "channels": "alerts/*"})
    client.reply("subscribed", id=2, cursor=second["id"], recovered=True)
    third = publish(http, "alerts/y")
    assert client.event(2) == third


def test_node_subscribes_in_the_url_with_since_and_gets_history_then_live_events(
    server: RunningServer, http: httpx.Client, node: Callable[..., Node]
) -> None:
    old = [publish(http, f"feed/{i}", f'{{"n": {i}}}') for i in range(4)]
    client = node(ws_url(server, ("channel", "feed/*"), ("since", old[0]["id"]))).opened()
    subscribed = client.message()
    assert subscribed == {
        "op": "subscribed",
        "id": "url",
        "cursor": old[0]["id"],
        "recovered": True,
    }
    assert [client.event("url") for _ in old[1:]] == old[1:]
    live = publish(http, "feed/live")
    assert client.event("url") == live


# -- publishing ------------------------------------------------------------------------------


def test_node_publishes_and_python_and_history_see_the_same_cursor(
    server: RunningServer, http: httpx.Client, node: Callable[..., Node]
) -> None:
    with connect(ws_url(server), open_timeout=TIMEOUT) as python:
        python.send(json.dumps({"op": "subscribe", "id": "py", "channels": ["chat/**"]}))
        subscribed = json.loads(python.recv(timeout=TIMEOUT))
        assert subscribed["op"] == "subscribed" and subscribed["id"] == "py", subscribed
        start = subscribed["cursor"]

        def python_event() -> dict[str, Any]:
            message = json.loads(python.recv(timeout=TIMEOUT))
            assert message["op"] == "event" and message["sub"] == "py", message
            envelope: dict[str, Any] = message["event"]
            return envelope

        client = node(ws_url(server)).opened()
        client.send(
            {
                "op": "publish",
                "id": "p1",
                "channel": "chat/room",
                "type": "said",
                "data": {"t": "hi"},
            }
        )
        p1 = client.reply("published", id="p1", replayed=False)
        assert set(p1) == {"op", "id", "cursor", "replayed"}
        e1 = python_event()
        assert e1["id"] == p1["cursor"]
        assert (e1["channel"], e1["type"], e1["data"]) == ("chat/room", "said", {"t": "hi"})
        assert e1["datacontenttype"] == "application/json"

        # Text; then the same idempotency key twice: one event, the second ack replayed.
        client.send(
            {
                "op": "publish",
                "id": 2,
                "channel": "chat/room",
                "data": "héllo",
                "datacontenttype": "text/plain; charset=utf-8",
            }
        )
        p2 = client.reply("published", id=2, replayed=False)
        retry = {"op": "publish", "channel": "chat/room", "data": 1, "idempotency_key": "k-1"}
        client.send({**retry, "id": "first"})
        p3 = client.reply("published", id="first", replayed=False)
        client.send({**retry, "id": "retry"})
        client.reply("published", id="retry", cursor=p3["cursor"], replayed=True)

        # Binary frame: JSON, newline, raw bytes (a newline among them).
        raw = b"\x89PNG\r\n\x1a\n\x00\xff"
        client.send_binary({"op": "publish", "id": "b", "channel": "chat/files"}, raw)
        p4 = client.reply("published", id="b", replayed=False)

        events = [e1] + [python_event() for _ in range(3)]
        assert [e["id"] for e in events] == [p1["cursor"], p2["cursor"], p3["cursor"], p4["cursor"]]
        assert events[1]["data"] == "héllo"
        assert events[3]["datacontenttype"] == "application/octet-stream"
        assert base64.b64decode(events[3]["data_base64"]) == raw

    page = http.get("/history", params={"channel": "chat/**", "since": start}).json()
    assert page["events"] == events  # the same envelopes, under the same cursors


# -- resuming ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["message", "url"])
def test_node_resumes_after_reconnecting_with_exactly_the_missed_events(
    server: RunningServer, http: httpx.Client, node: Callable[..., Node], how: str
) -> None:
    def subscribe(since: str | None) -> Node:
        if how == "url":
            query = [("channel", "jobs/**")] + ([("since", since)] if since else [])
            client = node(ws_url(server, *query)).opened()
            sub = "url"
        else:
            client = node(ws_url(server)).opened()
            sub = "jobs"
            client.send({"op": "subscribe", "id": sub, "channels": ["jobs/**"], "since": since})
        subscribed = client.reply("subscribed", id=sub, recovered=True)
        if since is not None:
            assert subscribed["cursor"] == since
        return client

    first = subscribe(None)
    seen = [publish(http, "jobs/1", b'{"step": 1}'), publish(http, "jobs/2", b'{"step": 2}')]
    sub = "url" if how == "url" else "jobs"
    assert [first.event(sub), first.event(sub)] == seen
    cursor = seen[-1]["id"]
    first.command(close=1000)
    assert first.closed() == (1000, "")

    missed = [publish(http, f"jobs/{i}", f'{{"step": {i}}}') for i in range(3, 6)]
    publish(http, "other/1")
    second = subscribe(cursor)
    assert [second.event(sub) for _ in missed] == missed
    live = publish(http, "jobs/6")
    assert second.event(sub) == live  # no duplicate, no gap: the next one is the live event


# -- binary frames ------------------------------------------------------------------------------


def test_node_binary_subscription_gets_raw_bytes_after_the_newline(
    server: RunningServer, http: httpx.Client, node: Callable[..., Node]
) -> None:
    client = node(ws_url(server)).opened()
    client.send({"op": "subscribe", "id": "bin", "channels": ["files/**"], "binary": True})
    client.reply("subscribed", id="bin")

    raw = bytes(range(256)) + b"\n\n{}"
    blob = publish(http, "files/a", raw, "application/octet-stream")
    xml = publish(http, "files/b", "<a>x</a>", "application/xml")  # text, but not text/*
    doc = publish(http, "files/c", b'{"k": "v"}')
    note = publish(http, "files/d", "line", "text/plain")

    frames = [client.next() for _ in range(4)]
    for frame, envelope, data in ((frames[0], blob, raw), (frames[1], xml, b"<a>x</a>")):
        assert frame["kind"] == "binary", frame
        head = {k: v for k, v in envelope.items() if k != "data_base64"}
        assert frame["message"] == {"op": "event", "sub": "bin", "event": head}
        assert base64.b64decode(frame["data"]) == data
        assert base64.b64decode(envelope["data_base64"]) == data
    # JSON and text data still come in text frames, with the whole envelope.
    assert frames[2] == {"kind": "text", "message": {"op": "event", "sub": "bin", "event": doc}}
    assert frames[3] == {"kind": "text", "message": {"op": "event", "sub": "bin", "event": note}}

    # The same event for a subscription without "binary": base64 in a text frame.
    client.send({"op": "subscribe", "id": "b64", "channels": ["files/*"]})
    client.reply("subscribed", id="b64")
    again = publish(http, "files/e", raw, "application/octet-stream")
    frames = sorted((client.next() for _ in range(2)), key=lambda f: f["kind"])
    assert frames[0]["kind"] == "binary" and frames[0]["message"]["sub"] == "bin"
    assert base64.b64decode(frames[0]["data"]) == raw
    assert frames[1] == {"kind": "text", "message": {"op": "event", "sub": "b64", "event": again}}


# -- errors and close codes ----------------------------------------------------------------------


def test_node_bad_messages_get_errors_and_the_connection_stays_usable(
    server: RunningServer, http: httpx.Client, node: Callable[..., Node]
) -> None:
    client = node(ws_url(server)).opened()
    client.send({"op": "auth", "id": "a", "token": "anything"})  # auth is off
    assert client.message() == {
        "op": "authenticated",
        "id": "a",
        "subject": "anonymous",
        "expires": None,
    }

    def error(code: str, message_id: str | int | None = None) -> None:
        reply = client.message()
        expected = {"op", "error", "detail"} | ({"id"} if message_id is not None else set())
        assert set(reply) == expected, reply
        assert reply["op"] == "error" and reply["error"] == code, reply
        assert reply.get("id") == message_id
        assert reply["detail"], reply

    client.send("{not json")
    error("invalid_message")
    client.send({"op": "subscribe", "id": 1.5, "channels": ["a"]})
    error("invalid_message")
    client.send({"op": "nope", "id": 7})
    error("invalid_message", 7)
    client.send({"op": "ping", "id": "x", "colour": "red"})
    error("invalid_message", "x")
    client.send({"op": "subscribe", "id": "s", "channels": ["a//b"]})
    error("invalid_pattern", "s")
    client.send({"op": "subscribe", "id": "s", "channels": ["a"], "since": "not-a-cursor"})
    error("invalid_cursor", "s")
    client.send({"op": "unsubscribe", "id": 8, "sub": "never"})
    error("not_subscribed", 8)
    client.send({"op": "publish", "id": "p", "channel": "a/*", "data": 1})
    error("invalid_channel", "p")
    client.command(raw_binary=base64.b64encode(b"no newline here").decode())
    error("invalid_message")

    client.send({"op": "ping", "id": 9})
    assert client.message() == {"op": "pong", "id": 9}
    client.send({"op": "subscribe", "id": "s", "channels": ["a"]})
    client.reply("subscribed", id="s")
    client.send({"op": "subscribe", "id": "s", "channels": ["b"]})
    error("duplicate_subscription", "s")
    event = publish(http, "a", b"42")
    assert client.event("s") == event
    client.send({"op": "unsubscribe", "id": 10, "sub": "s"})
    assert client.message() == {"op": "unsubscribed", "id": 10, "sub": "s", "cursor": event["id"]}
    client.command(close=1000)
    assert client.closed() == (1000, "")


HANDSHAKE_REFUSALS = [
    ("/ws?colour=red", {}, 400, "invalid_parameter"),
    ("/ws?channel=a//b", {}, 400, "invalid_pattern"),
    ("/ws?channel=a&since=zz", {}, 400, "invalid_cursor"),
    ("/ws?since=351b154f:1", {}, 400, "invalid_parameter"),
    ("/wsx", {}, 404, "not_found"),
    ("/ws", {"Origin": "https://evil.example"}, 403, "origin_not_allowed"),
]


@pytest.mark.parametrize(("target", "headers", "status", "code"), HANDSHAKE_REFUSALS)
def test_node_sees_a_wrong_handshake_refused_with_an_http_error(
    make_server: ServerFactory,
    node: Callable[..., Node],
    target: str,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    server = make_server(http_origins="https://good.example")
    client = node(server.url.replace("http://", "ws://", 1) + target, headers)
    refused = client.next()
    assert refused["kind"] == "refused" and refused["status"] == status, refused
    body = json.loads(refused["body"])
    assert set(body) == {"error", "detail"} and body["error"] == code, body
    assert refused["headers"]["content-type"].startswith("application/json"), refused

    allowed = node(ws_url(server), {"Origin": "https://good.example"}).opened()
    allowed.send({"op": "ping"})
    assert allowed.message() == {"op": "pong"}


FULL = {
    "too_many_connections": {"limits_max_streams_per_address": 1},
    "rate_limited": {"limits_subscribe_rate": 1, "limits_subscribe_burst": 1},
}


def refused_second(make_server: ServerFactory, node: Callable[..., Node], code: str) -> Any:
    server = make_server(**FULL[code])
    node(ws_url(server)).opened()
    second = node(ws_url(server)).next()
    assert second["kind"] == "refused" and second["status"] == 429, second
    assert json.loads(second["body"])["error"] == code, second
    return second


@pytest.mark.parametrize("code", sorted(FULL))
def test_node_sees_the_handshake_refused_with_429_past_a_limit(
    make_server: ServerFactory, node: Callable[..., Node], code: str
) -> None:
    refused_second(make_server, node, code)


def test_node_sees_retry_after_on_a_rate_limited_handshake(
    make_server: ServerFactory, node: Callable[..., Node]
) -> None:
    headers = refused_second(make_server, node, "rate_limited")["headers"]
    assert int(headers.get("retry-after", "0")) >= 1, headers


def test_node_gets_rate_limited_with_retry_after_and_stays_usable(
    make_server: ServerFactory, node: Callable[..., Node]
) -> None:
    """The connection takes one token of limits.subscribe_burst, each subscribe one more."""
    server = make_server(limits_subscribe_rate=1, limits_subscribe_burst=2)
    client = node(ws_url(server)).opened()
    client.send({"op": "subscribe", "id": "a", "channels": ["a"]})
    client.reply("subscribed", id="a")
    client.send({"op": "subscribe", "id": "b", "channels": ["b"]})
    refused = client.reply("error", id="b", error="rate_limited")
    assert set(refused) == {"op", "id", "error", "detail", "retry_after"}, refused
    assert 0 < refused["retry_after"] <= 1, refused
    client.send({"op": "ping", "id": "p"})
    assert client.message() == {"op": "pong", "id": "p"}


def test_node_auth_counts_against_the_subscribe_rate(
    make_server: ServerFactory, node: Callable[..., Node]
) -> None:
    """The handshake, each auth (verifying a token costs CPU) and each subscribe take a token."""
    server = make_server(limits_subscribe_rate=1, limits_subscribe_burst=2)
    client = node(ws_url(server)).opened()
    client.send({"op": "auth", "id": "a", "token": "anything: auth is off"})
    client.reply("authenticated", id="a", subject="anonymous")
    client.send({"op": "subscribe", "id": "s", "channels": ["a"]})
    client.reply("error", id="s", error="rate_limited")


def test_node_gets_too_many_subscriptions_past_the_limit(
    make_server: ServerFactory, node: Callable[..., Node]
) -> None:
    server = make_server(websocket_max_subscriptions=2)
    client = node(ws_url(server, ("channel", "a"))).opened()
    client.reply("subscribed", id="url")
    client.send({"op": "subscribe", "id": 2, "channels": ["b"]})
    client.reply("subscribed", id=2)
    client.send({"op": "subscribe", "id": 3, "channels": ["c"]})
    client.reply("error", id=3, error="too_many_subscriptions")
    client.send({"op": "unsubscribe", "id": "u", "sub": "url"})
    client.reply("unsubscribed", id="u", sub="url")
    client.send({"op": "subscribe", "id": 3, "channels": ["c"]})
    client.reply("subscribed", id=3)


def test_node_sees_1009_for_a_message_over_max_message(
    make_server: ServerFactory, node: Callable[..., Node]
) -> None:
    server = make_server(websocket_max_message=1024)
    client = node(ws_url(server)).opened()
    client.send({"op": "ping", "id": "fits", "pad": "x" * 900})
    client.reply("error", id="fits", error="invalid_message")
    client.send({"op": "ping", "id": "too-big", "pad": "x" * 1024})
    code, _ = client.closed()
    assert code == 1009


def test_node_sees_1007_for_a_text_frame_that_is_not_utf8(
    server: RunningServer, node: Callable[..., Node]
) -> None:
    client = node(ws_url(server)).opened()
    client.command(raw_text=base64.b64encode(b'{"op":"ping","id":"\xff"}').decode())
    code, _ = client.closed()
    assert code == 1007


def test_node_sees_1001_when_the_server_shuts_down(
    make_server: ServerFactory, node: Callable[..., Node]
) -> None:
    server = make_server()
    client = node(ws_url(server, ("channel", "a"))).opened()
    client.reply("subscribed", id="url")
    server.stop()
    code, reason = client.closed()
    assert code == 1001 and reason, reason


def test_node_sees_4001_when_it_stops_reading_and_resumes_from_its_cursor(
    make_server: ServerFactory, node: Callable[..., Node]
) -> None:
    server = make_server(hub_queue_size=8)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        client = node(ws_url(server, ("channel", "fast/*"))).opened()
        client.reply("subscribed", id="url")
        client.command(pause=True)
        time.sleep(0.2)  # the pause reaches Node before the flood
        big = b'"' + b"x" * 60_000 + b'"'
        published = [publish(http, "fast/x", big)["id"] for _ in range(300)]
        client.command(resume=True)
        got: list[str] = []
        while True:
            item = client.next()
            if item["kind"] == "close":
                break
            assert item["kind"] == "text" and item["message"]["op"] == "event", str(item)[:300]
            got.append(item["message"]["event"]["id"])
        assert item["code"] == 4001, item
        assert got == published[: len(got)] and len(got) < len(published)

        # Nothing is lost: resume from the last cursor.
        again = node(ws_url(server, ("channel", "fast/*"), ("since", got[-1]))).opened()
        again.reply("subscribed", id="url", cursor=got[-1], recovered=True)
        rest = [again.event("url")["id"] for _ in published[len(got) :]]
        assert rest == published[len(got) :]


# -- credentials ---------------------------------------------------------------------------------


@pytest.fixture
def auth_server(make_server: ServerFactory) -> RunningServer:
    return make_server(auth_jwt_algorithms="HS256", auth_jwt_secret=SECRET)


BAD_TOKENS = {
    "garbage": lambda: "not-a-jwt",
    "wrong-secret": lambda: jwt.encode(
        {"sub": "x", "exp": int(time.time()) + 600}, "another-secret-of-32-bytes-or-more!!", "HS256"
    ),
    "expired": lambda: token(["**"], exp=int(time.time()) - 3600),
}


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
@pytest.mark.parametrize("where", ["query", "header"])
def test_node_sees_4401_for_a_bad_token_in_the_handshake(
    auth_server: RunningServer, node: Callable[..., Node], kind: str, where: str
) -> None:
    """Not an HTTP error: the upgrade succeeds, then the close code says why."""
    bad = BAD_TOKENS[kind]()
    if where == "query":
        client = node(ws_url(auth_server, ("token", bad), ("channel", "a")))
    else:
        client = node(ws_url(auth_server), {"Authorization": f"Bearer {bad}"})
    client.opened()
    code, reason = client.closed()
    assert code == 4401 and reason, reason


def test_node_sees_4403_for_a_url_channel_its_token_may_not_subscribe_to(
    auth_server: RunningServer, node: Callable[..., Node]
) -> None:
    granted = token(["orders/**"])
    client = node(ws_url(auth_server, ("token", granted), ("channel", "admin/**"))).opened()
    code, reason = client.closed()
    assert code == 4403 and "admin/**" in reason, reason

    ok = node(ws_url(auth_server, ("token", granted), ("channel", "orders/*"))).opened()
    ok.reply("subscribed", id="url", recovered=True)


def test_node_authenticates_by_message_and_is_held_to_its_grant(
    auth_server: RunningServer, node: Callable[..., Node]
) -> None:
    client = node(ws_url(auth_server)).opened()
    client.send({"op": "subscribe", "id": "early", "channels": ["orders/**"]})
    client.reply("error", id="early", error="unauthorized")
    client.send({"op": "ping", "id": 1})
    assert client.message() == {"op": "pong", "id": 1}
    client.send({"op": "auth", "id": "a1", "token": "not-a-jwt"})
    client.reply("error", id="a1", error="unauthorized")

    good = token(["orders/**"], publish=["orders/*"])
    client.send({"op": "auth", "id": "a2", "token": good})
    authenticated = client.reply("authenticated", id="a2", subject="node-tester")
    assert authenticated["expires"].endswith("Z")
    client.send({"op": "subscribe", "id": "admin", "channels": ["admin/**"]})
    client.reply("error", id="admin", error="forbidden")
    client.send({"op": "publish", "id": "p", "channel": "admin/x", "data": 1})
    client.reply("error", id="p", error="forbidden")
    client.send({"op": "subscribe", "id": "orders", "channels": ["orders/**"]})
    client.reply("subscribed", id="orders")
    client.send({"op": "publish", "id": "p2", "channel": "orders/1", "data": {"ok": True}})
    # The event may reach this connection's subscription before the ack.
    got = sorted((client.message() for _ in range(2)), key=lambda m: m["op"])
    assert got[0]["op"] == "event" and got[0]["event"]["data"] == {"ok": True}
    assert got[1]["op"] == "published" and got[1]["cursor"] == got[0]["event"]["id"]


def test_node_sees_4401_when_no_credential_comes_in_time(
    make_server: ServerFactory, node: Callable[..., Node]
) -> None:
    server = make_server(
        auth_jwt_algorithms="HS256", auth_jwt_secret=SECRET, websocket_auth_timeout=0.5
    )
    client = node(ws_url(server)).opened()
    code, reason = client.closed()
    assert code == 4401 and reason, reason


def test_node_sees_4401_when_its_token_expires(
    auth_server: RunningServer, node: Callable[..., Node]
) -> None:
    short = token(["a"], exp=int(time.time()) + 2)
    client = node(ws_url(auth_server, ("token", short), ("channel", "a"))).opened()
    client.reply("subscribed", id="url")
    code, reason = client.closed()
    assert code == 4401 and "expired" in reason, reason


def test_node_sees_4403_when_a_new_credential_may_not_hold_its_subscription(
    auth_server: RunningServer, node: Callable[..., Node]
) -> None:
    client = node(ws_url(auth_server, ("token", token(["orders/**", "alerts"])))).opened()
    client.send({"op": "subscribe", "id": "o", "channels": ["orders/**"]})
    client.reply("subscribed", id="o")
    client.send({"op": "auth", "id": "swap", "token": token(["alerts"])})
    item = client.next()
    if item["kind"] == "text":  # the reply may precede the close
        assert item["message"]["op"] == "authenticated", item
        item = client.next()
    assert item["kind"] == "close" and item["code"] == 4403, item
