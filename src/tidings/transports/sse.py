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

Timers: one ``Streams`` ticker per server serves every stream's heartbeat and write timeout, so
no stream arms a timer per event (per-write ``asyncio.timeout`` was a sixth of the CPU spent per
delivery in ``benchmarks/run.py latency``).
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .. import sse
from ..config import SSESettings
from ..exceptions import Unavailable
from ..hub import Subscription
from ..limits import Slot
from ..metrics import Metrics
from ..periodic import every
from . import Query, admit, context, resume_cursor

log = logging.getLogger("tidings.sse")

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
]
PLAIN_HEADERS = {name.decode(): value.decode() for name, value in HEADERS}
BATCH = 512  # events per write at most
PING = sse.comment("ping")


async def stream(request: Request) -> Response:
    ctx = context(request)
    query = Query(request, ("channel", "since", "token"))
    grant, address = admit(request, "subscribe", query)
    patterns = query.patterns(ctx.settings.limits.max_channels)
    grant.check_subscribe(patterns)
    since = resume_cursor(query, request.headers.get("last-event-id"))
    if request.method == "HEAD":  # headers only: no subscription to hold open
        return Response(headers=PLAIN_HEADERS)
    slot = ctx.limits.streams.acquire(address)  # refused before subscribing; EventStream frees it
    try:
        sub = await ctx.hub.subscribe(patterns, since, "sse")
    except Unavailable:
        slot.release()
        # An EventSource gives up for good on an error status, but reconnects after a stream
        # that ends: while shutting down, answer with retry advice and an empty stream.
        retry = b"retry: %d\n\n" % int(ctx.settings.sse.retry * 1000)  # no data: no event
        return Response(retry, headers=PLAIN_HEADERS)
    except BaseException:
        slot.release()
        raise
    return EventStream(sub, ctx.streams, ctx.hub.metrics, slot)


class Streams:
    """The open SSE streams of one server, and the one periodic tick that serves them all."""

    def __init__(self, settings: SSESettings) -> None:
        self.settings = settings
        self.open: set[EventStream] = set()

    @property
    def interval(self) -> float:
        return max(0.05, min(self.settings.heartbeat, self.settings.write_timeout) / 2)

    async def run(self, stopping: asyncio.Event) -> None:
        """Tick until ``stopping`` is set (owned by the server's task group)."""
        loop = asyncio.get_running_loop()
        async for _ in every(self.interval, stopping):
            now = loop.time()
            for stream in list(self.open):
                stream.tick(now)


class EventStream(Response):
    """Writes one subscription to the client until it ends or the client goes away."""

    def __init__(
        self, sub: Subscription, streams: Streams, metrics: Metrics, slot: Slot | None = None
    ) -> None:
        self.sub = sub
        self.slot = slot  # this stream's place in the open-stream count, freed when it ends
        self.streams = streams
        self.settings = streams.settings
        self.metrics = metrics
        self.status_code = 200
        self.background = None
        self._task: asyncio.Task[object] | None = None
        self._last_write = 0.0
        self._writing_since: float | None = None
        self._ping_due = False
        self._timed_out = False

    def opening(self) -> bytes:
        sub = self.sub
        state: dict[str, object] = {"cursor": sub.cursor, "recovered": sub.recovered}
        if sub.reason:
            state["reason"] = sub.reason
        return sse.message(
            orjson.dumps(state),
            event="tidings.subscribed",
            id=sub.cursor,
            retry_ms=int(self.settings.retry * 1000),
        )

    def tick(self, now: float) -> None:
        """Called by ``Streams``: enforce the write timeout, schedule heartbeats."""
        if self._writing_since is not None:
            if now - self._writing_since > self.settings.write_timeout and not self._timed_out:
                self._timed_out = True
                if self._task is not None:
                    self._task.cancel()
        elif now - self._last_write >= self.settings.heartbeat:
            self._ping_due = True
            self.sub.nudge()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._task = asyncio.current_task()
        self._last_write = asyncio.get_running_loop().time()
        self.streams.open.add(self)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            async with asyncio.TaskGroup() as tasks:
                watcher = tasks.create_task(self._watch(receive))
                await self._pump(send)
                watcher.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not self._timed_out:
                raise
            assert self._task is not None
            self._task.uncancel()
            # Returning without finishing the response makes the server drop the connection.
            log.info("SSE client took no data for %ss; dropped", self.settings.write_timeout)
        finally:
            self.streams.open.discard(self)
            self.sub.close()
            if self.slot is not None:
                self.slot.release()

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.sub.close()

    async def _pump(self, send: Send) -> None:
        """Write events until the subscription ends; pending events go out in one write."""
        sub = self.sub
        delivered = self.metrics.delivered.labels("sse")
        loop = asyncio.get_running_loop()

        async def write(body: bytes) -> None:
            self._writing_since = loop.time()
            await send({"type": "http.response.body", "body": body, "more_body": True})
            self._last_write = self._writing_since
            self._writing_since = None

        await write(self.opening())
        while True:
            batch = await sub.poll_batch(BATCH)
            if batch:
                await write(b"".join([sse.sse_bytes(e) for e in batch]))
                delivered.inc(len(batch))
            elif sub.ended is not None:
                break
            elif self._ping_due:
                self._ping_due = False
                await write(PING)
            else:
                await sub.wait()
        if sub.ended == "lagged":
            notice = {"cursor": sub.cursor, "reason": sub.ended_why or "subscriber lagged"}
            await write(sse.message(orjson.dumps(notice), event="tidings.lagged"))
