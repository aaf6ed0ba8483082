"""The hub: the publish path, the subscriber registry, bounded per-subscriber queues, and resume.

Rules:
- Publish = validate → append to the Log (durable) → the Log's commit listener hands the new
  events to the Broker → the Broker calls ``deliver`` on every node → ``deliver`` offers each event
  to the matching subscriptions. Nothing on this path awaits a subscriber.
- ``Subscription.offer`` never blocks: it appends to a bounded buffer, or reports overflow. A live
  subscription that overflows ends as ``lagged``; its client resumes from its cursor.
- A subscription that resumes from a cursor first catches up from the Log, page by page, while
  live events gather in its buffer; sequence numbers discard the overlap. If the buffer overflows
  during catch-up it is simply dropped: those events are in the Log and the next page reads them.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .brokers import Broker
from .events import Cursor, Draft, Event, Pattern
from .exceptions import Unavailable
from .log import Appended, Log
from .metrics import Metrics
from .routing import Router

DEFAULT_QUEUE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class Start:
    """Where a subscription starts, and whether that continues the client's cursor exactly."""

    after: int
    recovered: bool
    head: int  # the log's head when this was decided
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """A page of history: its events, the cursor after them, whether ``since`` was continued
    (and why not), and whether more events follow at once."""

    events: list[Event]
    cursor: str
    recovered: bool
    reason: str | None
    more: bool


class Subscription:
    """One subscriber's view of the hub: its patterns, position and bounded buffer.

    Transports call ``next_batch`` (wait for events) or ``poll_batch`` (take what is there) and
    write the batch in one go, using each event's cached wire form. A transport that writes from
    a protocol callback instead of a task sets ``wakeup``: it is called (on the loop, inside the
    publish path, so it must only schedule work) when the buffer goes from empty to non-empty.
    """

    __slots__ = (
        "_buffer",
        "_catching_up",
        "_hub",
        "_overflowed",
        "_waiter",
        "after",
        "ended",
        "ended_why",
        "maxsize",
        "patterns",
        "reason",
        "recovered",
        "transport",
        "wakeup",
    )

    def __init__(
        self,
        hub: Hub,
        patterns: tuple[Pattern, ...],
        transport: str,
        maxsize: int,
    ) -> None:
        self._hub = hub
        self.patterns = patterns
        self.transport = transport
        self.maxsize = maxsize
        self.after = -1  # sequence number of the last event handed out (or the start position)
        self.recovered = True
        self.reason: str | None = None  # why continuity was lost, when it was
        self.ended: str | None = None  # None while open; then "lagged", "shutdown" or "closed"
        self.ended_why: str | None = None  # for humans: why it ended
        self._buffer: deque[Event] = deque()
        self._catching_up = True  # until ``start``: buffer everything, never lag
        self._overflowed = False
        self._waiter: asyncio.Future[None] | None = None
        self.wakeup: Callable[[], None] | None = None

    @property
    def more(self) -> bool:
        """Whether more events are available right now (history not yet read, or buffered)."""
        return self._catching_up or bool(self._buffer)

    @property
    def cursor(self) -> str:
        return f"{self._hub.log.epoch}:{self.after}"

    def start(self, start: Start) -> None:
        """Set the position the hub resolved; live events buffered so far are kept past it."""
        self.after = start.after
        self.recovered = start.recovered
        self.reason = start.reason
        self._discard_through(start.after)
        # Starting at the head there is nothing to read: live at once, so the queue bound
        # applies from the first event (a subscriber that never reads lags, it is not buffered
        # as "catching up" forever) - unless the buffer overflowed while the hub resolved.
        self._catching_up = start.after < start.head or self._overflowed

    def offer(self, event: Event) -> bool:
        """Queue ``event`` without blocking. False means the live buffer overflowed (lagged)."""
        if event.seq <= self.after:
            return True
        buffer = self._buffer
        if len(buffer) >= self.maxsize:
            if not self._catching_up:
                return False
            buffer.clear()  # still reading the Log, which has these events too
            self._overflowed = True
        buffer.append(event)
        if len(buffer) == 1:  # ``_wake``, inlined: this runs for every idle subscriber
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            wakeup = self.wakeup
            if wakeup is not None:
                wakeup()
        return True

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        wakeup = self.wakeup
        if wakeup is not None:
            wakeup()

    def end(self, reason: str, why: str | None = None) -> None:
        if self.ended is None:
            self.ended = reason
            self.ended_why = why
            self._buffer.clear()
            self._wake()

    def _discard_through(self, seq: int) -> None:
        buffer = self._buffer
        while buffer and buffer[0].seq <= seq:
            buffer.popleft()

    async def poll_batch(self, limit: int = 1000) -> list[Event]:
        """The events available now (possibly none), at most ``limit``, in order."""
        log = self._hub.log
        while self._catching_up and self.ended is None:
            self._overflowed = False
            before = self.after
            head = await log.head()
            page = await log.read(before, self.patterns, limit)
            if await log.low() > before:
                # Retention removed events this subscription had yet to read: say so, never
                # hand out a partial replay. The client resumes and is told recovered=false.
                self.recovered = False
                self.reason = (
                    f"events after cursor {log.epoch}:{before} were removed by retention "
                    "before this subscriber could read them"
                )
                self._hub.lag(self, self.reason)
                return []
            if page:
                self.after = page[-1].seq
            if len(page) < limit and not self._overflowed:
                # Everything up to ``head`` that matches is in ``page``; later events are
                # in the buffer, since the buffer did not overflow meanwhile.
                self.after = max(self.after, head)
                self._catching_up = False
            self._discard_through(self.after)
            if page:
                return page
        return self.take(limit)

    @property
    def catching_up(self) -> bool:
        """Whether history must still be read (``poll_batch``) before the live buffer."""
        return self._catching_up and self.ended is None

    def take(self, limit: int = 1000) -> list[Event]:
        """The live events buffered now, at most ``limit``, without waiting: for transports
        that write from a callback. Call only when not ``catching_up`` (then it returns [])."""
        if self._catching_up or self.ended is not None:
            return []
        buffer = self._buffer
        if not buffer:
            return []
        if len(buffer) <= limit:
            batch = list(buffer)
            buffer.clear()
        else:
            batch = [buffer.popleft() for _ in range(limit)]
        self.after = batch[-1].seq
        return batch

    async def wait(self) -> None:
        """Return once events are buffered, the subscription ends, or ``nudge`` is called."""
        if self._buffer or self._catching_up or self.ended is not None:
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def nudge(self) -> None:
        """Wake a task blocked in ``wait`` although nothing arrived (e.g. time for a ping)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_batch(self, limit: int = 1000) -> list[Event]:
        """Wait for events and return them; ``[]`` only once the subscription has ended."""
        while True:
            batch = await self.poll_batch(limit)
            if batch or self.ended is not None:
                return batch
            await self.wait()

    def close(self) -> None:
        self._hub.unsubscribe(self)


class Hub:
    def __init__(
        self,
        log: Log,
        broker: Broker,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        metrics: Metrics | None = None,
    ) -> None:
        self.log = log
        self.broker = broker
        self.queue_size = queue_size
        self.metrics = metrics or Metrics()
        self._router: Router[Subscription] = Router()
        self._subscriptions: set[Subscription] = set()
        self._running = False
        log.listen(broker.publish)
        log.on_discontinuity(self.discontinuity)
        broker.attach(self.deliver)

    @property
    def running(self) -> bool:
        """False before ``start`` and from ``drain`` on: new work is refused."""
        return self._running

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    async def start(self) -> None:
        await self.log.open()
        await self.broker.start()
        self._running = True

    def drain(self) -> None:
        """Refuse new work and end every subscription as ``shutdown`` (clients reconnect)."""
        self._running = False
        for sub in list(self._subscriptions):
            self._remove(sub, "shutdown")

    async def stop(self) -> None:
        self.drain()
        await self.broker.stop()
        await self.log.close()

    async def publish(self, drafts: Sequence[Draft]) -> list[Appended]:
        """Append drafts to the Log; returns once they are durable. Fan-out happens on commit."""
        if not self._running:
            raise Unavailable("the hub is not running (starting up or shutting down)")
        started = time.perf_counter()
        appended = await self.log.append(drafts)
        metrics = self.metrics
        metrics.append_seconds.observe(time.perf_counter() - started)
        created = sum(1 for a in appended if a.created)
        if created:
            metrics.published.inc(created)
        return appended

    def deliver(self, events: Sequence[Event]) -> None:
        """Offer events to matching subscriptions (called by the Broker, in log order)."""
        lagged: list[Subscription] = []
        match = self._router.match
        for event in events:
            for sub in match(event.channel):
                if not sub.offer(event):
                    lagged.append(sub)
        for sub in lagged:
            self.lag(sub, f"subscriber queue overflowed ({sub.maxsize} events)")

    def discontinuity(self, why: str) -> None:
        """Live delivery skipped events (a shared log lost its stream, or trimmed past this
        node): end every live subscription as lagged, so each client resumes from its cursor
        and is told plainly whether its history still exists."""
        for sub in list(self._subscriptions):
            self.lag(sub, f"live delivery lost continuity: {why}")

    def lag(self, sub: Subscription, why: str) -> None:
        """End ``sub`` as lagged: it fell behind; its client resumes from its cursor."""
        if sub.ended is None:
            self.metrics.lagged.labels(sub.transport).inc()
            self._remove(sub, "lagged", why)

    async def resolve(self, since: Cursor | None) -> Start:
        """Where to start for a client's cursor, and whether continuity holds."""
        log = self.log
        head = await log.head()
        if since is None:
            return Start(head, True, head)
        if since.epoch != log.epoch:
            why = (
                f"cursor {since} is from another log epoch (current {log.epoch}): "
                "the history it points into no longer exists"
            )
        elif since.seq > head:
            why = f"cursor {since} is ahead of the log's head {head}"
        elif since.seq < await log.low():
            why = f"events after cursor {since} have been removed by retention"
        else:
            return Start(since.seq, True, head)
        return Start(head, False, head, why)

    async def subscribe(
        self, patterns: tuple[Pattern, ...], since: Cursor | None, transport: str
    ) -> Subscription:
        """Register a subscription starting after ``since`` (or now); see ``Subscription``."""
        if not self._running:
            raise Unavailable("the hub is not running (starting up or shutting down)")
        sub = Subscription(self, patterns, transport, self.queue_size)
        # Register before reading the head: events committed meanwhile land in the buffer.
        for pattern in patterns:
            self._router.add(pattern, sub)
        self._subscriptions.add(sub)
        self.metrics.subscribers.labels(transport).inc()
        try:
            start = await self.resolve(since)
        except BaseException:
            self.unsubscribe(sub)
            raise
        sub.start(start)
        return sub

    async def history(
        self, patterns: tuple[Pattern, ...], since: Cursor | None, limit: int, transport: str
    ) -> Page:
        """One page of stored events after ``since`` (default: the oldest retained)."""
        if since is None:
            since = Cursor(self.log.epoch, await self.log.low())
        sub = await self.subscribe(patterns, since, transport)
        try:
            events = await sub.poll_batch(limit)
            return Page(events, sub.cursor, sub.recovered, sub.reason, sub.more)
        finally:
            sub.close()

    def unsubscribe(self, sub: Subscription) -> None:
        self._remove(sub, "closed")

    def _remove(self, sub: Subscription, reason: str, why: str | None = None) -> None:
        if sub in self._subscriptions:
            self._subscriptions.remove(sub)
            for pattern in sub.patterns:
                self._router.remove(pattern, sub)
            self.metrics.subscribers.labels(sub.transport).dec()
        sub.end(reason, why)
