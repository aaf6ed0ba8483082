"""WebSocket subscribers: ``GET /ws?channel=…[&since=…]``, frames walked by their headers.

The client side of RFC 6455 as far as a subscriber needs it: the upgrade with a fixed key
(so the expected ``Sec-WebSocket-Accept`` is a constant), server frames walked header by
header (7/16/64-bit lengths, §5.2) and counted when they are ``event`` messages, never decoded
as JSON; pings answered with masked pongs (§5.5.3), a close frame echoed (§5.5.1).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os

from .driver import Driver
from .subscriber import Subscriber
from .wire import q

# RFC 6455 §1.3's sample nonce: a fixed key makes the expected accept value a constant.
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
WS_ACCEPT = base64.b64encode(
    hashlib.sha1(WS_KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
)
TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA
EVENT = b'{"op":"event"'
SUBSCRIBED = b'{"op":"subscribed"'
LAGGED = 4001


def upgrade(path: str, host: str) -> bytes:
    """The opening handshake of one client connection (RFC 6455 §4.1)."""
    return (
        f"GET {path} HTTP/1.1\r\nhost: {host}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        f"sec-websocket-key: {WS_KEY.decode()}\r\nsec-websocket-version: 13\r\n\r\n"
    ).encode()


def frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """One unfragmented client frame, masked as clients must (RFC 6455 §5.3)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + (masked if n else b"")


def walk(buf: bytes) -> tuple[list[tuple[int, bool, int, int]], int]:
    """The complete server frames at the start of ``buf``: (opcode, fin, start, end) of each
    payload, and where the incomplete rest begins. Raises ValueError on a masked frame."""
    frames = []
    pos, n = 0, len(buf)
    while n - pos >= 2:
        b0, b1 = buf[pos], buf[pos + 1]
        if b1 & 0x80:  # RFC 6455 §5.1: a server must not mask its frames
            raise ValueError(f"masked frame from the server: {buf[pos : pos + 16]!r}")
        length = b1 & 0x7F
        start = pos + 2
        if length == 126:
            start = pos + 4
            if start > n:
                break
            length = buf[pos + 2] << 8 | buf[pos + 3]
        elif length == 127:
            start = pos + 10
            if start > n:
                break
            length = int.from_bytes(buf[pos + 2 : start], "big")
        end = start + length
        if end > n:
            break
        frames.append((b0 & 0x0F, bool(b0 & 0x80), start, end))
        pos = end
    return frames, pos


class WSConnection(asyncio.Protocol):
    def __init__(self, sub: Subscriber, request: bytes) -> None:
        self.sub = sub
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.close_code: int | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._head = b""
        self._buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            why = f"close {self.close_code}" if self.close_code else "closed before subscribed"
            self.opened.set_exception(exc or ConnectionError(why))
        if self.sub.conn is self:
            self.sub.lagged = self.close_code == LAGGED
            self.sub.connection_closed(f"WebSocket closed ({self.close_code or exc})")

    def write(self, raw: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.sub.meter.sent += len(raw)
            self.transport.write(raw)

    def data_received(self, data: bytes) -> None:
        sub = self.sub
        sub.meter.received += len(data)
        if not self.status:
            data = self._head + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._head = data
                return
            self.status = int(data[9:12])
            if self.status != 101 or WS_ACCEPT not in data[:end]:
                return self._fail(f"upgrade answered {data[: end + 300]!r}")
            data = data[end + 4 :]
            if not data:
                return
        buf = self._buf + data if self._buf else data
        try:
            frames, rest = walk(buf)
        except ValueError as exc:
            return self._fail(str(exc))
        self._buf = buf[rest:]
        k, first, last = 0, -1, -1
        for opcode, _fin, start, end in frames:
            if opcode == TEXT:
                if buf.startswith(EVENT, start):
                    k += 1
                    if first < 0:
                        first = start
                    last = start
                elif buf.startswith(SUBSCRIBED, start):
                    if b'"recovered":false' in buf[start:end]:
                        sub.unrecovered += 1
                    sub.set_cursor_from(buf, start, end)
                    if not self.opened.done():
                        self.opened.set_result(None)
                elif b'"op":"error"' in buf[start:end]:
                    sub.error = buf[start:end].decode(errors="replace")[:300]
            elif opcode == PING:
                self.write(frame(buf[start:end], PONG))
            elif opcode == CLOSE:
                payload = buf[start:end]
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.write(frame(payload[:2], CLOSE))
        if k:
            end = frames[-1][3]
            sub.set_cursor_from(buf, last, end)
            sub.delivered(buf, k, first, end)

    def _fail(self, why: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(why[:300]))
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class WSDriver(Driver):
    name = "ws"

    async def connect(self, sub: Subscriber) -> None:
        t = self.target
        path = f"/ws?channel={q(sub.channel)}"
        if sub.cursor:
            path += f"&since={q(sub.cursor)}"
        request = upgrade(path, t.host)
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: WSConnection(sub, request), t.host, t.port)
        sub.conn, sub.closed = conn, False
        await asyncio.wait_for(conn.opened, 30)

    def drop(self, sub: Subscriber) -> None:
        conn, sub.conn = sub.conn, None
        sub.connection_closed()
        if conn is not None:
            conn.close()
