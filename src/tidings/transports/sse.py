"""Server-Sent Events: ``GET /sse`` streams events as ``text/event-stream``.

Wire format (docs/sse.md):
- First ``retry:`` advice and a ``tidings.subscribed`` event whose ``id`` is the position the
  stream starts from and whose data says ``recovered`` (false, with a ``reason``, when the cursor
  could not be continued: the stream then goes on live from the head).
- Then one block per event: ``id:`` cursor, ``event:`` type (omitted for ``message``), ``data:``
  the JSON envelope. Events pending for one subscriber go out in one write.
- A ``: ping`` comment on a stream idle for ``sse.heartbeat`` seconds.
- While the server shuts down, a new request gets only ``retry:`` advice and an empty stream, so
  browsers reconnect (to this node once it is back, or another).
- A subscriber that overflows its queue gets ``event: tidings.lagged`` and the stream ends; the
  browser reconnects with ``Last-Event-ID`` and resumes. A client that does not take a write
  within ``sse.write_timeout`` is dropped.

Structure: the request goes through the ASGI app like any other (Origin check and CORS, rate
limits, credentials, subscribing; errors as JSON). ``EventStream`` sends the response head
through ASGI, then the server's HTTP protocol hands the connection to a ``Stream``, an asyncio
protocol below ASGI (the offer is ``HANDOFF`` in the request's scope; ``server.HeaderDeadline``
makes it). From there on no task and no ASGI call per stream: the hub's ``wakeup`` marks the
stream ready, and one loop callback per server (``Streams.flush``) writes every ready stream,
each in one ``write``, from chunks encoded once per event and shared by every stream. One
ticker serves every stream's heartbeat and write timeout. A stream that resumes from a cursor
reads history in a short-lived task until it is live.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .. import sse
from ..config import SSESettings
from ..events import Event
from ..exceptions import Unavailable
from ..hub import Subscription
from ..limits import Slot
from ..metrics import Metrics
from ..periodic import every
from . import Query, admit, context, resume_cursor

log = logging.getLogger("tidings.sse")

PATH = "/sse"
HANDOFF = "tidings.handoff"  # scope key: the server's offer to take the connection below ASGI
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
]
PLAIN_HEADERS = {name.decode(): value.decode() for name, value in HEADERS}
BATCH = 512  # events per write at most
LAST_CHUNK = b"0\r\n\r\n"  # RFC 9112 §7.1: the end of a chunked body

Handoff = Callable[["Stream"], bool]


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of HTTP/1.1's chunked transfer coding (RFC 9112 §7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def chunk_bytes(event: Event) -> bytes:
    """The event's SSE block as one chunk: encoded once, shared by every stream."""
    return event.wire("sse-chunk", _encode_chunk)


def _encode_chunk(event: Event) -> bytes:
    return chunk(sse.sse_bytes(event))


PING = chunk(sse.comment("ping"))


async def stream(request: Request) -> Response:
    ctx = context(request)
    query = Query(request, ("channel", "since", "token"))
    grant, address = admit(request, "subscribe", query)
    patterns = query.patterns(ctx.settings.limits.max_channels)
    grant.check_subscribe(patterns)
    since = resume_cursor(query, request.headers.get("last-event-id"))
    if request.method == "HEAD":  # headers only: no subscription to hold open
        return Response(headers=PLAIN_HEADERS)
    slot = ctx.limits.streams.acquire(address)  # refused before subscribing; the stream frees it
    try:
        sub = await ctx.hub.subscribe(patterns, since, "sse")
    except Unavailable:
        slot.release()
        # An EventSource gives up for good on an error status, but reconnects after a stream
        # that ends: while shutting down, answer with retry advice and an empty stream.
        return Response(retry_advice(ctx.settings.sse), headers=PLAIN_HEADERS)
    except BaseException:
        slot.release()
        raise
    return EventStream(sub, ctx.streams, slot)


def retry_advice(settings: SSESettings) -> bytes:
    return b"retry: %d\n\n" % int(settings.retry * 1000)  # no data: no event


class EventStream(Response):
    """The ASGI side of one stream: the response head, then the hand-off to a ``Stream``."""

    def __init__(self, sub: Subscription, streams: Streams, slot: Slot | None = None) -> None:
        self.sub = sub
        self.streams = streams
        self.slot = slot
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handoff: Handoff | None = scope.pop(HANDOFF, None)
        taken = False
        try:
            if handoff is None:
                raise RuntimeError(
                    "GET /sse is served below ASGI: it needs tidings' own HTTP protocol "
                    "(server.HeaderDeadline), which offers the connection in the scope"
                )
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            taken = handoff(Stream(self.sub, self.streams, self.slot))
            if not taken:
                # The connection cannot leave ASGI (the client left, or a pipelined request
                # waits behind this one): end the stream at once; the client reconnects.
                body = retry_advice(self.streams.settings)
                await send({"type": "http.response.body", "body": body, "more_body": False})
        finally:
            if not taken:
                self.sub.close()
                if self.slot is not None:
                    self.slot.release()


class Streams:
    """The open SSE streams of one server: their batched writes, one ticker, catch-up tasks."""

    def __init__(
        self, settings: SSESettings, metrics: Metrics, header_timeout: float = 10.0
    ) -> None:
        self.settings = settings
        self.header_timeout = header_timeout  # limits.header_timeout
        self.open: set[Stream] = set()
        self.delivered = metrics.delivered.labels("sse")
        self.pending: dict[Stream, None] = {}  # streams with something to write
        self.flush_scheduled = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: asyncio.TaskGroup | None = None

    @property
    def interval(self) -> float:
        return max(0.05, min(self.settings.heartbeat, self.settings.write_timeout) / 2)

    async def run(self, stopping: asyncio.Event, grace: float = 5.0) -> None:
        """Own the catch-up tasks and tick until ``stopping`` is set (owned by the server's task
        group); then until the streams are gone (the hub ended them) or ``grace`` runs out."""
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            async for _ in every(self.interval, stopping):
                self._tick(loop.time())
            deadline = loop.time() + grace
            while self.open and loop.time() < deadline:
                await asyncio.sleep(0.1)
                self._tick(loop.time())
            for stream in list(self.open):
                stream.abort()
        self._tasks = None

    def _tick(self, now: float) -> None:
        for stream in list(self.open):
            stream.tick(now)

    def spawn(self, coro: Coroutine[Any, Any, None], stream: Stream) -> None:
        if self._tasks is None:  # not running (or finished): nothing may start
            coro.close()
            stream.abort()
            return
        self._tasks.create_task(coro)

    def flush(self) -> None:
        """Write every stream that has events (one loop callback for all of them)."""
        self.flush_scheduled = False
        pending, self.pending = self.pending, {}
        assert self.loop is not None
        now = self.loop.time()
        delivered = 0
        for stream in pending:
            delivered += stream.flush(now)
        if delivered:
            self.delivered.inc(delivered)


class Stream(asyncio.Protocol):
    """One SSE response below ASGI, from the hand-off to the closed connection.

    Writes are whole chunks, so the body stays valid chunked coding whatever ends it; when the
    stream ends it writes the last chunk and closes the connection (it never goes back to HTTP
    keep-alive). Events wait in the hub's bounded queue while the socket is full.
    """

    __slots__ = (
        "_connections",
        "_writable_waiter",
        "blocked_since",
        "catching_up",
        "ended",
        "last_write",
        "slot",
        "streams",
        "sub",
        "transport",
        "writable",
    )

    def __init__(self, sub: Subscription, streams: Streams, slot: Slot | None) -> None:
        self.sub = sub
        self.streams = streams
        self.slot = slot  # this stream's place in the open-stream count, freed when it ends
        self.transport: asyncio.Transport | None = None
        self._connections: set[Any] | None = None  # the server's, from ``attach``
        self.writable = True
        self.blocked_since: float | None = None  # loop time the socket filled up
        self.last_write = 0.0
        self.catching_up = False  # a task is reading history for it
        self.ended = False  # the last chunk is written, or the connection is gone
        self._writable_waiter: asyncio.Future[None] | None = None

    def attach(self, transport: asyncio.Transport, connections: set[Any], writable: bool) -> None:
        """Take over ``transport`` once the response head is written (``server.HeaderDeadline``
        calls this); ``connections`` is the server's set, so its shutdown reaches the stream."""
        streams = self.streams
        if streams.loop is None:
            streams.loop = asyncio.get_running_loop()
        self.transport = transport
        self._connections = connections
        connections.add(self)
        streams.open.add(self)
        self.last_write = streams.loop.time()
        if not writable:
            self.pause_writing()
        transport.write(chunk(self.opening()))  # first, whatever else is waiting
        sub = self.sub
        sub.wakeup = self.wake
        if sub.more or sub.ended is not None:
            self.wake()

    def opening(self) -> bytes:
        sub = self.sub
        state: dict[str, object] = {"cursor": sub.cursor, "recovered": sub.recovered}
        if sub.reason:
            state["reason"] = sub.reason
        return sse.message(
            orjson.dumps(state),
            event="tidings.subscribed",
            id=sub.cursor,
            retry_ms=int(self.streams.settings.retry * 1000),
        )

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # A client sends nothing on a stream, and a request pipelined behind it is never
        # served: as the server's header deadline would for that request, end the stream
        # after limits.header_timeout (and read no more meanwhile).
        transport, loop = self.transport, self.streams.loop
        assert transport is not None and loop is not None
        if not transport.is_reading():  # already counting down
            return
        transport.pause_reading()
        loop.call_later(self.streams.header_timeout, self._finish)

    def eof_received(self) -> bool | None:
        return None  # the client is gone: close

    def pause_writing(self) -> None:
        self.writable = False
        if self.blocked_since is None:
            assert self.streams.loop is not None
            self.blocked_since = self.streams.loop.time()

    def resume_writing(self) -> None:
        self.writable = True
        self.blocked_since = None
        self._release_writer()
        if self.sub.more:
            self.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.writable = True
        self.blocked_since = None
        self._release_writer()
        if self._connections is not None:
            self._connections.discard(self)
        streams = self.streams
        streams.open.discard(self)
        streams.pending.pop(self, None)
        self.sub.wakeup = None
        self.sub.close()
        if self.slot is not None:
            self.slot.release()
            self.slot = None

    def shutdown(self) -> None:
        """uvicorn's server is stopping: end the stream, so the client reconnects elsewhere."""
        self._finish()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- writing -------------------------------------------------------------------------------

    def wake(self) -> None:
        """The hub's ``wakeup``: events arrived (or the subscription ended). It runs on the
        publish path for every idle subscriber, so it only marks the stream."""
        streams = self.streams
        streams.pending[self] = None
        if not streams.flush_scheduled:
            streams.flush_scheduled = True
            streams.loop.call_soon(streams.flush)  # type: ignore[union-attr]  # set by attach

    def flush(self, now: float) -> int:
        """Write the events waiting for this stream in one write; returns how many."""
        if self.ended:
            return 0
        sub = self.sub
        if sub.ended is not None:
            self._finish()
            return 0
        if not self.writable:  # resume_writing wakes the stream again
            return 0
        if sub.catching_up:
            if not self.catching_up:
                self.catching_up = True
                self.streams.spawn(self._catch_up(), self)
            return 0
        events = sub.take(BATCH)
        if not events:
            return 0
        if len(events) == 1:
            data = chunk_bytes(events[0])
        else:
            data = b"".join([chunk_bytes(e) for e in events])
            if len(events) == BATCH:  # more may wait: the rest next round
                self.wake()
        self.transport.write(data)  # type: ignore[union-attr]  # set by attach
        self.last_write = now
        return len(events)

    async def _catch_up(self) -> None:
        """Write history until the subscription is live, then hand over to ``flush``."""
        sub = self.sub
        loop = asyncio.get_running_loop()
        try:
            while sub.catching_up and not self.ended:
                if not self.writable:
                    await self._until_writable()
                    continue
                page = await sub.poll_batch(BATCH)
                if page and not self.ended:
                    assert self.transport is not None
                    self.transport.write(b"".join([chunk_bytes(e) for e in page]))
                    self.last_write = loop.time()
                    self.streams.delivered.inc(len(page))
        finally:
            self.catching_up = False
        if not self.ended:
            self.wake()

    def _finish(self) -> None:
        """End the response: the lagged notice if it lagged, the last chunk, then close."""
        if self.ended or self.transport is None:
            return
        self.ended = True
        sub = self.sub
        data = LAST_CHUNK
        if sub.ended == "lagged":
            notice = {"cursor": sub.cursor, "reason": sub.ended_why or "subscriber lagged"}
            data = chunk(sse.message(orjson.dumps(notice), event="tidings.lagged")) + data
        self.transport.write(data)
        self.transport.close()  # after the buffer drains; the ticker drops it if it does not

    def tick(self, now: float) -> None:
        """Called by ``Streams``: enforce the write timeout, write heartbeats."""
        settings = self.streams.settings
        if self.blocked_since is not None:
            if now - self.blocked_since > settings.write_timeout:
                log.info("SSE client took no data for %ss; dropped", settings.write_timeout)
                self.blocked_since = None
                self.abort()
        elif not self.ended and now - self.last_write >= settings.heartbeat:
            assert self.transport is not None
            self.transport.write(PING)
            self.last_write = now

    async def _until_writable(self) -> None:
        if self.writable:
            return
        if self._writable_waiter is None or self._writable_waiter.done():
            assert self.streams.loop is not None
            self._writable_waiter = self.streams.loop.create_future()
        await self._writable_waiter

    def _release_writer(self) -> None:
        waiter = self._writable_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
