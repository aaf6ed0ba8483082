"""The load generator's gRPC client: HTTP/2 on a raw asyncio protocol, no gRPC library.

grpcio's own client (``grpc.aio``) costs ~26 µs of generator CPU per streamed message and
~115-145 µs per unary call on these machines: one generator core would saturate near 38,000
deliveries/s and measure itself, not the server. This client does only what a benchmark needs,
as ``loadgen.py`` does for HTTP/1.1 and WebSocket:

- ``H2Connection`` is one HTTP/2 connection (RFC 9113) carrying many gRPC calls: the preface
  and SETTINGS, frame headers walked in place, PINGs and SETTINGS acknowledged, flow control.
  It advertises the largest receive windows (2^31-1) and tops the connection window up in big
  steps, so the server's writes are limited by TCP, as on the other transports; it honours the
  server's windows and ``MAX_CONCURRENT_STREAMS`` for what it sends. Its opening, frames and
  request messages are ``tidings.bench.grpc``'s, whose subscribers (one call per connection)
  open the same way.
- Request headers are built once per method (HPACK literals, no Huffman, no indexing).
  Response headers and trailers are decoded by a small HPACK reader (RFC 7541) that only needs
  what a gRPC server sends: the client announces a header table of 0 bytes, so the server
  cannot index fields; Huffman-coded strings are decoded only for digits (``grpc-status``),
  others are kept undecoded.
- ``SubscribeStream`` counts the gRPC messages of one server-streaming call by their 5-byte
  length prefixes, never parsing the protobuf; ``recording`` adds (send time, receipt time)
  pairs taken from the ``"t":`` stamp inside each event's data. ``Unary`` collects one reply.
- ``AioSubscribeStream`` and ``AioUnary`` do the same with ``grpc.aio`` (``--grpc-client aio``),
  to cross-check the counts and to show what the library client would cost.
"""

from __future__ import annotations

import asyncio
import fcntl
import re
import socket
import struct
import sys
import termios
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar

from tidings.bench.grpc import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    MAX_WINDOW,
    PADDED,
    PING,
    RST_STREAM,
    SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SUBSCRIBE,
    WINDOW_UPDATE,
    client_preface,
    frame,
    grpc_message,
    header_fragment,
)
from tidings.bench.hpack import HeaderDecoder, request_headers
from tidings.bench.subscriber import Counting

HOST = "127.0.0.1"
# Give the server back what it sent in big steps: one WINDOW_UPDATE per this many bytes.
CONNECTION_REFILL = 1 << 28
STREAM_REFILL = 1 << 30

_FRAME = struct.Struct(">IBI")  # length (24 bits) and type (8), flags, stream id
_U32 = struct.Struct(">I")
_TS = re.compile(rb'"t":(\d+)')

# gRPC status codes the workloads name (grpc.StatusCode without importing grpc).
STATUS_NAMES = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    16: "UNAUTHENTICATED",
}

PUBLISH = b"/tidings.v1.Tidings/Publish"
PUBLISH_BATCH = b"/tidings.v1.Tidings/PublishBatch"
HEALTH_CHECK = b"/grpc.health.v1.Health/Check"


# -- framing (frames, the preface and request messages: tidings.bench.grpc) --------------------


def grpc_messages(data: bytes) -> list[bytes]:
    """The messages in ``data`` (one call's DATA payloads, concatenated)."""
    out, pos = [], 0
    while len(data) - pos >= 5:
        (length,) = _U32.unpack_from(data, pos + 1)
        out.append(data[pos + 5 : pos + 5 + length])
        pos += 5 + length
    return out


# HPACK (RFC 7541), as little as a gRPC client needs, lives in the package too
# (tidings.bench.hpack).


# -- calls -------------------------------------------------------------------------------------


class Call:
    """One gRPC call (one HTTP/2 stream) on an ``H2Connection``."""

    def __init__(self) -> None:
        self.stream_id = 0
        self.conn: H2Connection | None = None
        self.closed = False
        self.status: int | None = None  # grpc-status once the call ended
        self.error = b""  # tidings-error trailer
        self.message = b""  # grpc-message trailer (percent-encoded)
        self.unacked = 0  # DATA bytes received since this stream's last WINDOW_UPDATE
        self._block = b""
        self._block_ends = False

    def on_data(self, buf: bytes, start: int, stop: int) -> None:
        raise NotImplementedError

    def on_headers(self, block: bytes, flags: int, continuation: bool = False) -> None:
        if not continuation:
            self._block_ends = bool(flags & END_STREAM)
        if not flags & END_HEADERS:  # CONTINUATION frames follow
            self._block += block
            return
        if self._block:
            block, self._block = self._block + block, b""
        assert self.conn is not None
        fields = self.conn.decoder.decode(block)
        status = fields.get(b"grpc-status")
        if status is not None:
            self.status = int(status) if status.isdigit() else -1
            self.error = fields.get(b"tidings-error", b"")
            self.message = fields.get(b"grpc-message", b"")
        if self._block_ends:
            self.end()

    def reset(self, code: int) -> None:
        """RST_STREAM from the server: no trailers will come."""
        if self.status is None:
            self.status = 1 if code == 0x8 else 13  # CANCEL, else INTERNAL (gRPC's mapping)
            self.message = f"RST_STREAM {code}".encode()
        self.end()

    def end(self) -> None:
        self.closed = True
        if self.conn is not None:
            self.conn.streams.pop(self.stream_id, None)
            self.conn.call_ended()

    def outcome(self) -> str:
        """``OK``, or the status name and tidings-error, e.g. ``RESOURCE_EXHAUSTED lagged``."""
        name = "no status" if self.status is None else STATUS_NAMES.get(self.status, "")
        name = name or str(self.status)
        return f"{name} {self.error.decode(errors='replace')}".strip()


class SubscribeStream(Counting, Call):
    """One server-streaming call whose messages are counted by their length prefixes."""

    def __init__(self, receipts: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.count = 0  # complete messages, including the opening ``subscribed``
        self.reads = 0  # DATA frames for this stream
        self.bytes = 0  # DATA payload bytes for this stream (gRPC framing included)
        self.first_byte = -1  # the first message's first byte: 0x0A for ``subscribed``
        self.receipts = receipts
        self.recording = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._need = 0  # bytes still to come of the current message
        self._prefix = b""  # a length prefix split across frames
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def on_data(self, buf: bytes, start: int, stop: int) -> None:
        self.reads += 1
        self.bytes += stop - start
        pos, need, count = start, self._need, 0
        while pos < stop:
            if need:
                if self.first_byte < 0:  # the first message's body began in this frame
                    self.first_byte = buf[pos]
                if stop - pos >= need:
                    pos += need
                    need = 0
                    count += 1
                else:
                    need -= stop - pos
                    pos = stop
            elif self._prefix or stop - pos < 5:
                take = min(5 - len(self._prefix), stop - pos)
                self._prefix += buf[pos : pos + take]
                pos += take
                if len(self._prefix) == 5:
                    (need,) = _U32.unpack_from(self._prefix, 1)
                    self._prefix = b""
                    if not need:
                        count += 1
            else:
                (need,) = _U32.unpack_from(buf, pos + 1)
                pos += 5
                if not need:
                    count += 1
        self._need = need
        if count:
            self.count += count
            if self._waiters:
                self.wake(self.count)
            if not self.opened.done():
                if self.first_byte == 0x0A:
                    self.opened.set_result(None)
                else:
                    self.opened.set_exception(
                        ConnectionError(f"first message starts with {self.first_byte:#x}")
                    )
            if self.recording and self.receipts is not None:
                now = time.time_ns()
                self.receipts.extend((int(t), now) for t in _TS.findall(buf, start, stop))

    def end(self) -> None:
        super().end()
        self.wake()
        if not self.opened.done():
            self.opened.set_exception(
                ConnectionError(f"stream ended before it opened: {self.outcome()}")
            )

    @property
    def lagged(self) -> bool:
        return self.error == b"lagged"

    def set_lowat(self, nbytes: int) -> None:
        """The low-water mark of this stream's connection (shared by its other streams)."""
        if self.conn is not None:
            self.conn.set_lowat(nbytes)

    def close(self) -> None:
        if self.conn is not None and not self.closed:
            self.conn.cancel(self)


class Unary(Call):
    """One unary call; ``done`` resolves to ``(grpc-status, reply message bytes)``."""

    def __init__(self) -> None:
        super().__init__()
        self.done: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._data = b""

    def on_data(self, buf: bytes, start: int, stop: int) -> None:
        self._data += buf[start:stop]

    def end(self) -> None:
        super().end()
        if not self.done.done():
            messages = grpc_messages(self._data)
            status = -1 if self.status is None else self.status
            self.done.set_result((status, messages[0] if messages else b""))


# -- the connection ----------------------------------------------------------------------------


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection to a gRPC server, carrying many calls."""

    def __init__(self, authority: bytes) -> None:
        self.authority = authority
        self.transport: asyncio.Transport | None = None
        self.decoder = HeaderDecoder()
        self.streams: dict[int, Call] = {}
        self.next_id = 1
        self.reads = 0  # data_received calls: about one per server write when keeping up
        self.closed = False
        self.goaway: bytes | None = None
        self.lowat = 0
        self.lowat_dropped = 0  # times LowatWatch had to drop the mark (see set_lowat)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.peer_max_streams = MAX_WINDOW  # no limit until the server's SETTINGS say
        self.peer_initial_window = DEFAULT_WINDOW
        self.send_window = DEFAULT_WINDOW
        self._unacked = 0
        self._buf = b""
        self._headers: dict[bytes, bytes] = {}  # request header blocks by path
        self._pending: deque[tuple[Call, bytes, bytes]] = deque()  # waiting for a window

    @classmethod
    async def open(cls, port: int, within: float = 10.0) -> H2Connection:
        loop = asyncio.get_running_loop()
        authority = f"{HOST}:{port}".encode()
        _, proto = await loop.create_connection(lambda: cls(authority), HOST, port)
        await asyncio.wait_for(proto.ready, within)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.transport.write(client_preface())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("closed before SETTINGS"))
        for call in list(self.streams.values()):
            if call.status is None:
                call.status = 14  # UNAVAILABLE, as grpcio reports a lost connection
                call.message = b"connection lost"
            call.end()
        for call, _, _ in self._pending:
            call.status = 14
            call.end()
        self._pending.clear()

    # -- sending

    def start(self, call: Call, path: bytes, body: bytes, end: bool = True) -> None:
        """Open ``call``: headers and one request message (and the end of the request)."""
        call.conn = self
        payload = grpc_message(body)
        if self.closed or self.transport is None or self.transport.is_closing():
            call.status = 14
            call.message = b"connection closed"
            call.end()
            return
        if (
            self._pending
            or len(self.streams) >= self.peer_max_streams
            or len(payload) > min(self.send_window, self.peer_initial_window)
        ):
            self._pending.append((call, path, payload))
            return
        self._send(call, path, payload)

    def _send(self, call: Call, path: bytes, payload: bytes) -> None:
        block = self._headers.get(path)
        if block is None:
            block = self._headers[path] = request_headers(path, self.authority)
        call.stream_id = sid = self.next_id
        self.next_id += 2
        self.streams[sid] = call
        self.send_window -= len(payload)
        assert self.transport is not None
        self.transport.write(
            frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, END_STREAM, sid, payload)
        )

    def _flush_pending(self) -> None:
        while self._pending:
            call, path, payload = self._pending[0]
            if len(self.streams) >= self.peer_max_streams or len(payload) > min(
                self.send_window, self.peer_initial_window
            ):
                return
            self._pending.popleft()
            self._send(call, path, payload)

    def call_ended(self) -> None:
        if self._pending:
            self._flush_pending()

    def cancel(self, call: Call) -> None:
        """End ``call`` from our side (RST_STREAM CANCEL)."""
        if call.stream_id in self.streams and self.transport is not None:
            self.transport.write(frame(RST_STREAM, 0, call.stream_id, _U32.pack(0x8)))
        if call.status is None:
            call.status = 1
        call.end()

    def set_lowat(self, nbytes: int) -> None:
        """Wake the generator for this connection only once ``nbytes`` are queued (SO_RCVLOWAT).

        As ``loadgen.WSStream.set_lowat``: fewer wake-ups and reads when the server writes
        small messages one by one; the server is unaffected. Unlike a WebSocket, a stream that
        ends here leaves no EOF to wake the reader: its trailers (or a reply) could sit below the
        mark while the rest of the connection is quiet. ``LowatWatch`` drops the mark of such a
        connection back to 1.
        """
        if nbytes == self.lowat or self.transport is None or self.closed:
            return
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, nbytes))
        self.lowat = nbytes
        if nbytes > 1:
            LowatWatch.add(self)

    def queued(self) -> int:
        """Bytes waiting in the socket's receive queue (FIONREAD)."""
        if self.transport is None or self.closed:
            return 0
        sock = self.transport.get_extra_info("socket")
        buf = bytearray(4)
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
        return int.from_bytes(buf, sys.byteorder)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- receiving

    def data_received(self, data: bytes) -> None:
        self.reads += 1
        buf = self._buf + data if self._buf else data
        pos, n = 0, len(buf)
        unpack = _FRAME.unpack_from
        streams = self.streams
        unacked = self._unacked
        while n - pos >= 9:
            head, flags, sid = unpack(buf, pos)
            end = pos + 9 + (head >> 8)
            if end > n:
                break
            if head & 0xFF == DATA:
                length = head >> 8
                unacked += length
                call = streams.get(sid & MAX_WINDOW)
                if call is not None:
                    start, stop = pos + 9, end
                    if flags & PADDED:
                        start += 1
                        stop -= buf[pos + 9]
                    call.on_data(buf, start, stop)
                    call.unacked += length
                    if call.unacked >= STREAM_REFILL:
                        self._window_update(call.stream_id, call.unacked)
                        call.unacked = 0
                    if flags & END_STREAM:  # no trailers: not gRPC, but end it anyway
                        call.end()
            else:
                self._control(head & 0xFF, flags, sid & MAX_WINDOW, buf[pos + 9 : end])
            pos = end
        self._buf = buf[pos:] if pos < n else b""
        if unacked >= CONNECTION_REFILL:
            self._window_update(0, unacked)
            unacked = 0
        self._unacked = unacked

    def _window_update(self, sid: int, increment: int) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(WINDOW_UPDATE, 0, sid, _U32.pack(increment)))

    def _control(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if ftype in (HEADERS, CONTINUATION):
            if ftype == HEADERS:
                payload = header_fragment(flags, payload)
            call = self.streams.get(sid)
            if call is not None:
                call.on_headers(payload, flags, ftype == CONTINUATION)
            else:  # keep the HPACK state right even for a call we no longer track
                self.decoder.decode(payload)
        elif ftype == SETTINGS:
            if flags & ACK:
                return
            for i in range(0, len(payload) - 5, 6):
                key, value = struct.unpack_from(">HI", payload, i)
                if key == SETTINGS_MAX_CONCURRENT_STREAMS:
                    self.peer_max_streams = value
                elif key == SETTINGS_INITIAL_WINDOW_SIZE:
                    self.peer_initial_window = value
            assert self.transport is not None
            self.transport.write(frame(SETTINGS, ACK, 0))
            if not self.ready.done():
                self.ready.set_result(None)
            self._flush_pending()
        elif ftype == PING:
            if not flags & ACK and self.transport is not None:
                self.transport.write(frame(PING, ACK, 0, payload))
        elif ftype == WINDOW_UPDATE:
            if sid == 0:
                self.send_window += _U32.unpack_from(payload)[0] & MAX_WINDOW
                self._flush_pending()
        elif ftype == RST_STREAM:
            call = self.streams.get(sid)
            if call is not None:
                call.reset(_U32.unpack_from(payload)[0])
        elif ftype == GOAWAY:
            self.goaway = payload[8:] or b"GOAWAY"
            (last,) = _U32.unpack_from(payload)
            for stream_id, call in list(self.streams.items()):
                if stream_id > last & MAX_WINDOW:
                    call.status = 14
                    call.message = b"GOAWAY"
                    call.end()


class LowatWatch:
    """One task for all connections with a low-water mark: every 50 ms, a connection that had
    no read and whose queued bytes did not change since the last look, with bytes queued, is
    stalled below its mark (a stream's trailers, a reply, the end of a phase): its mark goes
    back to 1. A connection that is merely slow sees its queue grow and keeps the mark."""

    conns: ClassVar[dict[H2Connection, tuple[int, int]]] = {}
    task: ClassVar[asyncio.Task[None] | None] = None

    @classmethod
    def add(cls, conn: H2Connection) -> None:
        cls.conns[conn] = (-1, -1)
        if cls.task is None or cls.task.done():
            cls.task = asyncio.get_running_loop().create_task(cls.run())

    @classmethod
    async def run(cls) -> None:
        while cls.conns:
            await asyncio.sleep(0.05)
            for conn, last in list(cls.conns.items()):
                if conn.lowat <= 1 or conn.closed:
                    del cls.conns[conn]
                    continue
                now = (conn.reads, conn.queued())
                if now == last and now[1]:
                    conn.set_lowat(0)
                    conn.lowat_dropped += 1
                    del cls.conns[conn]
                else:
                    cls.conns[conn] = now


# -- helpers for the workloads -----------------------------------------------------------------


async def unary(conn: H2Connection, path: bytes, body: bytes) -> tuple[int, bytes]:
    """One unary call on ``conn``: (grpc-status, reply bytes)."""
    call = Unary()
    conn.start(call, path, body)
    return await call.done


async def wait_serving(port: int, within: float = 20.0) -> None:
    """Wait until ``grpc.health.v1.Health/Check`` answers SERVING on ``port``."""
    deadline = time.monotonic() + within
    last: object = None
    while time.monotonic() < deadline:
        try:
            conn = await H2Connection.open(port, within=2.0)
            try:
                status, reply = await asyncio.wait_for(unary(conn, HEALTH_CHECK, b""), 2.0)
            finally:
                conn.close()
            if status == 0 and reply == b"\x08\x01":  # HealthCheckResponse{status: SERVING}
                return
            last = (status, reply)
        except (TimeoutError, OSError) as exc:
            last = exc
        await asyncio.sleep(0.1)
    raise RuntimeError(f"gRPC health check did not answer SERVING within {within:g} s: {last!r}")


async def open_subscribers(
    conns: Sequence[H2Connection],
    n: int,
    request: bytes,
    receipts: list[tuple[int, int]] | None = None,
    within: float = 60.0,
) -> list[SubscribeStream]:
    """Open ``n`` Subscribe calls, round robin over ``conns``; wait for each ``subscribed``."""
    streams = []
    for i in range(n):
        s = SubscribeStream(receipts)
        conns[i % len(conns)].start(s, SUBSCRIBE, request)
        streams.append(s)
    async with asyncio.timeout(within):
        await asyncio.gather(*(s.opened for s in streams))
    return streams


# -- the same with grpc.aio (--grpc-client aio) -------------------------------------------------


def aio_channel(port: int) -> Any:
    """A grpc.aio channel with its own TCP connection (no subchannel sharing between them)."""
    import grpc

    return grpc.aio.insecure_channel(
        f"{HOST}:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )


class AioSubscribeStream(Counting):
    """A Subscribe call read with grpc.aio (raw bytes, no protobuf parsing), counted the same."""

    def __init__(self, channel: Any, request: bytes, receipts: list[tuple[int, int]] | None):
        self.count = 0
        self.reads = 0
        self.bytes = 0
        self.closed = False
        self.status: int | None = None
        self.error = b""
        self.receipts = receipts
        self.recording = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        method = channel.unary_stream(
            SUBSCRIBE.decode(), request_serializer=None, response_deserializer=None
        )
        self.call = method(request)
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        import grpc

        try:
            async for message in self.call:
                self.count += 1
                self.reads += 1
                self.bytes += len(message) + 5
                if self.count == 1:
                    if message[:1] == b"\x0a":
                        self.opened.set_result(None)
                    else:
                        self.opened.set_exception(ConnectionError(f"first message {message!r}"))
                if self._waiters:
                    self.wake(self.count)
                if self.recording and self.receipts is not None:
                    now = time.time_ns()
                    self.receipts.extend((int(t), now) for t in _TS.findall(message))
        except grpc.aio.AioRpcError as exc:
            self.status = exc.code().value[0]
            trailers = exc.trailing_metadata() or ()
            self.error = dict(trailers).get("tidings-error", "").encode()
        except asyncio.CancelledError:
            self.status = 1
        else:
            self.status = 0
        finally:
            self.closed = True
            self.wake()
            if not self.opened.done():
                self.opened.set_exception(ConnectionError(f"stream ended: {self.outcome()}"))

    outcome = Call.outcome

    def set_lowat(self, nbytes: int) -> None:
        """grpc.aio owns the sockets: no low-water mark."""

    @property
    def lagged(self) -> bool:
        return self.error == b"lagged"

    def close(self) -> None:
        self.call.cancel()


async def open_aio_subscribers(
    channels: Sequence[Any],
    n: int,
    request: bytes,
    receipts: list[tuple[int, int]] | None = None,
    within: float = 60.0,
) -> list[AioSubscribeStream]:
    streams = [AioSubscribeStream(channels[i % len(channels)], request, receipts) for i in range(n)]
    async with asyncio.timeout(within):
        await asyncio.gather(*(s.opened for s in streams))
    return streams


class AioUnary:
    """Unary calls with grpc.aio on one channel, answering like ``unary``: (status, reply)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._methods: dict[bytes, Any] = {}

    async def call(self, path: bytes, body: bytes) -> tuple[int, bytes]:
        import grpc

        method = self._methods.get(path)
        if method is None:
            method = self._methods[path] = self.channel.unary_unary(
                path.decode(), request_serializer=None, response_deserializer=None
            )
        try:
            reply = await method(body)
        except grpc.aio.AioRpcError as exc:
            return exc.code().value[0], (exc.details() or "").encode()
        return 0, reply
