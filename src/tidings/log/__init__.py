"""The Log seam: one totally ordered, durable history of every event in a deployment.

Contract (checked by ``tests/contracts/test_log.py`` against every implementation):
- ``append`` gives each new event the next sequence number and returns only once the events are
  durable at the configured level. A draft whose ``(channel, idempotency_key)`` was appended within
  the idempotency window returns the event already logged, flagged ``created=False``.
- Listeners registered with ``listen`` are called on the event loop with every committed batch of
  new events, in log order, before the appends that wrote them return. The hub's live fan-out hangs
  off this, which is why live delivery is in log order even with concurrent publishers.
- ``read(after, patterns, limit)`` returns up to ``limit`` events with ``seq > after`` whose channel
  matches one of ``patterns`` (all channels when ``None``), in order.
- ``head()`` is the last sequence number appended (0 for an empty log); ``low()`` is the sequence
  number through which retention may have removed events: a reader at ``after >= low()`` misses
  nothing.
- ``epoch`` is created with the log and never changes while the log's data survives.
- Consumer cursors (``get_consumer``/``set_consumer``/``delete_consumer``) persist positions of
  durable consumers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..events import Draft, Event, Pattern

CommitListener = Callable[[Sequence[Event]], None]

logger = logging.getLogger("tidings.log")


def notify(listeners: Sequence[CommitListener], events: Sequence[Event]) -> None:
    """Call every commit listener. The events are committed whatever a listener does, so a
    failing listener is logged and never fails the append (or wedges the log's writer)."""
    for listener in listeners:
        try:
            listener(events)
        except Exception:
            logger.exception("commit listener %r failed", listener)


@dataclass(frozen=True, slots=True)
class Appended:
    event: Event
    created: bool


@dataclass(frozen=True, slots=True)
class LogStats:
    events: int
    head: int
    low: int
    bytes: int | None = None


class Log(Protocol):
    @property
    def epoch(self) -> str: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def listen(self, listener: CommitListener) -> None: ...

    def on_discontinuity(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(why)`` if live delivery to listeners ever skips events (a shared log
        whose stream was lost, or trimmed past this node); a local log never does."""

    async def append(self, drafts: Sequence[Draft]) -> list[Appended]: ...

    async def read(
        self, after: int, patterns: tuple[Pattern, ...] | None, limit: int
    ) -> list[Event]: ...

    async def head(self) -> int: ...

    async def low(self) -> int: ...

    async def trim(self, now: float | None = None) -> int: ...

    async def stats(self) -> LogStats: ...

    async def get_consumer(self, name: str) -> int | None: ...

    async def set_consumer(self, name: str, seq: int) -> None: ...

    async def delete_consumer(self, name: str) -> None: ...


# Implementations by name, as import strings, so optional backends load only when chosen.
BACKENDS = {
    "memory": "tidings.log.memory:MemoryLog",
    "sqlite": "tidings.log.sqlite:SQLiteLog",
    "redis": "tidings.log.redis:RedisLog",
    "nats": "tidings.log.nats:NatsLog",
}
