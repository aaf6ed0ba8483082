"""HTTP polling: ``GET /poll`` answers at once (short poll) or holds until events (long poll).

Rules:
- The cursor comes from ``since``, else from ``If-None-Match`` (the ETag of the previous answer).
- Without either, polling starts at the head: the first answer is empty and carries the cursor.
- ``wait=<seconds>`` (up to ``poll.max_wait``) holds the request on a hub subscription until a
  matching event arrives or the time is up; a held request costs a registry entry and a future,
  no loop. A client that disconnects releases its subscription at once, not when the wait ends.
- With ``If-None-Match`` and nothing new, the answer is ``304 Not Modified``.
- A cursor the hub cannot continue from answers at once with ``recovered: false``, no events, and
  the current head as ``cursor``.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from ..events import Cursor, Event
from ..hub import Page, Subscription
from . import Query, admit, context
from .http import json_response, page_body


def etag_cursor(value: str | None) -> Cursor | None:
    """The cursor in an ``If-None-Match`` header (RFC 9110 §13.1.2), or None for ``*``/absent."""
    if value is None:
        return None
    tag = value.split(",")[0].strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    tag = tag.strip('"')
    if not tag or tag == "*":
        return None
    return Cursor.parse(tag)


async def hold(request: Request, sub: Subscription, limit: int, wait: float) -> list[Event]:
    """Wait up to ``wait`` seconds for events; a client that goes away ends the wait at once."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        sub.close()  # next_batch returns [] and the subscription leaves the registry now

    async with asyncio.TaskGroup() as tasks:
        watcher = tasks.create_task(watch())
        try:
            async with asyncio.timeout(wait):
                events = await sub.next_batch(limit)
        except TimeoutError:
            events = []
        watcher.cancel()
    return events


async def poll(request: Request) -> Response:
    ctx = context(request)
    settings = ctx.settings
    query = Query(request, ("channel", "since", "limit", "wait", "token"))
    grant, address = admit(request, "subscribe", query)
    patterns = query.patterns(settings.limits.max_channels)
    grant.check_subscribe(patterns)
    limit = query.integer("limit", settings.http.default_limit, 1, settings.http.max_limit)
    wait = query.seconds("wait", 0.0, settings.poll.max_wait)
    since = query.cursor()
    validator = None
    if since is None:
        since = validator = etag_cursor(request.headers.get("if-none-match"))
    transport = "longpoll" if wait > 0 else "poll"
    hub = ctx.hub
    # A long poll may be held: it counts as an open stream, refused before subscribing.
    slot = ctx.limits.streams.acquire(address) if wait > 0 else None
    try:
        sub = await hub.subscribe(patterns, since, transport)
        try:
            events = await sub.poll_batch(limit)
            if not events and wait > 0 and sub.recovered:
                events = await hold(request, sub, limit, wait)
            more = sub.more
        finally:
            sub.close()
    finally:
        if slot is not None:
            slot.release()
    if events:
        hub.metrics.delivered.labels(transport).inc(len(events))
    headers = {"ETag": f'"{sub.cursor}"', "Cache-Control": "no-cache"}
    if validator is not None and not events and sub.recovered:
        return Response(status_code=304, headers=headers)
    page = Page(events, sub.cursor, sub.recovered, sub.reason, more)
    return json_response(page_body(page), headers=headers)
