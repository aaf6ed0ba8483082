"""What every Log shared by several tidings nodes through an engine (Redis, NATS JetStream) does.

The engine's stream is the history *and* the fan-out between nodes: each node follows the
stream from its last delivered sequence number and calls its commit listeners (the hub, webhook
and relay wake-ups) with every event any node appended, in log order. One write is both the
append and the publish, so an event can never be live without being in history, or the reverse;
and a node that missed messages (a dropped connection, a slow consumer) reads them back by
sequence number instead of skipping them.

Rules on top of the Log contract:
- ``append`` returns once the engine has the events *and* this node has delivered them to its
  listeners, so a publisher's own subscribers see its events before the acknowledgement.
- ``head()`` is the engine's head, returned only once this node has delivered up to it: a cursor
  handed out by any node is never "ahead of the head" on another, and the hub's catch-up rule
  (history up to ``head``, then the live buffer) holds on every node.
- Continuity: when the followed stream jumps past events that are no longer there (retention
  removed them before this node read them) or the engine's stream was lost and recreated (a new
  epoch), every listener registered with ``on_discontinuity`` is told why; the hub ends its live
  subscriptions so their clients resume from their cursors and are told plainly what was lost.
- Engine errors surface as ``Unavailable`` naming the engine: publishes fail with 503, never a
  false acknowledgement. The follower reconnects with backoff and resumes where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence

from ..backoff import Backoff
from ..events import Draft, Event, Pattern
from ..exceptions import Unavailable
from . import Appended, CommitListener, notify
from .memory import Tail, select

logger = logging.getLogger("tidings.log")

Discontinuity = Callable[[str], None]

DELIVERY_TIMEOUT = (
    10.0  # seconds an append waits for this node's follower after the engine said yes
)
SYNC_TIMEOUT = 5.0  # seconds ``head`` waits for the follower to reach the engine's head
READ_PAGE = 1000  # events fetched from the engine per round trip when reading history


class EpochChanged(Exception):
    """Raised by an engine's ``follow`` when the stream it follows was lost and recreated."""

    def __init__(self, epoch: str) -> None:
        super().__init__(epoch)
        self.epoch = epoch


class SharedLog(ABC):
    """The node-side half of a shared log; subclasses talk to one engine.

    A subclass implements the ``_engine_*`` methods (each raising ``Unavailable`` on engine
    errors) and the consumer, trim and stats methods of the Log protocol.
    """

    engine_name = "engine"

    def __init__(self, *, cache_events: int = 10_000) -> None:
        self._epoch = ""
        self._listeners: list[CommitListener] = []
        self._discontinuity: list[Discontinuity] = []
        self._cache = Tail()
        self._cache_events = cache_events
        self._delivered = 0  # the last sequence number handed to the listeners
        self._low = 0  # the engine's low as last seen; the cache holds nothing at or below it
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._follower: asyncio.Task[None] | None = None
        self._poke = asyncio.Event()  # wakes an idle follower to check the engine's epoch
        self._closing = False

    # -- what an engine supplies ---------------------------------------------------------------

    @abstractmethod
    async def _engine_open(self) -> tuple[str, int]:
        """Connect; create the stream if it does not exist. Returns ``(epoch, head)``."""

    @abstractmethod
    async def _engine_close(self) -> None: ...

    @abstractmethod
    async def _engine_append(self, drafts: Sequence[Draft]) -> list[Appended]:
        """Append atomically where the engine allows; idempotent replays return the logged event."""

    @abstractmethod
    async def _engine_range(self, after: int, limit: int) -> list[Event]:
        """Up to ``limit`` consecutive stored events with ``seq > after``, in order."""

    @abstractmethod
    async def _engine_head(self) -> int: ...

    @abstractmethod
    async def low(self) -> int: ...

    @abstractmethod
    def _engine_follow(self, after: int) -> AsyncIterator[list[Event]]:
        """Yield batches of events with ``seq > after`` as they are appended, in order, until
        cancelled or the connection fails; an empty batch now and then when idle, so the caller
        can check the epoch. Raises ``EpochChanged`` when the stream was recreated."""

    @abstractmethod
    async def _engine_interrupt(self) -> None:
        """Make a follower blocked in the engine return at once (the log is closing)."""

    @abstractmethod
    async def _engine_epoch(self) -> str:
        """The stream's epoch now, recreating the stream (a new epoch) if it was lost."""

    # -- the Log protocol ----------------------------------------------------------------------

    @property
    def epoch(self) -> str:
        return self._epoch

    def listen(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def on_discontinuity(self, listener: Discontinuity) -> None:
        """Call ``listener(why)`` when live delivery could not continue without a loss."""
        self._discontinuity.append(listener)

    async def open(self) -> None:
        self._epoch, self._delivered = await self._engine_open()
        self._follower = asyncio.create_task(self._follow(), name=f"tidings-{self.engine_name}")

    async def close(self) -> None:
        follower, self._follower = self._follower, None
        if follower is not None:
            # Interrupt rather than cancel first: engine clients may hold a cancelled blocking
            # read until it returns by itself.
            self._closing = True
            await self._engine_interrupt()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(follower), 2.0)
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        self._release_waiters(error=Unavailable(f"the {self.engine_name} log is closed"))
        await self._engine_close()

    async def append(self, drafts: Sequence[Draft]) -> list[Appended]:
        if not drafts:
            return []
        appended = await self._engine_append(drafts)
        last = max((a.event.seq for a in appended if a.created), default=0)
        if last > self._delivered and appended[0].event.epoch == self._epoch:
            await self._until_delivered(last, DELIVERY_TIMEOUT)
        elif any(a.event.epoch != self._epoch for a in appended):
            self._poke.set()  # the engine started a new epoch: let the follower find out now
        return appended

    async def read(
        self, after: int, patterns: tuple[Pattern, ...] | None, limit: int
    ) -> list[Event]:
        if limit <= 0:
            return []
        after = max(after, self._low)
        if self._cache.covers(after):
            # The cache always ends at the last delivered event, so it holds all of them here.
            return self._cache.read(after, patterns, limit)
        return await self._read_engine(after, patterns, limit)

    async def _read_engine(
        self, after: int, patterns: tuple[Pattern, ...] | None, limit: int
    ) -> list[Event]:
        out: list[Event] = []
        while len(out) < limit:
            page = await self._engine_range(after, READ_PAGE)
            if not page:
                break
            out.extend(select(page, patterns, limit - len(out)))
            after = page[-1].seq
        return out

    async def head(self) -> int:
        head = await self._engine_head()
        if head > self._delivered:
            await self._until_delivered(head, SYNC_TIMEOUT)
        return self._delivered

    def _trimmed(self, low: int) -> None:
        """Retention removed events through ``low``: drop them from the cache too."""
        if low > self._low:
            self._low = low
            first = self._cache.first_seq
            if first is not None and first <= low:
                self._cache.drop_first(low - first + 1)

    # -- the follower --------------------------------------------------------------------------

    async def _follow(self) -> None:
        backoff = Backoff(initial=0.05, cap=2.0)
        while not self._closing:
            try:
                async for batch in self._engine_follow(self._delivered):
                    backoff.reset()
                    if batch:
                        await self._deliver(batch)
                    if self._poke.is_set() or not batch:
                        self._poke.clear()
                        epoch = await self._engine_epoch()
                        if epoch != self._epoch:
                            raise EpochChanged(epoch)
            except EpochChanged as changed:
                self._new_epoch(changed.epoch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    return
                delay = backoff.next()
                logger.warning(
                    "following the %s log failed (%r); again in %.1f s",
                    self.engine_name,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _deliver(self, batch: list[Event]) -> None:
        """Hand ``batch`` to the listeners, first reading back anything the stream skipped."""
        first = batch[0].seq
        if first > self._delivered + 1:
            missing = await self._engine_range(self._delivered, first - self._delivered - 1)
            if not missing or missing[0].seq != self._delivered + 1:
                self._lost(
                    f"events {self._delivered + 1}..{first - 1} were removed by retention "
                    "before this node received them"
                )
            batch = [*missing, *batch]
        fresh: list[Event] = []
        last = self._delivered
        for event in batch:  # the read-back and the batch may overlap
            if event.seq > last:
                fresh.append(event)
                last = event.seq
        if not fresh:
            return
        self._cache.extend(fresh)
        if len(self._cache) > self._cache_events:
            self._cache.drop_first(len(self._cache) - self._cache_events)
        self._delivered = fresh[-1].seq
        notify(self._listeners, fresh)
        self._release_waiters()

    def _new_epoch(self, epoch: str) -> None:
        old, self._epoch = self._epoch, epoch
        self._cache.clear()
        self._delivered = self._low = 0
        self._release_waiters(everything=True)  # their events went with the old stream
        self._lost(f"the {self.engine_name} stream was lost and recreated (epoch {old} → {epoch})")

    def _lost(self, why: str) -> None:
        logger.warning("live delivery lost continuity: %s", why)
        self._cache.clear()
        for listener in self._discontinuity:
            try:
                listener(why)
            except Exception:
                logger.exception("discontinuity listener %r failed", listener)

    async def _until_delivered(self, seq: int, timeout: float) -> None:  # noqa: ASYNC109
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, future))
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            raise Unavailable(
                f"the {self.engine_name} log has event {seq} but this node has not received it "
                f"within {timeout:.0f} s; retry with the same Idempotency-Key"
            ) from None

    def _release_waiters(self, *, everything: bool = False, error: Exception | None = None) -> None:
        delivered = self._delivered
        keep: list[tuple[int, asyncio.Future[None]]] = []
        for seq, future in self._waiters:
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            elif seq <= delivered or everything:
                future.set_result(None)
            else:
                keep.append((seq, future))
        self._waiters = keep
