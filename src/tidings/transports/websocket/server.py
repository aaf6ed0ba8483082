"""The WebSocket side of one server: its connections' protocol class, tasks and one ticker."""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Coroutine
from typing import Any

from ...periodic import every
from .. import Context
from ..origins import OriginPolicy
from .connection import CLOSE_TIMEOUT, INTERNAL_ERROR, Connection, Stream

log = logging.getLogger("tidings.ws")


class WebSockets:
    """The WebSocket side of one server: open connections, their tasks, one ticker."""

    def __init__(self, ctx: Context, origins: OriginPolicy) -> None:
        self.ctx = ctx
        self.settings = ctx.settings.websocket
        self.origins = origins
        self.open: set[Connection] = set()
        self.delivered = ctx.hub.metrics.delivered.labels("ws")
        self._tasks: asyncio.TaskGroup | None = None
        self._pending: dict[Connection, None] = {}
        self._flush_scheduled = False
        self._pings = 0

    def protocol_class(self) -> type[Connection]:
        """For uvicorn's ``ws`` setting: the protocol class of this server's connections."""
        return type("Connection", (Connection,), {"sockets": self, "__slots__": ()})

    @property
    def interval(self) -> float:
        s = self.settings
        return max(0.05, min(1.0, s.ping_interval / 4, s.ping_timeout / 4, s.auth_timeout / 4))

    async def run(self, stopping: asyncio.Event, grace: float) -> None:
        """Own the connections' tasks and tick until ``stopping``; then until they are gone."""
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            async for _ in every(self.interval, stopping):
                self._tick()
            deadline = loop.time() + grace + CLOSE_TIMEOUT
            while self.open and loop.time() < deadline:
                await asyncio.sleep(0.1)
                self._tick()
            for conn in list(self.open):
                conn.abort()
        self._tasks = None

    def _tick(self) -> None:
        now, wall = asyncio.get_running_loop().time(), time.time()
        for conn in list(self.open):
            conn.tick(now, wall)

    def spawn(self, coro: Coroutine[Any, Any, None], conn: Connection) -> None:
        if self._tasks is None:  # not running (or finished): nothing may start
            coro.close()
            conn.abort()
            return
        self._tasks.create_task(self._guarded(coro, conn))

    @staticmethod
    async def _guarded(coro: Coroutine[Any, Any, None], conn: Connection) -> None:
        try:
            await coro
        except Exception:  # a bug: end this connection, not the server's task group
            log.exception("WebSocket connection failed")
            conn.close(INTERNAL_ERROR, "internal error; see the server log")

    def schedule(self, conn: Connection) -> None:
        """Write ``conn``'s pending events soon, together with every other connection's."""
        self._pending[conn] = None
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def wake(self, conn: Connection, stream: Stream) -> None:
        """The hub's ``wakeup`` of a subscription: ``stream`` of ``conn`` has events (or has
        ended). Runs on the publish path for every idle subscriber, so it only marks it, in
        place (``schedule`` inlined)."""
        conn.ready[stream] = None
        self._pending[conn] = None
        if not self._flush_scheduled:
            self._flush_scheduled = True
            conn.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        delivered = 0
        for conn in pending:
            delivered += conn.flush()
        if delivered:
            self.delivered.inc(delivered)

    def ping_payload(self) -> bytes:
        self._pings = (self._pings + 1) & 0xFFFFFFFF
        return struct.pack("!I", self._pings)
