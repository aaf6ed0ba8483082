"""One benchmark subscriber: what it received, its cursor, and who waits for it.

A ``Subscriber`` outlives its connections: a dropped subscriber resumes on a new connection
with its ``cursor`` and keeps counting. The transports' lean protocols call ``delivered``
with the bytes of the complete events they just read.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from .stats import Meter, Tally
from .wire import N_OFFSET, STAMP

CURSOR = re.compile(rb'"(?:id|cursor)":"([a-z0-9]+:\d+)"')


class Counting:
    """``reached(n)`` futures over something that counts what it receives (``count``) until
    it closes (``closed``): whoever sends in a closed loop sleeps until the slowest receiver
    catches up, instead of polling (uvloop's timers have 1 ms resolution: a shorter sleep
    spins). The receiver calls ``wake(count)`` as messages arrive and ``wake()`` when it closes.
    """

    count: int
    closed: bool
    _waiters: list[tuple[int, asyncio.Future[None]]]

    def reached(self, n: int) -> asyncio.Future[None] | None:
        """A future resolved once ``count >= n`` or it closes; None if either has happened."""
        if self.count >= n or self.closed:
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        return fut

    def wake(self, upto: int | None = None) -> None:
        """Resolve ``reached`` futures up to ``upto`` (all of them without it)."""
        keep = []
        for n, fut in self._waiters:
            if upto is None or n <= upto:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((n, fut))
        self._waiters = keep


class Subscriber(Counting):
    """A logical subscriber on ``channel``; ``conn`` is its current connection (if any)."""

    def __init__(self, index: int, channel: str, meter: Meter) -> None:
        self.index = index
        self.channel = channel
        self.meter = meter
        self.count = 0  # events received (opening messages not included)
        self.cursor = ""  # the last position received: resume from here
        self.tally: Tally | None = None  # while set: every stamped event's "n" is tallied
        self.samples: list[int] | None = None  # while set: publish-to-delivery ns go here
        self.unrecovered = 0  # resumes the server said it could not continue
        self.resumes = 0
        self.conn: Any = None
        self.task: asyncio.Task[None] | None = None  # a polling subscriber's loop
        self.closed = True  # no open connection
        self.lagged = False  # the server dropped it for falling behind
        self.error = ""
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def delivered(self, data: bytes, k: int, start: int = 0, end: int | None = None) -> None:
        """``k`` events arrived; their bytes are ``data[start:end]``."""
        if k <= 0:
            return
        self.count += k
        tally = self.tally
        if tally is not None:
            now = time.time_ns()
            samples = self.samples
            for t, n in STAMP.findall(data, start, len(data) if end is None else end):
                tally.add(int(n) - N_OFFSET)
                if samples is not None:
                    samples.append(now - int(t))
        if self._waiters:
            self.wake(self.count)

    def set_cursor_from(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        """The last ``"id"`` or ``"cursor"`` (``epoch:seq``) in ``data[start:end]`` becomes the
        cursor: an event's id, or where a subscription or a page starts or ends."""
        found = None
        for m in CURSOR.finditer(data, start, len(data) if end is None else end):
            found = m
        if found is not None:
            self.cursor = found.group(1).decode()

    def connection_closed(self, why: str = "") -> None:
        self.closed = True
        if why and not self.error:
            self.error = why
        self.wake()
