"""Polling subscribers: ``GET /poll`` on one keep-alive connection each, in the loop
docs/polling.md asks of a client (``since`` = the last page's ``cursor``; ``more`` = go again
at once).

Long polling holds each request (``wait``) until events come; short polling asks every
``poll_interval`` seconds whatever happened, the subscribers spread evenly over the interval.
Pages are counted by their envelopes (``"specversion"``), never parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

from .driver import Driver
from .subscriber import Subscriber
from .wire import HTTPConnection, q, request

LIMIT = 1000  # events per page: http.max_limit, the most one answer may carry
HOLD = 30  # long poll: seconds the server may hold a request


class PollDriver(Driver):
    """The loop both kinds share; ``wait`` and the pause between polls tell them apart."""

    wait = 0
    # History, not a queue, feeds a poller: the closed loop may run a page ahead.
    window = LIMIT

    def path(self, sub: Subscriber, wait: float) -> str:
        path = f"/poll?channel={q(sub.channel)}&limit={LIMIT}"
        if sub.cursor:
            path += f"&since={q(sub.cursor)}"
        if wait:
            path += f"&wait={wait:g}"
        return path

    async def poll(self, conn: HTTPConnection, sub: Subscriber, wait: float) -> bool:
        """One request and its page; True when the page says ``more``."""
        status, body = await conn.send(request("GET", self.path(sub, wait), b"", self.target.host))
        if status != 200:
            raise ConnectionError(f"GET /poll answered {status}: {body[:200]!r}")
        i = body.rfind(b'"cursor":"')
        if i >= 0:
            sub.cursor = body[i + 10 : body.find(b'"', i + 10)].decode()
        if b'"recovered":false' in body:
            sub.unrecovered += 1
        k = body.count(b'"specversion"')
        if k:
            sub.delivered(body, k)
        return b'"more":true' in body

    async def connect(self, sub: Subscriber) -> None:
        t = self.target
        conn = await HTTPConnection.open(t.host, t.port, self.meter)
        sub.conn, sub.closed = conn, False
        if not sub.cursor:  # the first poll, without since, returns the end of the log
            await asyncio.wait_for(self.poll(conn, sub, 0), 30)
        sub.task = asyncio.create_task(self.run(conn, sub))

    async def run(self, conn: HTTPConnection, sub: Subscriber) -> None:
        raise NotImplementedError

    async def loop(self, conn: HTTPConnection, sub: Subscriber, wait: float, pause: float) -> None:
        clock = asyncio.get_running_loop().time
        nxt = clock() + random.uniform(0, pause)
        try:
            while True:
                if pause:
                    await asyncio.sleep(max(0.0, nxt - clock()))
                    nxt = max(nxt + pause, clock())
                while await self.poll(conn, sub, wait):
                    pass
        except (ConnectionError, OSError) as exc:
            if sub.conn is conn:
                sub.connection_closed(str(exc))

    def drop(self, sub: Subscriber) -> None:
        conn, sub.conn = sub.conn, None
        task, sub.task = sub.task, None
        sub.connection_closed()
        if task is not None:
            task.cancel()
        if conn is not None:
            conn.close()

    async def release(self, subs: list[Subscriber]) -> None:
        tasks = [s.task for s in subs if s.task is not None]
        await super().release(subs)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class LongPollDriver(PollDriver):
    name = "longpoll"

    async def run(self, conn: HTTPConnection, sub: Subscriber) -> None:
        await self.loop(conn, sub, HOLD, 0.0)


class ShortPollDriver(PollDriver):
    name = "poll"

    async def run(self, conn: HTTPConnection, sub: Subscriber) -> None:
        await self.loop(conn, sub, 0, self.target.poll_interval)
