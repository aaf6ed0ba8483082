"""MQTT subscribers: lean MQTT 5 clients of the broker the hub relays to (docs/relays.md).

The hub publishes every event once to ``{prefix}/{channel}`` at QoS 1; the broker fans out.
Each subscriber is one TCP connection speaking as much MQTT 5 as it needs (OASIS MQTT 5.0):
CONNECT with a stable client id and a session that outlives the connection (Session Expiry
Interval, §3.1.2.11.2), SUBSCRIBE at QoS 1 without retained messages (Retain Handling 2,
§3.8.3.1), PUBLISH packets walked by their remaining length and counted, each answered with
its PUBACK (one write per read). A dropped subscriber just loses its socket; it resumes by
connecting again with Clean Start off, and the broker sends what it queued, as a durable
consumer. Releasing ends the session (DISCONNECT with Session Expiry 0).
"""

from __future__ import annotations

import asyncio
import struct
import time
from urllib.parse import unquote, urlsplit

import orjson

from ..relays.mqttcodec import property_block, utf8, varint
from .driver import Driver, Target
from .stats import Meter
from .subscriber import Subscriber
from .wire import fetch

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, DISCONNECT = 1, 2, 3, 4, 8, 9, 14
SESSION_EXPIRY = 0x11  # property identifier (§3.1.2.11.2)
SESSION_SECONDS = 300  # the broker forgets a session this long after a run that did not end
QOS1_NO_RETAINED = 0x01 | 2 << 4  # subscription options: QoS 1, Retain Handling 2


def packet(kind: int, flags: int, body: bytes) -> bytes:
    """A control packet: the fixed header (type, flags, remaining length), then ``body``."""
    return bytes((kind << 4 | flags,)) + varint(len(body)) + body


def connect_packet(
    client_id: str, clean: bool, user: str = "", password: str = "", expiry: int = SESSION_SECONDS
) -> bytes:
    flags = (0x02 if clean else 0) | (0x80 if user else 0) | (0x40 if password else 0)
    props = property_block(bytes((SESSION_EXPIRY,)) + struct.pack(">I", expiry))
    body = utf8("MQTT") + bytes((5, flags)) + struct.pack(">H", 0)  # keep-alive off
    body += props + utf8(client_id)
    if user:
        body += utf8(user)
    if password:
        body += utf8(password)
    return packet(CONNECT, 0, body)


def subscribe_packet(topic: str, packet_id: int = 1) -> bytes:
    body = struct.pack(">H", packet_id) + b"\x00" + utf8(topic) + bytes((QOS1_NO_RETAINED,))
    return packet(SUBSCRIBE, 0x2, body)


# Reason 0, then Session Expiry Interval 0: the broker drops the session now.
END_SESSION = packet(DISCONNECT, 0, b"\x00" + property_block(b"\x11\x00\x00\x00\x00"))


def walk(buf: bytes) -> tuple[list[tuple[int, int, int, int]], int]:
    """Complete packets at the start of ``buf``: (type, flags, body start, end) of each, and
    where the incomplete rest begins."""
    packets: list[tuple[int, int, int, int]] = []
    pos, n = 0, len(buf)
    while n - pos >= 2:
        length = shift = 0
        i = pos + 1
        while True:
            if i >= n:
                return packets, pos
            b = buf[i]
            length |= (b & 0x7F) << shift
            i += 1
            if not b & 0x80:
                break
            shift += 7
        if i + length > n:
            break
        packets.append((buf[pos] >> 4, buf[pos] & 0x0F, i, i + length))
        pos = i + length
    return packets, pos


class MQTTConnection(asyncio.Protocol):
    def __init__(self, sub: Subscriber, hello: bytes, topic: str) -> None:
        self.sub = sub
        self.hello = hello
        self.topic = topic  # "" when resuming: the session holds the subscription
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.write(self.hello)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("the broker closed the connection"))
        if self.sub.conn is self:
            self.sub.connection_closed(f"MQTT connection lost: {exc}")

    def write(self, raw: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.sub.meter.sent += len(raw)
            self.transport.write(raw)

    def data_received(self, data: bytes) -> None:
        sub = self.sub
        sub.meter.received += len(data)
        buf = self._buf + data if self._buf else data
        packets, rest = walk(buf)
        self._buf = buf[rest:]
        acks, k, first, last = [], 0, -1, -1
        for kind, flags, start, end in packets:
            if kind == PUBLISH:
                k += 1
                first = start if first < 0 else first
                last = end
                if flags & 0x06:  # QoS 1: topic, packet id, properties, payload
                    (topic_len,) = struct.unpack_from(">H", buf, start)
                    pid = buf[start + 2 + topic_len : start + 4 + topic_len]
                    acks.append(b"\x40\x02" + pid)
            elif kind == CONNACK:
                if buf[start + 1] != 0:
                    return self._fail(f"CONNACK reason {buf[start + 1]:#x}")
                if self.topic:
                    self.write(subscribe_packet(self.topic))
                elif not self.opened.done():  # a resumed session: nothing to subscribe
                    self.opened.set_result(None)
            elif kind == SUBACK:
                reason = buf[end - 1]
                if reason > 2:
                    return self._fail(f"SUBACK reason {reason:#x}")
                if not self.opened.done():
                    self.opened.set_result(None)
            elif kind == DISCONNECT:
                sub.error = f"the broker disconnected: reason {buf[start:end][:1].hex()}"
        if acks:
            self.write(b"".join(acks))
        if k:
            sub.delivered(buf, k, first, last)

    def _fail(self, why: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(why))
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def wait_for_relay(target: Target, name: str, within: float = 20.0) -> None:
    """Until the hub's /healthz says its ``name`` relay is connected."""
    deadline = time.monotonic() + within
    health: object = None
    while time.monotonic() < deadline:
        status, body = await fetch(target.host, target.port, "GET", "/healthz")
        health = orjson.loads(body) if status == 200 else body[:300]
        if isinstance(health, dict) and health.get("relays", {}).get(name, {}).get("connected"):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the hub's {name} relay did not connect within {within:g} s: {health!r}")


class MQTTDriver(Driver):
    name = "mqtt"
    held_by = "broker"
    window = 128  # within the broker's queue per session (max_queued_messages, 1000)

    def __init__(self, target: Target, meter: Meter) -> None:
        super().__init__(target, meter)
        url = urlsplit(target.mqtt_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 1883
        self.user, self.password = unquote(url.username or ""), unquote(url.password or "")

    async def setup(self) -> None:
        await wait_for_relay(self.target, "mqtt")

    async def connect(self, sub: Subscriber) -> None:
        resume = sub.resumes > 0
        client_id = f"tidings-bench-{self.target.run_id}-{id(sub):x}"
        hello = connect_packet(client_id, not resume, self.user, self.password)
        topic = "" if resume else f"{self.target.mqtt_prefix}/{sub.channel}"
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: MQTTConnection(sub, hello, topic), self.host, self.port
        )
        sub.conn, sub.closed = conn, False
        await asyncio.wait_for(conn.opened, 30)

    def drop(self, sub: Subscriber) -> None:
        conn, sub.conn = sub.conn, None
        sub.connection_closed()
        if conn is not None:
            conn.close()

    async def release(self, subs: list[Subscriber]) -> None:
        for sub in subs:
            conn = sub.conn
            if conn is not None:
                conn.write(END_SESSION)
            self.drop(sub)
