"""gRPC subscribers: one HTTP/2 connection (RFC 9113) and one ``Subscribe`` call each, on a raw
asyncio protocol; no gRPC library (moved from benchmarks/grpcgen.py).

grpcio's own client costs ~26 µs of CPU per streamed message: one generator core would
measure itself, not the hub. This one writes the preface, SETTINGS and one request, walks
frame headers in place, acknowledges PINGs and SETTINGS, and advertises the largest windows
(2^31-1), topping the connection window up in big steps, so the hub's writes are limited by
TCP as on the other transports. gRPC messages are split by their 5-byte length prefixes; an
``event`` message (field 2, tag 0x12) is counted, and the event's id (its field 1) becomes
the cursor, read from the protobuf bytes without a protobuf library. Resuming is a new
connection whose ``SubscribeRequest`` carries ``since`` (docs/grpc.md).
"""

from __future__ import annotations

import asyncio
import struct

from .driver import Driver, Target
from .hpack import HeaderDecoder, request_headers
from .stats import Meter
from .subscriber import Subscriber

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types (RFC 9113 §6) this client meets.
DATA, HEADERS, RST_STREAM, SETTINGS, PING = 0x0, 0x1, 0x3, 0x4, 0x6
GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x7, 0x8, 0x9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65_535
REFILL = 1 << 28  # give the server back what it sent in big steps
SUBSCRIBE = b"/tidings.v1.Tidings/Subscribe"
STREAM = 1  # the one call's stream id
SUBSCRIBED_TAG, EVENT_TAG, ID_TAG = 0x0A, 0x12, 0x0A

_FRAME = struct.Struct(">IBI")  # length (24 bits) and type (8), flags, stream id
_U32 = struct.Struct(">I")


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _FRAME.pack(len(payload) << 8 | ftype, flags, stream) + payload


def grpc_message(body: bytes) -> bytes:
    """One length-prefixed gRPC message, uncompressed."""
    return b"\x00" + _U32.pack(len(body)) + body


def client_preface() -> bytes:
    """What a client connection opens with: the preface and SETTINGS (no header table for the
    server to index into, no push, the largest stream windows), and the connection window
    raised to the largest too. Requests may follow at once, before the server's SETTINGS."""
    settings = b"".join(
        struct.pack(">HI", key, value)
        for key, value in (
            (SETTINGS_HEADER_TABLE_SIZE, 0),
            (SETTINGS_ENABLE_PUSH, 0),
            (SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW),
        )
    )
    return (
        PREFACE
        + frame(SETTINGS, 0, 0, settings)
        + frame(WINDOW_UPDATE, 0, 0, _U32.pack(MAX_WINDOW - DEFAULT_WINDOW))
    )


def header_fragment(flags: int, payload: bytes) -> bytes:
    """A HEADERS frame's header block fragment: its padding and priority fields left out
    (RFC 9113 §6.2)."""
    if flags & PADDED:
        payload = payload[1 : len(payload) - payload[0]]
    if flags & PRIORITY:
        payload = payload[5:]
    return payload


def varint(data: bytes, pos: int) -> tuple[int, int]:
    """A protobuf varint at ``pos``: (value, position after it)."""
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def field_bytes(tag: int, raw: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2): tag, varint length, bytes."""
    n, out = len(raw), bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes((tag,)) + bytes(out) + raw


def subscribe_request(channel: str, since: str = "") -> bytes:
    """``SubscribeRequest{channels: [channel], since}`` as protobuf bytes."""
    body = field_bytes(0x0A, channel.encode())
    if since:
        body += field_bytes(0x12, since.encode())
    return body


def event_id(message: bytes, pos: int) -> str:
    """The ``event.id`` of the ``SubscribeResponse`` at ``message[pos:]`` ("" if absent)."""
    _, pos = varint(message, pos + 1)  # past the event tag and its length
    if message[pos] != ID_TAG:
        return ""
    length, pos = varint(message, pos + 1)
    return message[pos : pos + length].decode()


class GRPCConnection(asyncio.Protocol):
    """One HTTP/2 connection carrying one ``Subscribe`` call for ``sub``."""

    def __init__(self, sub: Subscriber, authority: bytes, request: bytes) -> None:
        self.sub = sub
        self.meter: Meter = sub.meter
        self.headers = request_headers(SUBSCRIBE, authority)
        self.request = grpc_message(request)
        self.transport: asyncio.Transport | None = None
        self.decoder = HeaderDecoder()
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status = b""  # grpc-status once the call ended
        self.error = b""  # tidings-error
        self._buf = b""
        self._rest = b""  # an incomplete gRPC message
        self._block = b""  # a header block continued in CONTINUATION frames
        self._ends = False  # that block ends the stream (trailers)
        self._unacked = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.write(
            client_preface()
            + frame(HEADERS, END_HEADERS, STREAM, self.headers)
            + frame(DATA, END_STREAM, STREAM, self.request)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        why = f"gRPC stream ended: {self.status.decode() or exc or 'connection closed'}"
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(why))
        if self.sub.conn is self:
            self.sub.lagged = self.error == b"lagged"
            self.sub.connection_closed(why)

    def write(self, raw: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.meter.sent += len(raw)
            self.transport.write(raw)

    def data_received(self, data: bytes) -> None:
        self.meter.received += len(data)
        buf = self._buf + data if self._buf else data
        pos, n = 0, len(buf)
        unpack = _FRAME.unpack_from
        while n - pos >= 9:
            head, flags, sid = unpack(buf, pos)
            end = pos + 9 + (head >> 8)
            if end > n:
                break
            ftype = head & 0xFF
            if ftype == DATA:
                self._unacked += head >> 8
                start, stop = pos + 9, end
                if flags & PADDED:
                    start += 1
                    stop -= buf[pos + 9]
                if sid == STREAM:
                    self.on_data(buf[start:stop])
            else:
                self.control(ftype, flags, sid & MAX_WINDOW, buf[pos + 9 : end])
            pos = end
        self._buf = buf[pos:] if pos < n else b""
        if self._unacked >= REFILL:
            self.write(
                frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._unacked))
                + frame(WINDOW_UPDATE, 0, STREAM, _U32.pack(self._unacked))
            )
            self._unacked = 0

    def on_data(self, chunk: bytes) -> None:
        """The call's DATA: complete gRPC messages counted, the rest kept for the next frame."""
        data = self._rest + chunk if self._rest else chunk
        pos, n, k, first, last = 0, len(data), 0, -1, -1
        while n - pos >= 5:
            (length,) = _U32.unpack_from(data, pos + 1)
            body = pos + 5
            if body + length > n:
                break
            if length and data[body] == EVENT_TAG:
                k += 1
                if first < 0:
                    first = body
                last = body
            elif length and data[body] == SUBSCRIBED_TAG and not self.opened.done():
                message = data[body : body + length]
                if b"\x10\x01" not in message:  # Subscribed.recovered (field 2) is not true
                    self.sub.unrecovered += 1
                # Subscribed.cursor: field 1 inside field 1.
                _, p = varint(message, 1)
                if message[p] == 0x0A:
                    size, p = varint(message, p + 1)
                    self.sub.cursor = message[p : p + size].decode()
                self.opened.set_result(None)
            pos = body + length
        self._rest = data[pos:] if pos < n else b""
        if k:
            self.sub.cursor = event_id(data, last) or self.sub.cursor
            self.sub.delivered(data, k, first, pos)

    def control(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if ftype in (HEADERS, CONTINUATION):
            if ftype == HEADERS:
                payload = header_fragment(flags, payload)
                self._ends = bool(flags & END_STREAM)
            self._block += payload
            if flags & END_HEADERS:
                fields = self.decoder.decode(self._block)
                self._block = b""
                if b"grpc-status" in fields:
                    self.status = fields[b"grpc-status"]
                    self.error = fields.get(b"tidings-error", b"")
                if self._ends and sid == STREAM:  # trailers: the call is over
                    self.close()
        elif ftype == SETTINGS:
            if not flags & ACK:
                self.write(frame(SETTINGS, ACK, 0))
        elif ftype == PING:
            if not flags & ACK:
                self.write(frame(PING, ACK, 0, payload))
        elif ftype in (RST_STREAM, GOAWAY) and (ftype == GOAWAY or sid == STREAM):
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class GRPCDriver(Driver):
    name = "grpc"

    def __init__(self, target: Target, meter: Meter) -> None:
        super().__init__(target, meter)
        self.authority = f"{target.host}:{target.grpc_port}".encode()

    async def connect(self, sub: Subscriber) -> None:
        t = self.target
        request = subscribe_request(sub.channel, sub.cursor)
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: GRPCConnection(sub, self.authority, request), t.host, t.grpc_port
        )
        sub.conn, sub.closed = conn, False
        await asyncio.wait_for(conn.opened, 30)

    def drop(self, sub: Subscriber) -> None:
        conn, sub.conn = sub.conn, None
        sub.connection_closed()
        if conn is not None:
            conn.close()
