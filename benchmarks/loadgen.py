"""The lean load generator: raw asyncio protocols, no HTTP library.

Everything here is built to cost the generator as little CPU per request or delivery as possible,
so that the generator's one core is never what limits a measurement:

- ``HTTPConnection`` writes pre-built HTTP/1.1 requests on a keep-alive connection and parses
  responses minimally (status line, ``content-length``; chunked bodies are not supported and not
  needed: every tidings publish answers with a length).
- ``SSEStream`` counts events by counting ``b"\\nid: "`` (every event block has an ``id:`` line and
  is preceded by a newline: the previous block's blank line or the chunk-size line), handling a
  pattern split across reads, so it never parses or copies the stream.
- ``TimedSSEStream`` additionally extracts the send timestamp embedded in each event's data and
  records publish-to-delivery latency at receipt.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque

import orjson

HOST = "127.0.0.1"
EVENT_MARK = b"\nid: "
_TAIL = len(EVENT_MARK) - 1
_TS = re.compile(rb'"t":(\d+)')


def payload(size: int, t: int = 0, fill: str = "x") -> dict[str, object]:
    """A JSON object whose compact (orjson) encoding is exactly ``size`` bytes.

    ``t`` is a 19-digit nanosecond timestamp (or 0 padded to the same width) so the size does not
    depend on it.
    """
    base = {"t": t or 1_000_000_000_000_000_000, "pad": ""}
    room = size - len(orjson.dumps(base))
    if room < 0:
        raise ValueError(f"event size {size} is too small (minimum {size - room})")
    base["pad"] = fill * room
    return base


def payload_bytes(size: int, t: int = 0) -> bytes:
    body = orjson.dumps(payload(size, t))
    assert len(body) == size, len(body)
    return body


def request(
    method: str, path: str, body: bytes = b"", content_type: str = "application/json"
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: {HOST}\r\n"
    if body or method in ("POST", "PUT"):
        head += f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


class HTTPConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests may be pipelined (responses come in order)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._waiters: deque[asyncio.Future[tuple[int, bytes]]] = deque()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, port: int) -> HTTPConnection:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(cls, HOST, port)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        err = exc or ConnectionError("connection closed by the server")
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(err)
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, raw: bytes) -> asyncio.Future[tuple[int, bytes]]:
        """Write one pre-built request; the future resolves to (status, body)."""
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        if self.transport is None or self.transport.is_closing():
            fut.set_exception(ConnectionError("connection is closed"))
            return fut
        self._waiters.append(fut)
        self.transport.write(raw)
        return fut

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            i = head.find(b"content-length:")
            if i < 0:
                length = 0
            else:
                j = head.find(b"\r\n", i)
                length = int(head[i + 15 : j if j >= 0 else len(head)])
            total = end + 4 + length
            if len(buf) < total:
                break
            status = int(buf[9:12])
            body = buf[end + 4 : total]
            buf = buf[total:]
            if self._waiters:
                w = self._waiters.popleft()
                if not w.done():
                    w.set_result((status, body))
        self._buf = buf

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def fetch(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request on a fresh connection (for /healthz and /metrics)."""
    conn = await HTTPConnection.open(port)
    try:
        return await asyncio.wait_for(conn.send(request(method, path, body)), 10)
    finally:
        conn.close()


class SSEStream(asyncio.Protocol):
    """One SSE subscriber that counts event blocks and notices being dropped."""

    def __init__(self, path: bytes) -> None:
        self._request = b"GET " + path + b" HTTP/1.1\r\nhost: " + HOST.encode() + b"\r\n"
        self._request += b"accept: text/event-stream\r\n\r\n"
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.count = 0  # event blocks seen, including the opening tidings.subscribed
        self.reads = 0  # data_received calls: about one per server write when keeping up
        self.lagged = False
        self.closed = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._head = b""
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        transport.write(self._request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed before the stream opened"))

    def data_received(self, data: bytes) -> None:
        if not self.status:
            data = self._head + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._head = data
                return
            self.status = int(data[9:12])
            self._head = b""
            if self.status != 200:
                self.opened.set_exception(ConnectionError(f"SSE answered {data[:end]!r}"))
                return
            data = data[end + 2 :]  # keep "\r\n" so the first block's "id:" follows a newline
        self.reads += 1
        self.count += data.count(EVENT_MARK) + (self._tail + data[:_TAIL]).count(EVENT_MARK)
        self._tail = data[-_TAIL:]
        if self.count and not self.opened.done():
            self.opened.set_result(None)
        if b"tidings.lagged" in data:
            self.lagged = True
        self.on_data(data)

    def on_data(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class TimedSSEStream(SSEStream):
    """An SSE subscriber that records (send time, receipt time) in ns for each event."""

    def __init__(self, path: bytes, receipts: list[tuple[int, int]]) -> None:
        super().__init__(path)
        self.receipts = receipts  # shared by all streams
        self.recording = False
        self._rest = b""

    def on_data(self, data: bytes) -> None:
        now = time.time_ns()
        buf = self._rest + data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._rest = buf
            return
        self._rest = buf[end + 2 :]
        if self.recording:
            self.receipts.extend((int(t), now) for t in _TS.findall(buf, 0, end))


async def open_streams(
    port: int,
    n: int,
    path: bytes,
    factory: type[SSEStream] = SSEStream,
    *args: object,
    parallel: int = 100,
    within: float = 60.0,
) -> list[SSEStream]:
    """Open ``n`` SSE streams (``parallel`` connects at a time); wait until each has opened."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(parallel)

    async def one() -> SSEStream:
        async with gate:
            _, proto = await loop.create_connection(lambda: factory(path, *args), HOST, port)
            await proto.opened
            return proto

    async with asyncio.timeout(within):
        return list(await asyncio.gather(*(one() for _ in range(n))))
