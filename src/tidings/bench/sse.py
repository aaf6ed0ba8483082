"""Server-Sent Events subscribers: one ``GET /sse`` stream each, read without an SSE parser.

Event blocks are found by their ``data: {"specversion"`` line (the envelope; the opening
``tidings.subscribed`` block carries ``{"cursor"…}`` instead) and the cursor is the last
``id:`` line; only complete blocks (up to the last blank line) are looked at, so a block split
across reads is seen once, whole. Resuming sends ``Last-Event-ID`` (docs/sse.md).
"""

from __future__ import annotations

import asyncio

from .driver import Driver
from .subscriber import Subscriber
from .wire import q

EVENT = b'\ndata: {"specversion"'
ID = b"\nid: "


class SSEConnection(asyncio.Protocol):
    def __init__(self, sub: Subscriber, request: bytes) -> None:
        self.sub = sub
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._head = b""
        self._rest = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.sub.meter.sent += len(self.request)
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        why = f"SSE stream closed: {exc}" if exc else ""
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed before the stream opened"))
        if self.sub.conn is self:
            self.sub.connection_closed(why)

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
            if self.status != 200:
                self.opened.set_exception(ConnectionError(f"SSE answered {data[:end]!r}"))
                self.close()
                return
            data = data[end + 2 :]  # keep "\r\n": the first line follows a newline
        buf = self._rest + data if self._rest else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._rest = buf
            return
        self._rest = buf[end + 1 :]  # from the blank line's "\n": the next "\nid: " matches
        if not self.opened.done():
            if b"tidings.subscribed" not in buf:
                return self._fail(f"SSE stream did not start with tidings.subscribed: {buf!r}")
            if b'"recovered":false' in buf:
                sub.unrecovered += 1
            self.opened.set_result(None)
        i = buf.rfind(ID, 0, end)
        if i >= 0:
            j = buf.find(b"\n", i + 5)
            sub.cursor = buf[i + 5 : j].strip().decode()
        k = buf.count(EVENT, 0, end)
        if k:
            sub.delivered(buf, k, 0, end)
        if b"event: tidings.lagged" in buf:
            sub.lagged = True

    def _fail(self, why: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(why[:300]))
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class SSEDriver(Driver):
    name = "sse"

    async def connect(self, sub: Subscriber) -> None:
        t = self.target
        head = f"GET /sse?channel={q(sub.channel)} HTTP/1.1\r\nhost: {t.host}\r\n"
        head += "accept: text/event-stream\r\n"
        if sub.cursor:
            head += f"last-event-id: {sub.cursor}\r\n"
        request = (head + "\r\n").encode()
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: SSEConnection(sub, request), t.host, t.port)
        sub.conn, sub.closed = conn, False
        await asyncio.wait_for(conn.opened, 30)

    def drop(self, sub: Subscriber) -> None:
        conn, sub.conn = sub.conn, None
        sub.connection_closed()
        if conn is not None:
            conn.close()
