"""The in-memory Log: history in one process's memory, bounded by count and age.

It is a real Log (the contract suite runs against it) and the test fake for everything above it.
``Tail``, its storage, also serves as the SQLite log's cache of recent events.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Sequence

from ..events import Draft, Event, Pattern
from . import Appended, CommitListener, LogStats, notify


def new_epoch() -> str:
    return secrets.token_hex(4)


def select(
    events: Iterable[Event], patterns: tuple[Pattern, ...] | None, limit: int
) -> list[Event]:
    """The first ``limit`` of ``events`` whose channel matches a pattern (all when ``None``)."""
    out: list[Event] = []
    if limit <= 0:
        return out
    for event in events:
        if patterns is None or any(p.matches(event.channel) for p in patterns):
            out.append(event)
            if len(out) >= limit:
                break
    return out


class Tail:
    """A window of consecutive events ``[first, last]`` in a list, addressed by sequence number."""

    __slots__ = ("_events", "_start")

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._start = 0  # index of the first live element; the prefix is garbage until compacted

    def __len__(self) -> int:
        return len(self._events) - self._start

    @property
    def first_seq(self) -> int | None:
        return self._events[self._start].seq if len(self) else None

    def oldest(self) -> Event | None:
        return self._events[self._start] if len(self) else None

    def extend(self, events: Sequence[Event]) -> None:
        if events and len(self) and events[0].seq != self._events[-1].seq + 1:
            # Not contiguous (another writer appended in between): start the window afresh.
            self.clear()
        self._events.extend(events)

    def covers(self, after: int) -> bool:
        """True when every event with ``seq > after`` still in the log is in this window."""
        first = self.first_seq
        return first is not None and after >= first - 1

    def read(self, after: int, patterns: tuple[Pattern, ...] | None, limit: int) -> list[Event]:
        first = self.first_seq
        if first is None:
            return []
        index = self._start + max(0, after + 1 - first)
        events = self._events
        if patterns is None:
            return events[index : index + limit]
        return select((events[i] for i in range(index, len(events))), patterns, limit)

    def drop_first(self, count: int) -> list[Event]:
        count = min(count, len(self))
        dropped = self._events[self._start : self._start + count]
        self._start += count
        if self._start > 1024 and self._start * 2 > len(self._events):
            del self._events[: self._start]
            self._start = 0
        return dropped

    def clear(self) -> None:
        self._events.clear()
        self._start = 0


class MemoryLog:
    def __init__(
        self,
        *,
        max_events: int = 100_000,
        max_age: float = 3 * 86_400,
        idempotency_window: float = 86_400,
        max_bytes: int = 256 * 1024 * 1024,
        epoch: str | None = None,
    ) -> None:
        self._epoch = epoch or new_epoch()
        self._tail = Tail()
        self._head = 0
        self._low = 0
        self._bytes = 0
        self._max_events = max_events
        self._max_age = max_age
        self._max_bytes = max_bytes  # memory is the one resource this log cannot spill to disk
        self._idempotency_window = idempotency_window
        self._keys: dict[tuple[str, str], Event] = {}
        self._consumers: dict[str, int] = {}
        self._listeners: list[CommitListener] = []

    @property
    def epoch(self) -> str:
        return self._epoch

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def listen(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def on_discontinuity(self, listener: Callable[[str], None]) -> None:
        pass  # one process's log: its listeners see every event

    async def append(self, drafts: Sequence[Draft]) -> list[Appended]:
        out: list[Appended] = []
        new: list[Event] = []
        for draft in drafts:
            key = (draft.channel, draft.idempotency_key) if draft.idempotency_key else None
            if key is not None:
                seen = self._keys.get(key)
                if seen is not None and draft.time - seen.time <= self._idempotency_window:
                    out.append(Appended(seen, False))
                    continue
            self._head += 1
            event = Event.from_draft(draft, self._epoch, self._head)
            if key is not None:
                self._keys[key] = event
            self._bytes += len(event.data)
            new.append(event)
            out.append(Appended(event, True))
        if new:
            self._tail.extend(new)
            if len(self._tail) > self._max_events:
                self._drop(len(self._tail) - self._max_events)
            while self._bytes > self._max_bytes and len(self._tail) > 1:
                self._drop(1)
            notify(self._listeners, new)
        return out

    def _drop(self, count: int) -> None:
        for event in self._tail.drop_first(count):
            self._low = event.seq
            self._bytes -= len(event.data)
            if event.idempotency_key:
                key = (event.channel, event.idempotency_key)
                if self._keys.get(key) is event:
                    del self._keys[key]

    async def read(
        self, after: int, patterns: tuple[Pattern, ...] | None, limit: int
    ) -> list[Event]:
        return self._tail.read(after, patterns, limit)

    async def head(self) -> int:
        return self._head

    async def low(self) -> int:
        return self._low

    async def trim(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        cutoff = now - self._max_age
        count = 0
        tail = self._tail
        while True:
            oldest = tail.oldest()
            if oldest is None or oldest.time >= cutoff:
                break
            self._drop(1)
            count += 1
        return count

    async def stats(self) -> LogStats:
        return LogStats(events=len(self._tail), head=self._head, low=self._low, bytes=self._bytes)

    async def get_consumer(self, name: str) -> int | None:
        return self._consumers.get(name)

    async def set_consumer(self, name: str, seq: int) -> None:
        self._consumers[name] = seq

    async def delete_consumer(self, name: str) -> None:
        self._consumers.pop(name, None)
