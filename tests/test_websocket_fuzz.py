"""Generated malformed input on ``GET /ws``, checked against docs/websocket.md.

Every input gets what the document promises for it: an ``error`` reply with the documented
code (carrying the message's ``id`` when that ``id`` was valid, and none otherwise) on a
connection that stays usable (a ``ping`` right after gets its ``pong``), or the documented
close code: 1007 for a text frame that is not UTF-8, 1009 for a message over
``websocket.max_message`` (fragments counted together), 1002 for frames that break RFC 6455.

One server serves the whole module. Its connections live on an event loop in a thread of its
own, so the same connections carry on across hypothesis examples and test functions:

- a *victim* connection (the ``websockets`` client) that receives every malformed message meant
  to be answered with ``error``: it must survive them all;
- a *neighbour* subscribed to ``nb/**``, and a publisher that publishes one event to it for every
  example: at the end the neighbour must have received every one of them, in order.

Frame-level abuse (bad UTF-8, oversized and fragmented messages, RFC 6455 violations) goes over
a raw socket with hand-built masked frames, one new connection per example.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import os
import re
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect

from conftest import RunningServer, make_settings

MAX_MESSAGE = 4096  # websocket.max_message of the module's server
MAX_EVENT = 1024  # http.max_event_bytes of the module's server
TIMEOUT = 5.0  # seconds any single wait may take before it counts as a hang
OPS = ("auth", "subscribe", "unsubscribe", "publish", "ping")
FIELDS = {
    "auth": {"token"},
    "subscribe": {"channels", "since", "binary"},
    "unsubscribe": {"sub"},
    "publish": {"channel", "type", "data", "data_base64", "datacontenttype", "idempotency_key"},
    "ping": set(),
}
# A message with these fields (plus op and id) is valid, but for the fault under test.
VALID_FIELDS: dict[str, dict[str, Any]] = {
    "auth": {"token": "anything: auth is off"},
    "subscribe": {"channels": ["fz/never"]},
    "unsubscribe": {"sub": "never-opened"},
    "publish": {"channel": "fz/never", "data": 1},
    "ping": {},
}
FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

T = TypeVar("T")
Id = str | int


# -- what the document says is valid -----------------------------------------------------------

SEGMENT = re.compile(r"[A-Za-z0-9_.:-]+")
EVENT_TYPE = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
CURSOR = re.compile(r"[a-z0-9]{1,32}:[0-9]+")
BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def channel_is_valid(name: str, *, pattern: bool = False) -> bool:
    """The naming rules of docs/http-api.md (channels, patterns)."""
    if not name or len(name) > 255:
        return False
    segments = name.split("/")
    if len(segments) > 32:
        return False
    for i, segment in enumerate(segments):
        if pattern and (segment == "*" or (segment == "**" and i == len(segments) - 1)):
            continue
        if segment in (".", "..") or not SEGMENT.fullmatch(segment):
            return False
    return True


def cursor_may_be_valid(text: str) -> bool:
    """Anything that looks like ``epoch:sequence`` is left out of the invalid cursors."""
    return CURSOR.fullmatch(text) is not None


# -- strategies ----------------------------------------------------------------------------------

ascii_printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
controls = st.sampled_from([chr(c) for c in (*range(0x20), 0x7F, 0x85, 0x9F)])
json_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=10)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)

valid_ids: st.SearchStrategy[Id] = st.one_of(
    st.text(ascii_printable, min_size=1, max_size=64),
    st.text(st.characters(categories=["L", "N"], max_codepoint=0xFFFF), min_size=1, max_size=32),
    st.integers(-(2**53), 2**53),
    st.sampled_from(["a" * 64, 2**53, -(2**53), 0]),
)


@st.composite
def with_control(draw: st.DrawFn) -> str:
    text = draw(st.text(ascii_printable, max_size=20))
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(controls) + text[at:]


invalid_ids: st.SearchStrategy[Any] = st.one_of(
    st.just(""),
    st.text(ascii_printable, min_size=65, max_size=400),
    with_control(),
    st.integers(min_value=2**53 + 1, max_value=2**80),
    st.integers(min_value=-(2**80), max_value=-(2**53) - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(json_scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), json_scalars, max_size=3),
)


def wrong_type(*allowed: type) -> st.SearchStrategy[Any]:
    """JSON values (never null: null stands for an absent field) of none of ``allowed``."""

    def ok(value: Any) -> bool:
        if value is None:
            return False
        if isinstance(value, bool):
            return bool not in allowed
        return not isinstance(value, allowed)

    return json_values.filter(ok)


@st.composite
def invalid_patterns(draw: st.DrawFn, *, pattern: bool = True) -> str:
    valid = draw(
        st.lists(
            st.from_regex(SEGMENT, fullmatch=True).map(lambda s: s[:8]), min_size=1, max_size=3
        )
    )
    bad = draw(
        st.one_of(
            st.sampled_from(["", "/", "//", ".", "..", "*x", "x*", "***", "a b", "é", "$", "a\nb"]),
            st.text(min_size=1, max_size=12),
        )
    )
    how = draw(st.sampled_from(["segment", "leading", "trailing", "double", "length", "depth"]))
    if how == "segment":
        segments = list(valid)
        segments.insert(draw(st.integers(0, len(segments))), bad)
        name = "/".join(segments)
    elif how == "leading":
        name = "/" + "/".join(valid)
    elif how == "trailing":
        name = "/".join(valid) + "/"
    elif how == "double":
        name = "/".join(valid).replace("/", "//", 1) if len(valid) > 1 else valid[0] + "//x"
    elif how == "length":
        name = "a" * draw(st.integers(256, 400))
    else:
        name = "/".join(["s"] * draw(st.integers(33, 40)))
    if not pattern and draw(st.booleans()):
        name = draw(st.sampled_from(["*", "**", "a/*", "a/**", "*/b"]))  # wildcards: not a channel
    if channel_is_valid(name, pattern=pattern):
        name += "/**/x"  # "**" not last: never valid
    return name


invalid_cursors = st.one_of(
    st.text(max_size=40).filter(lambda s: not cursor_may_be_valid(s)),
    st.sampled_from(["", ":", "abc", "abc:", ":17", "ABC:1", "a-b:1", "a:1.5", "a:-1", "a:1 "]),
    st.integers(2**63, 2**70).map(lambda n: f"351b154f:{n}"),
    st.integers(33, 40).map(lambda n: "a" * n + ":1"),
)

invalid_types = st.one_of(
    st.just(""),
    st.text(st.sampled_from("abc.:/_-"), min_size=129, max_size=200),
    st.text(max_size=20).filter(lambda s: not EVENT_TYPE.fullmatch(s)),
    st.from_regex(EVENT_TYPE, fullmatch=True).map(lambda s: "tidings." + s[:100]),
)


@st.composite
def invalid_base64(draw: st.DrawFn) -> str:
    good = base64.b64encode(draw(st.binary(min_size=1, max_size=30))).decode()
    how = draw(st.sampled_from(["alien", "unpadded", "inner-padding"]))
    if how == "alien":
        at = draw(st.integers(0, len(good)))
        text = good[:at] + draw(st.sampled_from(list("!-_ .~é\n"))) + good[at:]
    elif how == "unpadded" and "=" in good:
        text = good.rstrip("=")
    else:
        at = draw(st.integers(0, max(0, len(good) - 3)))
        text = good[:at] + "=" + good[at:]
    if BASE64.fullmatch(text):
        text += "!"
    return text


invalid_content_types = st.sampled_from(
    ["nonsense", "text", "/plain", "text/", "a b/c", "text/pl ain", "x/" + "y" * 300]
)


@dataclass(frozen=True)
class Case:
    """One malformed message and the ``error`` that must answer it."""

    payload: str | bytes  # str: a text frame; bytes: a binary frame
    codes: frozenset[str]  # the code the document gives (a set only where it leaves a choice)
    id: Id | None  # the id the error must carry; None: no id

    def __repr__(self) -> str:
        more = f" (+{len(self.payload) - 300})" if len(self.payload) > 300 else ""
        return f"Case({self.payload[:300]!r}{more}, {sorted(self.codes)}, id={self.id!r})"


def case(document: Any, code: str | set[str], message_id: Id | None) -> Case:
    codes = frozenset({code} if isinstance(code, str) else code)
    return Case(json.dumps(document, ensure_ascii=False), codes, message_id)


def message(op: Any, message_id: Id | None, **fields: Any) -> dict[str, Any]:
    document: dict[str, Any] = {"op": op} if op is not ... else {}
    if message_id is not None:
        document["id"] = message_id
    document.update(fields)
    return document


# -- the event loop the module's connections live on -------------------------------------------


class Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ws-fuzz", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(TIMEOUT):
        data = await ws.recv()
    assert isinstance(data, str), f"expected a text frame, got binary {data[:200]!r}"
    reply: dict[str, Any] = orjson.loads(data)
    return reply


class Neighbour:
    """A healthy subscriber to ``nb/**`` and a publisher that feeds it one event at a time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.published: list[tuple[str, int]] = []  # (cursor, n) in publish order
        self.received: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    async def start(self) -> None:
        self.subscriber = await connect(self.url)
        await self.subscriber.send('{"op":"subscribe","id":"nb","channels":["nb/**"]}')
        subscribed = await recv_json(self.subscriber)
        assert subscribed["op"] == "subscribed" and subscribed["id"] == "nb", subscribed
        self.reader = asyncio.get_running_loop().create_task(self._read())
        self.publisher = await connect(self.url)

    async def _read(self) -> None:
        async for data in self.subscriber:
            self.received.append(orjson.loads(data))
            self.arrived.set()
        self.arrived.set()

    async def publish(self) -> None:
        n = len(self.published)
        await self.publisher.send(
            orjson.dumps(
                {"op": "publish", "id": n, "channel": f"nb/{n % 3}", "data": {"n": n}}
            ).decode()
        )
        reply = await recv_json(self.publisher)
        assert reply["op"] == "published" and reply["id"] == n, reply
        assert reply["replayed"] is False
        self.published.append((reply["cursor"], n))

    async def check(self) -> None:
        """Every event published so far arrived, once, in order, on a connection still open."""
        async with asyncio.timeout(TIMEOUT):
            while len(self.received) < len(self.published) and not self.reader.done():
                self.arrived.clear()
                await self.arrived.wait()
        assert not self.reader.done(), f"neighbour closed: {self.subscriber.close_code}"
        got = [
            (m["op"], m["sub"], m["event"]["id"], m["event"]["data"]["n"]) for m in self.received
        ]
        assert got == [("event", "nb", cursor, n) for cursor, n in self.published]

    async def close(self) -> None:
        await self.subscriber.close()
        await self.publisher.close()
        await asyncio.gather(self.reader, return_exceptions=True)


class Victim:
    """The connection that receives every malformed message answered by ``error``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: ClientConnection | None = None
        self.pings = 0

    async def exchange(self, payload: str | bytes) -> dict[str, Any]:
        """Send ``payload`` and a ping; return the reply to the payload, checking the pong."""
        if self.ws is None:  # the first example, or one after a failure
            self.ws = await connect(self.url, max_size=None)
        try:
            self.pings += 1
            ping = f"after-{self.pings}"
            await self.ws.send(payload)
            await self.ws.send(json.dumps({"op": "ping", "id": ping}))
            reply = await recv_json(self.ws)
            pong = await recv_json(self.ws)
            if reply == {"op": "pong", "id": ping} and pong.get("op") == "published":
                reply, pong = pong, reply  # only a publish's ack may come after later replies
            assert pong == {"op": "pong", "id": ping}, (reply, pong)
        except BaseException:
            ws, self.ws = self.ws, None  # start afresh: the next example must not see leftovers
            await ws.close()
            raise
        return reply

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


class Harness:
    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.ws_url = server.url.replace("http://", "ws://", 1) + "/ws"
        host, _, port = server.url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.loop = Loop()
        self.neighbour = Neighbour(self.ws_url)
        self.victim = Victim(self.ws_url)
        self.loop.run(self.neighbour.start())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run(coro)

    def check_error(self, c: Case) -> None:
        """``c`` is answered by its error, and the victim stays usable; the neighbour is fed."""

        async def go() -> None:
            await self.neighbour.publish()
            reply = await self.victim.exchange(c.payload)
            assert reply.get("op") == "error", (c, reply)
            assert reply.get("error") in c.codes, (c, reply)
            expected = {"op", "error", "detail"} | ({"id"} if c.id is not None else set())
            assert set(reply) == expected, (c, reply)
            if c.id is not None:
                assert reply["id"] == c.id and type(reply["id"]) is type(c.id), (c, reply)
            assert isinstance(reply["detail"], str) and reply["detail"], reply

        self.run(go())

    def close(self) -> None:
        try:
            self.run(self.victim.close())
            self.run(self.neighbour.close())
        finally:
            self.loop.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    settings_ = make_settings(
        tmp_path_factory.mktemp("ws-fuzz"),
        websocket_max_message=MAX_MESSAGE,
        http_max_event_bytes=MAX_EVENT,
    )
    server = RunningServer(settings_).start()
    h = Harness(server)
    try:
        yield h
    finally:
        try:
            h.close()
        finally:
            server.stop()


# -- messages answered with error ---------------------------------------------------------------


@FUZZ
@given(text=st.text(max_size=200).filter(lambda s: not _parses(s)))
def test_text_that_is_not_json_is_an_invalid_message(harness: Harness, text: str) -> None:
    harness.check_error(Case(text, frozenset({"invalid_message"}), None))


def _parses(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


@FUZZ
@given(
    text=json_values.filter(lambda v: not isinstance(v, dict)).map(json.dumps)
    | st.sampled_from(['"ping"', "[]", "null", "true", "1e400", '["op", "ping"]'])
)
def test_json_that_is_not_an_object_is_an_invalid_message(harness: Harness, text: str) -> None:
    harness.check_error(Case(text, frozenset({"invalid_message"}), None))


@FUZZ
@given(
    bad_id=invalid_ids,
    op=st.sampled_from([*OPS, "no-such-op"]),
    order=st.booleans(),
)
def test_an_invalid_id_is_an_invalid_message_answered_without_id(
    harness: Harness, bad_id: Any, op: str, order: bool
) -> None:
    """Whatever the rest of the message: subscribe, publish and auth must not happen either."""
    fields = VALID_FIELDS.get(op, {})
    document = {"id": bad_id, "op": op, **fields} if order else {"op": op, **fields, "id": bad_id}
    harness.check_error(case(document, "invalid_message", None))


@FUZZ
@given(
    message_id=st.none() | valid_ids,
    op=st.one_of(
        st.text(max_size=20).filter(lambda s: s not in OPS),
        st.sampled_from(["PING", "Ping", "ping ", " subscribe", "pong", "error", "event"]),
        wrong_type(str),
        st.just(...),  # no op at all
    ),
)
def test_an_unknown_or_missing_op_is_an_invalid_message(
    harness: Harness, message_id: Id | None, op: Any
) -> None:
    harness.check_error(case(message(op, message_id), "invalid_message", message_id))


@FUZZ
@given(
    message_id=valid_ids,
    op=st.sampled_from(OPS),
    name=st.text(min_size=1, max_size=20),
    value=json_values,
)
def test_an_unknown_field_is_an_invalid_message(
    harness: Harness, message_id: Id, op: str, name: str, value: Any
) -> None:
    if name in FIELDS[op] or name in ("op", "id"):
        name += "_"
    document = message(op, message_id, **VALID_FIELDS[op])
    document[name] = value
    harness.check_error(case(document, "invalid_message", message_id))


WRONG_TYPES: dict[tuple[str, str], st.SearchStrategy[Any]] = {
    ("auth", "token"): wrong_type(str),
    ("subscribe", "channels"): wrong_type(str, list)
    | st.lists(json_values, min_size=1, max_size=3).filter(
        lambda v: any(not isinstance(c, str) for c in v)
    ),
    ("subscribe", "since"): wrong_type(str),
    ("subscribe", "binary"): wrong_type(bool),
    ("unsubscribe", "sub"): invalid_ids,
}


@FUZZ
@given(message_id=valid_ids, where=st.sampled_from(sorted(WRONG_TYPES)), data=st.data())
def test_a_field_of_the_wrong_type_is_an_invalid_message(
    harness: Harness, message_id: Id, where: tuple[str, str], data: st.DataObject
) -> None:
    op, name = where
    document = message(op, message_id, **VALID_FIELDS[op])
    document[name] = data.draw(WRONG_TYPES[where], label=name)
    harness.check_error(case(document, "invalid_message", message_id))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("channel", 42),
        ("channel", ["orders/1"]),
        ("type", 7),
        ("type", {"t": 1}),
        ("datacontenttype", True),
        ("idempotency_key", 12),
        ("data_base64", ["AAH/"]),
        ("data_base64", 255),
    ],
)
def test_a_publish_field_of_the_wrong_type_is_an_invalid_message(
    harness: Harness, name: str, value: Any
) -> None:
    document = message("publish", "wrong-type", channel="fz/never")
    document[name] = value
    harness.check_error(case(document, "invalid_message", "wrong-type"))


@FUZZ
@given(
    message_id=st.none() | valid_ids,
    missing=st.sampled_from(
        [
            ("auth", "token"),
            ("subscribe", "channels"),
            ("unsubscribe", "sub"),
            ("publish", "channel"),
        ]
    ),
    as_null=st.booleans(),
)
def test_a_missing_required_field_is_an_invalid_message(
    harness: Harness, message_id: Id | None, missing: tuple[str, str], as_null: bool
) -> None:
    op, name = missing
    fields = {k: v for k, v in VALID_FIELDS[op].items() if k != name}
    if as_null:
        fields[name] = None
    harness.check_error(case(message(op, message_id, **fields), "invalid_message", message_id))


@FUZZ
@given(channels=st.lists(st.sampled_from(["fz/a", "fz/*", "fz/**"]), min_size=1, max_size=3))
def test_a_subscribe_without_id_is_an_invalid_message(
    harness: Harness, channels: list[str]
) -> None:
    harness.check_error(
        case(message("subscribe", None, channels=channels), "invalid_message", None)
    )


@FUZZ
@given(
    message_id=valid_ids,
    good=st.lists(st.sampled_from(["fz/a", "fz/*", "fz/**", "**"]), max_size=3),
    bad=invalid_patterns(),
    at=st.integers(0, 3),
    as_string=st.booleans(),
)
def test_subscribe_with_an_invalid_pattern_is_invalid_pattern(
    harness: Harness, message_id: Id, good: list[str], bad: str, at: int, as_string: bool
) -> None:
    channels: str | list[str] = [*good[:at], bad, *good[at:]]
    if as_string:
        channels = bad
    document = message("subscribe", message_id, channels=channels)
    harness.check_error(case(document, "invalid_pattern", message_id))


@FUZZ
@given(message_id=valid_ids, since=invalid_cursors, binary=st.none() | st.booleans())
def test_subscribe_with_an_invalid_cursor_is_invalid_cursor(
    harness: Harness, message_id: Id, since: str, binary: bool | None
) -> None:
    fields: dict[str, Any] = {"channels": ["fz/a"], "since": since}
    if binary is not None:
        fields["binary"] = binary
    harness.check_error(
        case(message("subscribe", message_id, **fields), "invalid_cursor", message_id)
    )


@FUZZ
@given(message_id=valid_ids, as_string=st.booleans())
def test_subscribe_with_no_channels_is_refused(
    harness: Harness, message_id: Id, as_string: bool
) -> None:
    """``channels`` holds 1 to 64 patterns; the document names no code for a count out of
    bounds: either of these two, with the id."""
    document = message("subscribe", message_id, channels="" if as_string else [])
    harness.check_error(case(document, {"invalid_message", "invalid_pattern"}, message_id))


@pytest.mark.parametrize("message_id", ["many", 65])
def test_subscribe_with_too_many_channels_is_refused_with_its_id(
    harness: Harness, message_id: Id
) -> None:
    document = message("subscribe", message_id, channels=[f"fz/{i}" for i in range(65)])
    harness.check_error(case(document, {"invalid_message", "invalid_pattern"}, message_id))


@st.composite
def bad_publishes(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A publish with one fault, and the code the document gives for it."""
    fields: dict[str, Any] = {"channel": "fz/pub"}
    fault = draw(
        st.sampled_from(
            ["channel", "type", "base64", "content-type", "json", "utf-8", "key", "both", "big"]
        )
    )
    code = "invalid_event"
    if fault == "channel":
        fields["channel"] = draw(invalid_patterns(pattern=False))
        code = "invalid_channel"
    elif fault == "type":
        fields["type"] = draw(invalid_types)
    elif fault == "base64":
        fields["data_base64"] = draw(invalid_base64())
    elif fault == "content-type":
        fields["datacontenttype"] = draw(invalid_content_types)
        fields["data"] = draw(st.text(max_size=10))
    elif fault == "json":  # declared JSON, is not
        raw = draw(st.binary(max_size=20).filter(lambda b: not _parses_bytes(b)))
        fields["data_base64"] = base64.b64encode(raw).decode()
        fields["datacontenttype"] = draw(st.sampled_from(["application/json", "x/y+json"]))
    elif fault == "utf-8":  # declared text, is not UTF-8
        raw = draw(st.binary(min_size=1, max_size=20).filter(lambda b: not _utf8(b)))
        fields["data_base64"] = base64.b64encode(raw).decode()
        fields["datacontenttype"] = "text/plain"
    elif fault == "key":
        fields["idempotency_key"] = draw(
            st.just("") | st.text(ascii_printable, min_size=256, max_size=300) | with_control()
        )
    elif fault == "both":
        fields["data"] = draw(json_scalars)
        fields["data_base64"] = "AAH/"
    else:
        size = draw(st.integers(MAX_EVENT + 1, MAX_EVENT + 600))
        form = draw(st.sampled_from(["text", "json", "base64"]))
        if form == "text":
            fields.update(data="x" * size, datacontenttype="text/plain")
        elif form == "json":
            fields["data"] = "x" * size
        else:
            fields["data_base64"] = base64.b64encode(b"\x00" * size).decode()
        code = "payload_too_large"
    return fields, code


def _parses_bytes(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@FUZZ
@given(message_id=st.none() | valid_ids, bad=bad_publishes())
def test_an_invalid_publish_gets_its_error_and_publishes_nothing(
    harness: Harness, message_id: Id | None, bad: tuple[dict[str, Any], str]
) -> None:
    fields, code = bad
    harness.check_error(case(message("publish", message_id, **fields), code, message_id))


@pytest.mark.parametrize("content_type", ["", "   "])
def test_an_empty_content_type_is_refused_or_the_default(
    harness: Harness, content_type: str
) -> None:
    document = message("publish", "ct", channel="fz/ct", data="abc", datacontenttype=content_type)
    reply = harness.run(harness.victim.exchange(json.dumps(document)))
    if reply["op"] == "error":
        assert (reply["error"], reply["id"]) == ("invalid_event", "ct"), reply
        return
    assert reply["op"] == "published", reply
    page = httpx.get(
        harness.server.url + "/history",
        params={"channel": "fz/ct", "since": _before(reply["cursor"])},
        timeout=TIMEOUT,
    ).json()
    [event] = page["events"][:1]
    assert event["id"] == reply["cursor"]
    assert (event["datacontenttype"], event["data"]) == ("application/json", "abc"), event


def _before(cursor: str) -> str:
    epoch, _, seq = cursor.partition(":")
    return f"{epoch}:{int(seq) - 1}"


@FUZZ
@given(data=st.binary(max_size=300).filter(lambda b: b"\n" not in b))
def test_a_binary_frame_without_newline_is_an_invalid_message(
    harness: Harness, data: bytes
) -> None:
    harness.check_error(Case(data, frozenset({"invalid_message"}), None))


@FUZZ
@given(
    head=st.one_of(
        st.binary(max_size=40).filter(lambda b: b"\n" not in b and not _object(b)),
        st.sampled_from([b"", b"[]", b'"publish"', b"null", b'{"op":"publish"', b'{"op":"p\xff"}']),
    ),
    data=st.binary(max_size=50),
)
def test_a_binary_frame_whose_json_part_is_not_an_object_is_an_invalid_message(
    harness: Harness, head: bytes, data: bytes
) -> None:
    harness.check_error(Case(head + b"\n" + data, frozenset({"invalid_message"}), None))


def _object(data: bytes) -> bool:
    try:
        return isinstance(orjson.loads(data), dict)
    except orjson.JSONDecodeError:
        return False


@FUZZ
@given(
    message_id=st.none() | valid_ids,
    head=st.one_of(
        st.sampled_from(["auth", "subscribe", "unsubscribe", "ping"]).map(
            lambda op: (op, VALID_FIELDS[op], "invalid_message")
        ),
        invalid_patterns(pattern=False).map(
            lambda c: ("publish", {"channel": c}, "invalid_channel")
        ),
        st.sampled_from([{"data": 1}, {"data_base64": "AA=="}]).map(
            # data twice: the document does not say which code; either reads right.
            lambda extra: (
                "publish",
                {"channel": "fz/bin", **extra},
                "invalid_message|invalid_event",
            )
        ),
    ),
    data=st.binary(max_size=50),
)
def test_a_binary_frame_holding_anything_but_a_data_less_publish_is_refused(
    harness: Harness, message_id: Id | None, head: tuple[str, dict[str, Any], str], data: bytes
) -> None:
    op, fields, code = head
    if op == "subscribe" and message_id is None:
        message_id = "sub"
    document = orjson.dumps(message(op, message_id, **fields))
    codes = frozenset(code.split("|"))
    harness.check_error(Case(document + b"\n" + data, codes, message_id))


# -- frames: raw sockets, hand-built masked frames ------------------------------------------------

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    """One client frame (RFC 6455 §5.2), masked unless told otherwise."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + masked


class Raw:
    """A WebSocket client on a bare socket: writes any frames, reads the server's."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Raw:
        reader, writer = await asyncio.open_connection(host, port)
        key = base64.b64encode(os.urandom(16))
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (host.encode(), port, key)
        )
        async with asyncio.timeout(TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        assert status.startswith("HTTP/1.1 101 "), head
        headers = dict(line.lower().split(": ", 1) for line in lines if line)
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        assert headers["sec-websocket-accept"] == accept.lower(), head
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):  # the server may close before taking all
            await self.writer.drain()

    async def read_frame(self) -> tuple[bool, int, bytes]:
        async with asyncio.timeout(TIMEOUT):
            b0, b1 = await self.reader.readexactly(2)
            assert not b1 & 0x80, "a server frame must not be masked"
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            payload = await self.reader.readexactly(n)
        assert not b0 & 0x70, "no extension was negotiated: RSV bits must be 0"
        return bool(b0 & 0x80), b0 & 0x0F, payload

    async def message(self) -> dict[str, Any]:
        fin, opcode, payload = await self.read_frame()
        assert fin and opcode == TEXT, (fin, opcode, payload[:200])
        reply: dict[str, Any] = orjson.loads(payload)
        return reply

    async def ping(self, message_id: Id) -> None:
        """A ``ping`` message gets its ``pong``: the connection is usable."""
        await self.send(frame(TEXT, orjson.dumps({"op": "ping", "id": message_id})))
        assert await self.message() == {"op": "pong", "id": message_id}

    async def closed_with(self, *, echo: bool = True) -> tuple[int | None, list[Any]]:
        """Read until the server's close frame: its code (None if the socket ended without
        one), and whatever came before it; answer it (``echo``). Then the server must end the
        TCP connection, with nothing after its close frame."""
        before: list[Any] = []
        while True:
            try:
                _, opcode, payload = await self.read_frame()
            except (asyncio.IncompleteReadError, ConnectionError):
                return None, before
            if opcode == CLOSE:
                break
            before.append((opcode, payload[:200]))
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
        reason = payload[2:]
        assert len(reason) <= 123, f"close reason over 123 bytes: {reason!r}"
        reason.decode("utf-8")  # a close reason is UTF-8 text
        if echo:
            await self.send(frame(CLOSE, payload[:2]))
        async with asyncio.timeout(TIMEOUT):
            try:
                rest = await self.reader.read()
            except ConnectionError:
                rest = b""
        assert rest == b"", f"data after the close frame: {rest[:200]!r}"
        return code, before

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def check_close(harness: Harness, frames: list[bytes], expected: int) -> None:
    """Send ``frames`` on a new connection: the server closes it with ``expected``."""

    async def go() -> None:
        await harness.neighbour.publish()
        raw = await Raw.open(harness.host, harness.port)
        try:
            await raw.send(b"".join(frames))
            code, before = await raw.closed_with()
            assert code == expected, f"close code {code}, expected {expected}; before: {before}"
        finally:
            await raw.close()

    harness.run(go())


def check_usable(harness: Harness, frames: list[bytes], replies: list[Any]) -> None:
    """Send ``frames`` on a new connection: the next frames are ``replies`` (a dict: that text
    message; a tuple: that control frame), and a ping message then gets its pong."""

    async def go() -> None:
        await harness.neighbour.publish()
        raw = await Raw.open(harness.host, harness.port)
        try:
            await raw.send(b"".join(frames))
            for expected in replies:
                if isinstance(expected, dict):
                    assert await raw.message() == expected
                else:
                    fin, opcode, payload = await raw.read_frame()
                    assert (opcode, payload) == expected and fin
            await raw.ping("still-here")
            await raw.send(frame(CLOSE, (1000).to_bytes(2, "big")))
            code, _ = await raw.closed_with(echo=False)
            assert code == 1000
        finally:
            await raw.close()

    harness.run(go())


@st.composite
def invalid_utf8(draw: st.DrawFn) -> bytes:
    """A JSON-looking text whose bytes are not UTF-8 somewhere."""
    bad = draw(
        st.sampled_from(
            [
                b"\xff",
                b"\xfe",
                b"\xc0\xaf",
                b"\xe0\x80\xaf",
                b"\xed\xa0\x80",
                b"\xf4\x90\x80\x80",
                b"\x80",
                b"\xc3",
                b"\xe2\x82",
                b"\xf0\x9f\x98",
                b"\xf8\x88\x80\x80\x80",
            ]
        )
        | st.binary(min_size=1, max_size=8).filter(lambda b: not _utf8(b))
    )
    before = draw(st.text(max_size=20)).encode()
    after = draw(st.text(max_size=20)).encode()
    return b'{"op":"ping","id":"' + before + bad + after + b'"}'


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def fragments(opcode: int, parts: list[bytes]) -> list[bytes]:
    return [
        frame(opcode if i == 0 else CONT, part, fin=i == len(parts) - 1)
        for i, part in enumerate(parts)
    ]


@FUZZ
@given(data=invalid_utf8(), cuts=st.lists(st.integers(0, 80), max_size=3))
def test_a_text_message_that_is_not_utf8_closes_1007(
    harness: Harness, data: bytes, cuts: list[int]
) -> None:
    """In one frame or in fragments (cut anywhere): the whole message is checked."""
    check_close(harness, fragments(TEXT, split(data, cuts)), 1007)


@FUZZ
@given(
    size=st.integers(MAX_MESSAGE + 1, 3 * MAX_MESSAGE),
    opcode=st.sampled_from([TEXT, BINARY]),
)
def test_a_message_over_max_message_in_one_frame_closes_1009(
    harness: Harness, size: int, opcode: int
) -> None:
    body = b'{"op":"ping","id":"' + b"x" * size + b'"}'
    check_close(harness, [frame(opcode, body)], 1009)


@FUZZ
@given(
    sizes=st.lists(st.integers(1, MAX_MESSAGE), min_size=2, max_size=6).filter(
        lambda s: sum(s) > MAX_MESSAGE
    ),
    opcode=st.sampled_from([TEXT, BINARY]),
)
def test_fragments_over_max_message_together_close_1009(
    harness: Harness, sizes: list[int], opcode: int
) -> None:
    """Every fragment fits; together they do not."""
    parts = [b"x" * n for n in sizes]
    check_close(harness, fragments(opcode, parts), 1009)


@FUZZ
@given(
    message_id=valid_ids,
    cuts=st.lists(st.integers(0, 200), max_size=5),
    pings=st.lists(st.binary(max_size=125), max_size=2),
    fill=st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=30),
)
def test_a_fragmented_message_is_one_message_even_cut_inside_a_character(
    harness: Harness, message_id: Id, cuts: list[int], pings: list[bytes], fill: str
) -> None:
    """Fragments cut anywhere (inside multi-byte characters too), with ping frames between
    them (RFC 6455 §5.4 allows control frames amid a fragmented message): one reply; each
    ping gets its pong first."""
    document = orjson.dumps({"op": "ping", "id": message_id, "x": "é€😀" + fill})
    # An unknown field: answered with an error that echoes the id, so the message was read whole.
    frames = fragments(TEXT, split(document, cuts))
    for i, payload in enumerate(pings):
        frames.insert(min(1 + 2 * i, len(frames) - 1), frame(PING, payload))
    expected: list[Any] = [(PONG, p) for p in pings]
    reply = {
        "op": "error",
        "id": message_id,
        "error": "invalid_message",
        "detail": "ping has unknown field 'x'; fields: none",
    }

    async def go() -> None:
        await harness.neighbour.publish()
        raw = await Raw.open(harness.host, harness.port)
        try:
            await raw.send(b"".join(frames))
            for want in expected:
                fin, opcode, payload = await raw.read_frame()
                assert fin and (opcode, payload) == want
            got = await raw.message()
            assert {k: got.get(k) for k in ("op", "id", "error")} == {
                k: reply[k] for k in ("op", "id", "error")
            }, got
            await raw.ping("still-here")
        finally:
            await raw.close()

    harness.run(go())


def test_a_valid_message_at_exactly_max_message_is_accepted(harness: Harness) -> None:
    head = b'{"op":"ping","id":"exact","pad":"'
    body = head + b"x" * (MAX_MESSAGE - len(head) - 2) + b'"}'
    assert len(body) == MAX_MESSAGE
    reply = {
        "op": "error",
        "id": "exact",
        "error": "invalid_message",
        "detail": "ping has unknown field 'pad'; fields: none",
    }
    check_usable(harness, fragments(TEXT, split(body, [1000, 3000])), [reply])
    check_usable(harness, [frame(TEXT, body)], [reply])


PROTOCOL_ERRORS: dict[str, st.SearchStrategy[list[bytes]]] = {
    "unmasked": st.sampled_from([TEXT, BINARY, PING]).map(
        lambda op: [frame(op, b'{"op":"ping","id":1}', mask=False)]
    ),
    "rsv-bits": st.tuples(st.integers(1, 7), st.sampled_from([TEXT, BINARY, PING])).map(
        lambda t: [frame(t[1], b'{"op":"ping","id":1}', rsv=t[0])]
    ),
    "reserved-opcode": st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]).map(
        lambda op: [frame(op, b"x")]
    ),
    "fragmented-control": st.sampled_from([PING, PONG, CLOSE]).map(
        lambda op: [frame(op, b"\x03\xe8" if op == CLOSE else b"x", fin=False)]
    ),
    "long-control": st.tuples(st.sampled_from([PING, PONG]), st.integers(126, 400)).map(
        lambda t: [frame(t[0], b"p" * t[1])]
    ),
    "continuation-first": st.booleans().map(lambda fin: [frame(CONT, b"x", fin=fin)]),
    "data-frame-amid-fragments": st.sampled_from([TEXT, BINARY]).map(
        lambda op: [frame(TEXT, b'{"op":', fin=False), frame(op, b'"ping"}')]
    ),
    "close-one-byte": st.just([frame(CLOSE, b"\x03")]),
    # Codes no endpoint may send (RFC 6455 §7.4): unused, reserved, or local-only.
    "close-bad-code": st.sampled_from([0, 999, 1004, 1005, 1006, 1015, 1016, 2999]).map(
        lambda code: [frame(CLOSE, code.to_bytes(2, "big") + b"bye")]
    ),
}


@FUZZ
@given(
    kind=st.sampled_from(sorted(PROTOCOL_ERRORS)),
    data=st.data(),
    after_valid=st.booleans(),
)
def test_frames_that_break_rfc6455_close_1002(
    harness: Harness, kind: str, data: st.DataObject, after_valid: bool
) -> None:
    frames = data.draw(PROTOCOL_ERRORS[kind], label=kind)
    if after_valid:  # a good message first: the fault still ends the connection
        frames = [frame(TEXT, b'{"op":"ping"}'), *frames]

    async def go() -> None:
        await harness.neighbour.publish()
        raw = await Raw.open(harness.host, harness.port)
        try:
            await raw.send(b"".join(frames))
            code, before = await raw.closed_with()
            # The good message may or may not be answered before the close: not documented.
            assert before in ([], [(TEXT, b'{"op":"pong"}')]), before
            assert code == 1002, f"{kind}: close code {code}, expected 1002; before: {before}"
        finally:
            await raw.close()

    harness.run(go())


# -- after all of it -----------------------------------------------------------------------------


def test_the_neighbour_received_every_event_in_order(harness: Harness) -> None:
    """Runs last: every event published during the fuzzing reached the healthy subscriber,
    in order and once, and it is still subscribed."""
    harness.run(harness.neighbour.publish())
    harness.run(harness.neighbour.check())
    assert len(harness.neighbour.published) > 100
