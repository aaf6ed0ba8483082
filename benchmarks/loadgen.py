"""The lean load generator: raw asyncio protocols, no HTTP library.

Everything here is built to cost the generator as little CPU per request or delivery as possible,
so that the generator's one core is never what limits a measurement. What ``tidings bench``'s
generator does the same way comes from the package (one copy): the keep-alive HTTP/1.1 client
(``HTTPConnection``, ``request``, ``fetch``) from ``tidings.bench.wire``; the WebSocket upgrade,
client frames and server frame walker from ``tidings.bench.ws``; closed-loop waits
(``Counting``) from ``tidings.bench.subscriber``. Here, what only these benchmarks measure with:

- ``SSEStream`` counts events by counting ``b"\\nid: "`` (every event block has an ``id:`` line and
  is preceded by a newline: the previous block's blank line or the chunk-size line), handling a
  pattern split across reads, so it never parses or copies the stream.
- ``TimedSSEStream`` additionally extracts the send timestamp embedded in each event's data and
  records publish-to-delivery latency at receipt.
- ``WSStream`` is one WebSocket client (RFC 6455) for any server: the upgrade with a fixed key,
  then server frames walked by their headers and counted, never decoded; pings answered.
  ``TimedWSStream`` records latency like ``TimedSSEStream``; ``WSPublisher`` writes pre-built
  masked frames (``tidings.bench.ws.frame``) and counts the acknowledgements, if the server
  sends any.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from tidings.bench.subscriber import Counting
from tidings.bench.wire import HTTPConnection, request
from tidings.bench.ws import CLOSE, PING, PONG, WS_ACCEPT, frame, upgrade, walk

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


def batch_request(channel: str, size: int, n: int, t: int = 0) -> bytes:
    """``POST /publish`` of ``n`` events of ``size`` bytes on ``channel``."""
    event = {"channel": channel, "data": payload(size, t)}
    return request("POST", "/publish", orjson.dumps({"events": [event] * n}))


async def check_ack(fut: Awaitable[tuple[int, bytes]]) -> None:
    status, body = await fut
    if status != 201:
        raise RuntimeError(f"publish answered {status}: {body[:200]!r}")


class Publishers:
    """Closed-loop publishers: ``depth`` requests of ``raw`` in flight on each connection, each
    sent again as soon as it is answered, until ``stop()``. While ``measuring`` is set, answers
    are counted: 201 as acknowledged (``ok``, with its latency in ns in ``latencies``), any
    other status as an error. The ``publish`` workload and clusterbench.py (which spreads the
    connections over the nodes of a cluster) measure with it.
    """

    def __init__(self, conns: Sequence[HTTPConnection], raw: bytes, depth: int = 1) -> None:
        self.measuring = False
        self.ok = 0
        self.errors = 0
        self.latencies: list[int] = []
        self._stop = False
        self._tasks = [asyncio.create_task(self._run(c, raw)) for c in conns for _ in range(depth)]

    async def _run(self, conn: HTTPConnection, raw: bytes) -> None:
        clock = time.perf_counter_ns
        while not self._stop:
            t0 = clock()
            status, _ = await conn.send(raw)
            t1 = clock()
            if self.measuring:
                if status == 201:
                    self.ok += 1
                    self.latencies.append(t1 - t0)
                else:
                    self.errors += 1

    async def stop(self, within: float = 30.0) -> None:
        """Send no more; wait (up to ``within`` s) for the requests in flight to be answered."""
        self._stop = True
        await asyncio.wait_for(asyncio.gather(*self._tasks), within)


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


# -- WebSocket ---------------------------------------------------------------------------------


class WSStream(Counting, asyncio.Protocol):
    """One WebSocket connection that counts the server's messages without decoding them.

    After the 101 it writes ``first`` (pre-built masked frames, e.g. a tidings ``subscribe``).
    ``opened`` resolves on the first message when ``wait_message`` (a subscriber: tidings'
    ``subscribed``, or a baseline's welcome, both sent once the connection receives events), else
    on the 101. Server frames are walked header by header: FIN/opcode and the 7/16/64-bit
    length (RFC 6455 §5.2); pings are answered with pongs, a close frame is echoed and recorded.
    """

    def __init__(
        self, path: bytes, first: bytes = b"", wait_message: bool = True, expect: bytes = b""
    ) -> None:
        self._request = upgrade(path.decode(), HOST)
        self._first = first
        self._wait_message = wait_message
        self._expect = expect  # the first message must contain this (e.g. b'"subscribed"')
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.count = 0  # complete data messages received, including the opening one
        self.reads = 0  # data_received calls after the handshake
        self.bytes = 0  # bytes received after the handshake
        self.close_code: int | None = None
        self.close_reason = b""
        self.closed = False
        self.first_message = b""
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._head = b""
        self._buf = b""
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def lagged(self) -> bool:
        return self.close_code == 4001

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        transport.write(self._request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.wake()
        if not self.opened.done():
            reason = f"close {self.close_code} {self.close_reason!r}" if self.close_code else ""
            self.opened.set_exception(
                exc or ConnectionError(f"closed before the stream opened {reason}".strip())
            )

    def _fail(self, why: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(why))
        self.close()

    def data_received(self, data: bytes) -> None:
        if not self.status:
            data = self._head + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._head = data
                return
            head = data[:end]
            self.status = int(head[9:12])
            self._head = b""
            if self.status != 101 or WS_ACCEPT not in head:
                return self._fail(f"upgrade answered {data[: end + 400]!r}")
            if self._first:
                self.write(self._first)
            if not self._wait_message:
                self.opened.set_result(None)
            data = data[end + 4 :]
            if not data:
                return
        self.reads += 1
        self.bytes += len(data)
        buf = self._buf + data if self._buf else data
        try:
            frames, pos = walk(buf)
        except ValueError as exc:  # a masked frame (RFC 6455 §5.1)
            return self._fail(str(exc))
        self._buf = buf[pos:]
        count = 0
        for opcode, fin, start, end in frames:
            if opcode < 8:  # text, binary or continuation: a message ends at FIN
                if fin:
                    count += 1
                    if not self.count and count == 1:
                        self._first_message(buf[start:end])
            else:
                self._control(opcode, buf[start:end])
        if count:
            self.count += count
            if self._waiters:
                self.wake(self.count)
            self.on_messages(buf, pos)

    def _first_message(self, message: bytes) -> None:
        self.first_message = message
        if self.opened.done():
            return
        if self._expect and self._expect not in message:
            self._fail(f"first message was {message[:300]!r}")
        elif self._wait_message:
            self.opened.set_result(None)

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == PING:  # RFC 6455 §5.5.3: answer with the same payload
            self.write(frame(payload, PONG))
        elif opcode == CLOSE:  # §5.5.1: record the code, echo it, let the server close TCP
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.close_reason = payload[2:]
            self.write(frame(payload[:2], CLOSE))

    def on_messages(self, buf: bytes, end: int) -> None:
        """Called with the buffer whose ``buf[:end]`` holds the frames just completed."""

    def write(self, raw: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(raw)

    def set_lowat(self, nbytes: int) -> None:
        """Wake the generator for this socket only once ``nbytes`` are queued (SO_RCVLOWAT).

        A server that writes each frame on its own otherwise costs the generator one wake-up and
        one ``read`` per frame, as much kernel time as the server's ``write``: the generator's
        core would cap the measurement. The server is unaffected (its writes land in the
        receive buffer as before). Back to 1 before waiting for the last frames, which could
        otherwise stay below the mark; Linux wakes the reader when the mark drops.
        """
        if self.transport is not None and not self.closed:
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, nbytes))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class TimedWSStream(WSStream):
    """A WebSocket subscriber that records (send time, receipt time) in ns for each message."""

    def __init__(self, path: bytes, receipts: list[tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.receipts = receipts  # shared by all streams
        self.recording = False

    def on_messages(self, buf: bytes, end: int) -> None:
        if self.recording:
            now = time.time_ns()
            self.receipts.extend((int(t), now) for t in _TS.findall(buf, 0, end))


class WSPublisher(WSStream):
    """A connection that publishes with pre-built frames and counts the replies.

    ``acks`` is a marker in every reply expected per publish (tidings: ``b'"published"'``);
    without one (the baselines, which never answer) ``publish`` returns once written.
    """

    def __init__(self, path: bytes, acks: bytes = b"") -> None:
        super().__init__(path, wait_message=False)
        self.acks = acks
        self.sent = 0
        self.replies = 0
        self.errors: list[bytes] = []
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None

    async def publish(self, frames: bytes, n: int) -> None:
        """Write ``n`` publish messages (already framed) and wait for their replies."""
        self.sent += n
        self.write(frames)
        if not self.acks:
            return
        if self.closed:
            raise ConnectionError(f"publisher closed: {self.close_code} {self.close_reason!r}")
        self._want = self.sent
        if self.replies < self._want:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def on_messages(self, buf: bytes, end: int) -> None:
        if not self.acks:
            return
        self.replies += buf.count(self.acks, 0, end)
        if b'"op":"error"' in buf[:end]:
            i = buf.find(b'"op":"error"', 0, end)
            self.errors.append(buf[max(0, i - 40) : i + 300])
            self.replies += buf.count(b'"op":"error"', 0, end)
        if self._waiter is not None and self.replies >= self._want and not self._waiter.done():
            self._waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(
                ConnectionError(f"publisher closed: {self.close_code} {self.close_reason!r}")
            )


async def open_ws(
    port: int,
    n: int,
    factory: Callable[[], WSStream],
    parallel: int = 100,
    within: float = 60.0,
) -> list[WSStream]:
    """Open ``n`` WebSocket connections (``parallel`` at a time); wait until each has opened."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(parallel)

    async def one() -> WSStream:
        async with gate:
            _, proto = await loop.create_connection(factory, HOST, port)
            await proto.opened
            return proto

    async with asyncio.timeout(within):
        return list(await asyncio.gather(*(one() for _ in range(n))))
