"""What the load generator writes: event payloads, pre-built HTTP/1.1 requests, and one lean
keep-alive HTTP/1.1 client connection (a raw asyncio protocol, no HTTP library).

Every event the benchmark publishes carries ``{"t": <publisher's time.time_ns()>, "n": <its
number in the phase + 10^9>, "pad": "xx…"}``: fixed-width numbers, so its size does not depend
on them; ``"t"`` gives publish-to-delivery latency on the host clock, ``"n"`` losses and
duplicates.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from urllib.parse import quote

import orjson

from .stats import Meter

HOST = "127.0.0.1"
N_OFFSET = 1_000_000_000  # "n" is sent as n + 10^9: always ten digits
T_WIDTH = 1_000_000_000_000_000_000  # a 19-digit placeholder for "t"
STAMP = re.compile(rb'"t":(\d{19}),"n":(\d{10})')


def payload(size: int, t: int = 0, n: int = 0) -> bytes:
    """A JSON object whose compact encoding is exactly ``size`` bytes, stamped with t and n."""
    head = b'{"t":%d,"n":%d,"pad":"' % (t or T_WIDTH, n + N_OFFSET)
    room = size - len(head) - 2
    if room < 0:
        raise ValueError(f"--payload {size} is too small: the smallest is {len(head) + 2} bytes")
    return head + b"x" * room + b'"}'


def stamps(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[bytes, bytes]]:
    """The (t, n) digit pairs of every stamped event in ``data[start:end]``."""
    return STAMP.findall(data, start, len(data) if end is None else end)


def request(
    method: str,
    path: str,
    body: bytes = b"",
    host: str = HOST,
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """One HTTP/1.1 request, as short as HTTP allows (host, and a length when there is a body)."""
    head = f"{method} {path} HTTP/1.1\r\nhost: {host}\r\n"
    if body or method in ("POST", "PUT"):
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
    for name, value in headers:
        head += f"{name}: {value}\r\n"
    return head.encode() + b"\r\n" + body


def q(text: str) -> str:
    """A query-string value (channel names keep their slashes)."""
    return quote(text, safe="/:*")


def publish_batch(events: list[tuple[str, bytes]], host: str = HOST) -> bytes:
    """``POST /publish`` of (channel, JSON data) events."""
    body = b'{"events":[' + b",".join(
        b'{"channel":' + orjson.dumps(ch) + b',"data":' + data + b"}" for ch, data in events
    )
    return request("POST", "/publish", body + b"]}", host)


def messages(buf: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """The complete HTTP/1.1 messages (requests or responses) at the start of ``buf``:
    (start, end of head, end) of each, its body being ``buf[head + 4 : end]``, and where the
    incomplete rest begins. A body is framed by ``content-length`` only (none: no body; every
    tidings answer and webhook request has one, chunked bodies are not needed)."""
    found = []
    pos, n = 0, len(buf)
    while True:
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        head = buf[pos:end].lower()
        i = head.find(b"\r\ncontent-length:")
        length = 0
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + 17 : j if j >= 0 else len(head)])
        total = end + 4 + length
        if total > n:
            break
        found.append((pos, end, total))
        pos = total
    return found, pos


class HTTPConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection; responses resolve requests in order.

    Parses only the status line and ``content-length`` (``messages``). ``meter`` counts its
    bytes when given.
    """

    def __init__(self, meter: Meter | None = None) -> None:
        self.meter = meter
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._waiters: deque[asyncio.Future[tuple[int, bytes]]] = deque()
        self.closed = False

    @classmethod
    async def open(
        cls, host: str, port: int, meter: Meter | None = None, within: float = 10.0
    ) -> HTTPConnection:
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_connection(lambda: cls(meter), host, port), within
        )
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        err = exc or ConnectionError("connection closed by the server")
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(err)

    def send(self, raw: bytes) -> asyncio.Future[tuple[int, bytes]]:
        """Write one pre-built request; the future resolves to (status, body)."""
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        if self.transport is None or self.transport.is_closing():
            fut.set_exception(ConnectionError("connection is closed"))
            return fut
        self._waiters.append(fut)
        if self.meter is not None:
            self.meter.sent += len(raw)
        self.transport.write(raw)
        return fut

    def data_received(self, data: bytes) -> None:
        if self.meter is not None:
            self.meter.received += len(data)
        buf = self._buf + data if self._buf else data
        found, rest = messages(buf)
        self._buf = buf[rest:]
        for start, end, total in found:
            if self._waiters:
                w = self._waiters.popleft()
                if not w.done():
                    w.set_result((int(buf[start + 9 : start + 12]), buf[end + 4 : total]))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def fetch(
    host: str, port: int, method: str, path: str, body: bytes = b"", within: float = 10.0
) -> tuple[int, bytes]:
    """One request on a fresh connection."""
    conn = await HTTPConnection.open(host, port, within=within)
    try:
        return await asyncio.wait_for(conn.send(request(method, path, body, host)), within)
    finally:
        conn.close()
