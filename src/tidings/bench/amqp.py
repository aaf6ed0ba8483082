"""AMQP subscribers: lean AMQP 0-9-1 consumers of the broker the hub relays to
(docs/relays.md).

The hub publishes every event once to its topic exchange (``tidings``; routing key = channel
with ``/`` → ``.``); the broker copies it to every bound queue. Each subscriber is one TCP
connection with as much AMQP 0-9-1 as a consumer needs: the handshake (Start/StartOk with
PLAIN, Tune/TuneOk with heartbeats off, Open), then on channel 1, pipelined: a durable queue of
its own (``x-expires`` so the broker removes it if a run does not), bound to its channel, a
prefetch, and a consumer with manual acknowledgements. Deliveries (method, content header,
body frames) are counted when their body is complete, and acknowledged once per read
(``multiple``). A dropped subscriber loses its socket, and the broker requeues what it had not
acknowledged; resuming consumes the same queue again: a durable consumer. Releasing deletes
the queue.
"""

from __future__ import annotations

import asyncio
import struct
from urllib.parse import unquote, urlsplit

from .driver import Driver, Target
from .mqtt import wait_for_relay
from .stats import Meter
from .subscriber import Subscriber

HEADER = b"AMQP\x00\x00\x09\x01"
METHOD, CONTENT, BODY, HEARTBEAT = 1, 2, 3, 8
FRAME_END = b"\xce"
START, TUNE, OPEN_OK, CLOSE = (10, 10), (10, 30), (10, 41), (10, 50)
CHANNEL_CLOSE, CONSUME_OK, DELIVER, DELETE_OK = (20, 40), (60, 21), (60, 60), (50, 41)
PREFETCH = 1000
QUEUE_EXPIRES_MS = 300_000
FRAME_MAX = 131_072
_FRAME = struct.Struct(">BHI")


def shortstr(text: str) -> bytes:
    raw = text.encode()
    return bytes((len(raw),)) + raw


def longstr(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def table(fields: dict[str, int]) -> bytes:
    """A field table of signed 32-bit integers (type ``I``), all a consumer needs here."""
    body = b"".join(shortstr(k) + b"I" + struct.pack(">i", v) for k, v in fields.items())
    return longstr(body)


def method(channel: int, class_id: int, method_id: int, args: bytes = b"") -> bytes:
    payload = struct.pack(">HH", class_id, method_id) + args
    return _FRAME.pack(METHOD, channel, len(payload)) + payload + FRAME_END


def walk(buf: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """Complete frames at the start of ``buf``: (type, payload start, payload end) of each,
    and where the incomplete rest begins."""
    frames = []
    pos, n = 0, len(buf)
    while n - pos >= 7:
        ftype, _, size = _FRAME.unpack_from(buf, pos)
        end = pos + 7 + size
        if end + 1 > n:
            break
        frames.append((ftype, pos + 7, end))
        pos = end + 1  # past the frame-end octet
    return frames, pos


def consumer_setup(queue: str, exchange: str, routing_key: str) -> bytes:
    """Channel.Open, Queue.Declare (durable, expiring), Queue.Bind, Basic.Qos, Basic.Consume."""
    declare = (
        b"\x00\x00" + shortstr(queue) + bytes((0x02,)) + table({"x-expires": QUEUE_EXPIRES_MS})
    )
    bind = b"\x00\x00" + shortstr(queue) + shortstr(exchange) + shortstr(routing_key) + b"\x00"
    return (
        method(1, 20, 10, shortstr(""))
        + method(1, 50, 10, declare)
        + method(1, 50, 20, bind + table({}))
        + method(1, 60, 10, struct.pack(">IHB", 0, PREFETCH, 0))
        + method(1, 60, 20, b"\x00\x00" + shortstr(queue) + shortstr("") + b"\x00" + table({}))
    )


class AMQPConnection(asyncio.Protocol):
    def __init__(self, sub: Subscriber, setup: bytes, user: str, password: str, vhost: str):
        self.sub = sub
        self.setup = setup
        self.user, self.password, self.vhost = user, password, vhost
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.deleted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = b""
        self._remaining = 0  # body bytes still to come of the current delivery
        self._tag = b""  # the current delivery's tag

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.write(HEADER)

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.opened, self.deleted):
            if not fut.done():
                fut.set_exception(exc or ConnectionError(self.sub.error or "connection closed"))
        if self.sub.conn is self:
            self.sub.connection_closed(f"AMQP connection lost: {exc}")

    def write(self, raw: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.sub.meter.sent += len(raw)
            self.transport.write(raw)

    def data_received(self, data: bytes) -> None:
        sub = self.sub
        sub.meter.received += len(data)
        buf = self._buf + data if self._buf else data
        frames, rest = walk(buf)
        self._buf = buf[rest:]
        k, first, last, tag = 0, -1, -1, b""
        for ftype, start, end in frames:
            if ftype == BODY:
                self._remaining -= end - start
                if self._remaining <= 0:
                    k += 1
                    first = start if first < 0 else first
                    last = end
                    tag = self._tag  # acknowledged only once its body is here
            elif ftype == CONTENT:
                (self._remaining,) = struct.unpack_from(">Q", buf, start + 4)
            elif ftype == METHOD:
                ids = struct.unpack_from(">HH", buf, start)
                if ids == DELIVER:
                    p = start + 4
                    p += 1 + buf[p]  # consumer tag
                    self._tag = buf[p : p + 8]
                else:
                    self.control(ids, buf[start + 4 : end])
        if tag:  # Basic.Ack of everything up to this delivery tag (multiple)
            self.write(method(1, 60, 80, tag + b"\x01"))
        if k:
            sub.delivered(buf, k, first, last)

    def control(self, ids: tuple[int, int], args: bytes) -> None:
        if ids == START:
            response = longstr(f"\0{self.user}\0{self.password}".encode())
            start_ok = table({}) + shortstr("PLAIN") + response + shortstr("en_US")
            self.write(method(0, 10, 11, start_ok))
        elif ids == TUNE:
            channels, frame_max, _ = struct.unpack_from(">HIH", args)
            frame_max = min(frame_max or FRAME_MAX, FRAME_MAX)
            self.write(
                method(0, 10, 31, struct.pack(">HIH", channels, frame_max, 0))
                + method(0, 10, 40, shortstr(self.vhost) + shortstr("") + b"\x00")
            )
        elif ids == OPEN_OK:
            self.write(self.setup)
        elif ids == CONSUME_OK:
            if not self.opened.done():
                self.opened.set_result(None)
        elif ids == DELETE_OK:
            if not self.deleted.done():
                self.deleted.set_result(None)
        elif ids in (CLOSE, CHANNEL_CLOSE):
            (code,) = struct.unpack_from(">H", args)
            text = args[3 : 3 + args[2]].decode(errors="replace")
            what = "connection" if ids == CLOSE else "channel"
            self.sub.error = f"the broker closed the {what}: {code} {text}"
            if not self.opened.done():
                self.opened.set_exception(ConnectionError(self.sub.error))
            self.close()

    def delete_queue(self, queue: str) -> None:
        self.write(method(1, 50, 40, b"\x00\x00" + shortstr(queue) + b"\x00"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class AMQPDriver(Driver):
    name = "amqp"
    held_by = "broker"
    window = 64  # one queue per subscriber in the broker; drained at its pace

    def __init__(self, target: Target, meter: Meter) -> None:
        super().__init__(target, meter)
        url = urlsplit(target.amqp_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 5672
        self.user = unquote(url.username or "guest")
        self.password = unquote(url.password or "guest")
        self.vhost = unquote(url.path[1:]) if len(url.path) > 1 else "/"

    def queue(self, sub: Subscriber) -> str:
        return f"tidings-bench-{self.target.run_id}-{id(sub):x}"

    async def setup(self) -> None:
        await wait_for_relay(self.target, "amqp")

    async def connect(self, sub: Subscriber) -> None:
        key = sub.channel.replace("/", ".")
        setup = consumer_setup(self.queue(sub), self.target.amqp_exchange, key)
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: AMQPConnection(sub, setup, self.user, self.password, self.vhost),
            self.host,
            self.port,
        )
        sub.conn, sub.closed = conn, False
        await asyncio.wait_for(conn.opened, 30)

    def drop(self, sub: Subscriber) -> None:
        conn, sub.conn = sub.conn, None
        sub.connection_closed()
        if conn is not None:
            conn.close()

    async def release(self, subs: list[Subscriber]) -> None:
        waits = []
        for sub in subs:
            conn = sub.conn
            if isinstance(conn, AMQPConnection):
                conn.delete_queue(self.queue(sub))
                waits.append(conn.deleted)
        if waits:
            await asyncio.wait(waits, timeout=10)
        for sub in subs:
            self.drop(sub)
