"""Server-Sent Events: ``GET /sse`` streams events as ``text/event-stream``.

Wire format (docs/sse.md):
- First ``retry:`` advice and a ``tidings.subscribed`` event whose ``id`` is the position the
  stream starts from and whose data says ``recovered`` (false, with a ``reason``, when the cursor
  could not be continued: the stream then goes on live from the head).
- Then one block per event: ``id:`` cursor, ``event:`` type (omitted for ``message``), ``data:``
  the JSON envelope. Events pending for one subscriber go out in one write.
- A ``: ping`` comment every ``sse.heartbeat`` seconds.
- While the server shuts down, a new request gets only ``retry:`` advice and an empty stream, so
  browsers reconnect (to this node once it is back, or another).
- A subscriber that overflows its queue gets ``event: tidings.lagged`` and the stream ends; the
  browser reconnects with ``Last-Event-ID`` and resumes. A client that does not take a write
  within ``sse.write_timeout`` is dropped.
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
from ..metrics import Metrics
from . import Query, context, resume_cursor

log = logging.getLogger("tidings.sse")

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
]
PLAIN_HEADERS = {name.decode(): value.decode() for name, value in HEADERS}
BATCH = 512  # events per write at most


async def stream(request: Request) -> Response:
    ctx = context(request)
    query = Query(request, ("channel", "since"))
    patterns = query.patterns()
    since = resume_cursor(query, request.headers.get("last-event-id"))
    if request.method == "HEAD":  # headers only: no subscription to hold open
        return Response(headers=PLAIN_HEADERS)
    try:
        sub = await ctx.hub.subscribe(patterns, since, "sse")
    except Unavailable:
        # An EventSource gives up for good on an error status, but reconnects after a stream
        # that ends: while shutting down, answer with retry advice and an empty stream.
        retry = b"retry: %d\n\n" % int(ctx.settings.sse.retry * 1000)  # no data: no event
        return Response(retry, headers=PLAIN_HEADERS)
    return EventStream(sub, ctx.settings.sse, ctx.hub.metrics)


class EventStream(Response):
    """Writes one subscription to the client until it ends or the client goes away."""

    def __init__(self, sub: Subscription, settings: SSESettings, metrics: Metrics) -> None:
        self.sub = sub
        self.settings = settings
        self.metrics = metrics
        self.status_code = 200
        self.background = None

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            async with asyncio.TaskGroup() as tasks:
                watcher = tasks.create_task(self._watch(receive))
                finished = await self._pump(send)
                watcher.cancel()
            if finished:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                # Returning without finishing the response makes the server drop the connection.
                log.info("SSE client took no data for %ss; dropped", self.settings.write_timeout)
        finally:
            self.sub.close()

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.sub.close()

    async def _pump(self, send: Send) -> bool:
        """Write events until the subscription ends: True, or False if a write timed out."""
        sub = self.sub
        settings = self.settings
        delivered = self.metrics.delivered.labels("sse")
        write_timeout = settings.write_timeout

        async def write(body: bytes) -> None:
            async with asyncio.timeout(write_timeout):
                await send({"type": "http.response.body", "body": body, "more_body": True})

        try:
            await write(self.opening())
            while True:
                try:
                    async with asyncio.timeout(settings.heartbeat):
                        batch = await sub.next_batch(BATCH)
                except TimeoutError:
                    await write(sse.comment("ping"))
                    continue
                if not batch:
                    break
                await write(b"".join([sse.sse_bytes(e) for e in batch]))
                delivered.inc(len(batch))
            if sub.ended == "lagged":
                notice = {"cursor": sub.cursor, "reason": sub.ended_why or "subscriber lagged"}
                await write(sse.message(orjson.dumps(notice), event="tidings.lagged"))
        except TimeoutError:
            return False
        return True
