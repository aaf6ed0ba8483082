"""The hub over MemoryLog + MemoryBroker: live delivery, resume, lag, shutdown, idempotency."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

import pytest

from tidings.brokers.memory import MemoryBroker
from tidings.events import Cursor, Draft, Event, Pattern, make_draft, parse_patterns
from tidings.exceptions import Unavailable
from tidings.hub import Hub, Subscription
from tidings.log import Appended, Log
from tidings.log.memory import MemoryLog

GUARD = 10  # seconds; only a guard against a hang, never a timing assertion


class MakeHub(Protocol):
    async def __call__(self, log: Log | None = None, *, queue_size: int = 1024) -> Hub: ...


@pytest.fixture
async def make_hub() -> AsyncIterator[MakeHub]:
    hubs: list[Hub] = []

    async def make(log: Log | None = None, *, queue_size: int = 1024) -> Hub:
        hub = Hub(log if log is not None else MemoryLog(), MemoryBroker(), queue_size=queue_size)
        await hub.start()
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        await hub.stop()


@pytest.fixture
async def hub(make_hub: MakeHub) -> Hub:
    return await make_hub()


def patterns(*texts: str) -> tuple[Pattern, ...]:
    return parse_patterns(texts)


async def publish(hub: Hub, channel: str, n: int = 1, type: str | None = None) -> list[Event]:
    """Publish ``n`` events on ``channel`` one call each; return the logged events."""
    events = []
    for _ in range(n):
        [appended] = await hub.publish([make_draft(channel, b'{"n": 1}', type=type)])
        events.append(appended.event)
    return events


async def drain(sub: Subscription, limit: int = 1000) -> list[Event]:
    """Everything available now: poll until the subscription has nothing more to give."""
    out: list[Event] = []
    while True:
        batch = await sub.poll_batch(limit)
        if not batch:
            return out
        assert len(batch) <= limit
        out.extend(batch)


async def collect(sub: Subscription, count: int, limit: int = 1000) -> list[Event]:
    """Wait for ``count`` events (fails, rather than hangs, if they never come)."""
    out: list[Event] = []
    async with asyncio.timeout(GUARD):
        while len(out) < count:
            batch = await sub.next_batch(limit)
            assert batch, f"subscription ended ({sub.ended}) after {len(out)} of {count} events"
            out.extend(batch)
    return out


def seqs(events: Sequence[Event]) -> list[int]:
    return [e.seq for e in events]


def lagged_count(hub: Hub, transport: str) -> float:
    value = hub.metrics.registry.get_sample_value(
        "tidings_lagged_disconnects_total", {"transport": transport}
    )
    assert value is not None
    return value


# -- live delivery ---------------------------------------------------------------------------


async def test_live_delivery_in_order(hub: Hub) -> None:
    sub = await hub.subscribe(patterns("orders/*"), None, "sse")
    assert sub.recovered is True
    assert sub.reason is None
    assert sub.ended is None
    sent = []
    for i in range(10):
        sent += await publish(hub, f"orders/{i % 3}")
        await publish(hub, "invoices/1")  # not matching
    got = await drain(sub)
    assert seqs(got) == seqs(sent)
    assert [e.channel for e in got] == [e.channel for e in sent]
    # The cursor may run past the last match (over non-matching events), never past the head.
    assert sent[-1].seq <= Cursor.parse(sub.cursor).seq <= await hub.log.head()


async def test_subscription_without_cursor_starts_at_the_head(hub: Hub) -> None:
    await publish(hub, "a", 3)
    sub = await hub.subscribe(patterns("a"), None, "sse")
    assert sub.cursor == f"{hub.log.epoch}:3"
    later = await publish(hub, "a", 2)
    assert seqs(await drain(sub)) == seqs(later) == [4, 5]


async def test_live_delivery_wakes_a_waiting_reader(hub: Hub) -> None:
    sub = await hub.subscribe(patterns("a/**"), None, "sse")
    async with asyncio.TaskGroup() as tg:
        reader = tg.create_task(collect(sub, 5))
        for i in range(5):
            await publish(hub, f"a/{i}")
    assert seqs(reader.result()) == [1, 2, 3, 4, 5]


async def test_batch_publish_is_delivered_in_log_order(hub: Hub) -> None:
    sub = await hub.subscribe(patterns("**"), None, "sse")
    drafts = [make_draft(f"c/{i}", str(i).encode()) for i in range(20)]
    appended = await hub.publish(drafts)
    assert [a.event.seq for a in appended] == list(range(1, 21))
    got = await drain(sub, limit=6)
    assert seqs(got) == list(range(1, 21))
    assert [e.data for e in got] == [d.data for d in drafts]


async def test_concurrent_publishers_are_delivered_in_log_order(hub: Hub) -> None:
    sub = await hub.subscribe(patterns("p/*"), None, "sse")
    results = await asyncio.gather(*(hub.publish([make_draft(f"p/{i}", b"x")]) for i in range(50)))
    logged = sorted(r[0].event.seq for r in results)
    assert logged == list(range(1, 51))
    assert seqs(await drain(sub)) == logged


async def test_next_batch_respects_limit(hub: Hub) -> None:
    sub = await hub.subscribe(patterns("a"), None, "sse")
    await publish(hub, "a", 10)
    batch = await sub.next_batch(limit=3)
    assert seqs(batch) == [1, 2, 3]
    assert seqs(await drain(sub, limit=3)) == list(range(4, 11))


async def test_more_reports_events_left_behind_by_a_limited_batch(hub: Hub) -> None:
    sub = await hub.subscribe(patterns("a"), None, "longpoll")
    assert await sub.poll_batch(10) == [] and sub.more is False
    await publish(hub, "a", 5)
    assert len(await sub.poll_batch(2)) == 2
    assert sub.more is True  # three still buffered: the next poll gets them at once
    assert len(await sub.poll_batch(10)) == 3
    assert sub.more is False


async def test_more_is_true_while_history_remains_unread(hub: Hub) -> None:
    first = (await publish(hub, "a", 5))[0]
    sub = await hub.subscribe(patterns("a"), Cursor(first.epoch, 0), "poll")
    assert seqs(await sub.poll_batch(2)) == [1, 2]
    assert sub.more is True
    assert seqs(await sub.poll_batch(10)) == [3, 4, 5]
    assert sub.more is False


async def test_closed_subscription_gets_nothing_more(hub: Hub) -> None:
    sub = await hub.subscribe(patterns("a"), None, "sse")
    other = await hub.subscribe(patterns("a"), None, "sse")
    assert hub.subscriber_count == 2
    sub.close()
    assert sub.ended == "closed"
    assert hub.subscriber_count == 1
    await publish(hub, "a")
    assert await sub.next_batch() == []
    assert seqs(await drain(other)) == [1]


async def test_publish_and_subscribe_before_start_are_unavailable() -> None:
    hub = Hub(MemoryLog(), MemoryBroker())
    with pytest.raises(Unavailable):
        await hub.publish([make_draft("a", b"x")])
    with pytest.raises(Unavailable):
        await hub.subscribe(patterns("a"), None, "sse")


# -- resume ----------------------------------------------------------------------------------


async def test_resume_from_a_cursor_in_the_middle_gets_exactly_the_later_events(hub: Hub) -> None:
    sent = await publish(hub, "a", 20)
    sub = await hub.subscribe(patterns("a"), Cursor.parse(sent[7].cursor), "sse")
    assert sub.recovered is True
    assert sub.reason is None
    got = await drain(sub, limit=5)
    assert seqs(got) == list(range(9, 21))
    live = await publish(hub, "a", 3)
    assert seqs(await drain(sub)) == seqs(live) == [21, 22, 23]


async def test_resume_at_the_head_gets_only_new_events(hub: Hub) -> None:
    sent = await publish(hub, "a", 4)
    sub = await hub.subscribe(patterns("a"), Cursor.parse(sent[-1].cursor), "sse")
    assert sub.recovered is True
    assert await drain(sub) == []
    assert seqs(await publish(hub, "a")) == seqs(await drain(sub)) == [5]


async def test_resume_from_zero_replays_the_whole_history(hub: Hub) -> None:
    await publish(hub, "a", 5)
    sub = await hub.subscribe(patterns("a"), Cursor(hub.log.epoch, 0), "sse")
    assert sub.recovered is True
    assert seqs(await drain(sub)) == [1, 2, 3, 4, 5]


async def test_resume_with_live_events_buffered_before_the_first_read(hub: Hub) -> None:
    await publish(hub, "a", 10)
    sub = await hub.subscribe(patterns("a"), Cursor(hub.log.epoch, 4), "sse")
    await publish(hub, "a", 5)  # lands in the buffer and in the log: must not be doubled
    assert seqs(await drain(sub, limit=3)) == list(range(5, 16))


class HookedLog(MemoryLog):
    """A MemoryLog that runs a hook around the hub's reads: a deterministic "meanwhile"."""

    def __init__(self) -> None:
        super().__init__()
        self.hook: Callable[[str], Awaitable[None]] | None = None

    async def _run(self, point: str) -> None:
        if self.hook is not None:
            await self.hook(point)

    async def head(self) -> int:
        await self._run("before head")
        head = await super().head()
        await self._run("after head")
        return head

    async def read(
        self, after: int, patterns: tuple[Pattern, ...] | None, limit: int
    ) -> list[Event]:
        await self._run("before read")
        page = await super().read(after, patterns, limit)
        await self._run("after read")
        return page


@pytest.mark.parametrize(
    "points",
    [
        {"before head"},
        {"after head"},
        {"before read"},
        {"after read"},
        {"before head", "after head", "before read", "after read"},
    ],
    ids=lambda p: "+".join(sorted(p)),
)
@pytest.mark.parametrize(("queue_size", "limit"), [(1024, 1000), (1024, 4), (3, 5), (1, 2)])
async def test_resume_is_exact_when_events_are_published_during_catch_up(
    make_hub: MakeHub, points: set[str], queue_size: int, limit: int
) -> None:
    log = HookedLog()
    hub = await make_hub(log, queue_size=queue_size)
    for i in range(30):
        await publish(hub, "orders/1" if i % 3 else "invoices/1")
    budget = 40  # hook calls that publish; afterwards catch-up can converge

    async def meanwhile(point: str) -> None:
        nonlocal budget
        if point in points and budget > 0:
            budget -= 1
            await publish(hub, "orders/2")
            await publish(hub, "invoices/2")
            await publish(hub, "orders/3/deep")

    log.hook = meanwhile
    sub = await hub.subscribe(patterns("orders/**"), Cursor(log.epoch, 10), "sse")
    assert sub.recovered is True
    got = await drain(sub, limit)
    assert budget < 40  # the hook did publish during catch-up
    log.hook = None
    final = await publish(hub, "orders/5")
    got += await drain(sub, limit)
    assert sub.ended is None
    expected = [e.seq for e in await log.read(10, patterns("orders/**"), 1_000_000)]
    assert seqs(got) == expected
    assert got[-1].seq == final[0].seq


@pytest.mark.parametrize("resume_at_head", [False, True], ids=["no-cursor", "cursor-at-head"])
async def test_overflow_while_a_subscription_starts_loses_nothing(
    make_hub: MakeHub, resume_at_head: bool
) -> None:
    # A log whose head() answers and then lets others run (a network round trip, as with a
    # remote log): events committed meanwhile overflow the tiny buffer before subscribe()
    # returns. They are newer than the start position, so they must still all arrive.
    log = HookedLog()
    hub = await make_hub(log, queue_size=2)
    await publish(hub, "a", 3)
    fired = False

    async def meanwhile(point: str) -> None:
        nonlocal fired
        if point == "after head" and not fired:
            fired = True
            await publish(hub, "a", 5)

    log.hook = meanwhile
    since = Cursor(log.epoch, 3) if resume_at_head else None
    sub = await hub.subscribe(patterns("a"), since, "sse")
    assert fired
    assert sub.recovered is True
    start = Cursor.parse(sub.cursor).seq
    got = await drain(sub)
    assert seqs(got) == list(range(start + 1, await log.head() + 1))
    assert sub.ended is None


async def test_resume_spanning_many_pages_with_a_tiny_queue_is_exact(make_hub: MakeHub) -> None:
    log = HookedLog()
    hub = await make_hub(log, queue_size=2)
    for i in range(500):
        await publish(hub, f"orders/{i % 7}" if i % 4 else "other/x")
    published_meanwhile = 0

    async def meanwhile(point: str) -> None:
        nonlocal published_meanwhile
        if point == "after read" and published_meanwhile < 300:
            # Several events per page: the 2-slot buffer overflows during every read.
            for _ in range(5):
                await publish(hub, "orders/new")
                published_meanwhile += 1

    log.hook = meanwhile
    sub = await hub.subscribe(patterns("orders/*"), Cursor(log.epoch, 37), "sse")
    got = await drain(sub, limit=9)
    assert published_meanwhile == 300
    expected = [e.seq for e in await log.read(37, patterns("orders/*"), 1_000_000)]
    assert seqs(got) == expected
    assert len(set(seqs(got))) == len(got)
    assert sub.ended is None


class YieldingLog(MemoryLog):
    """A MemoryLog whose calls give other tasks a turn, as a real (threaded or remote) log does."""

    async def head(self) -> int:
        await asyncio.sleep(0)
        return await super().head()

    async def read(
        self, after: int, patterns: tuple[Pattern, ...] | None, limit: int
    ) -> list[Event]:
        await asyncio.sleep(0)
        page = await super().read(after, patterns, limit)
        await asyncio.sleep(0)
        return page

    async def append(self, drafts: Sequence[Draft]) -> list[Appended]:
        await asyncio.sleep(0)
        return await super().append(drafts)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("queue_size", [2, 16, 1024])
async def test_resume_is_exact_with_a_concurrent_publisher(
    make_hub: MakeHub, seed: int, queue_size: int
) -> None:
    rng = random.Random(seed)
    log = YieldingLog()
    hub = await make_hub(log, queue_size=queue_size)
    channels = ["orders/1", "orders/2/items", "invoices/1", "orders/3"]
    for _ in range(200):
        await publish(hub, rng.choice(channels))
    pats = patterns("orders/*", "orders/**")
    since = Cursor(log.epoch, 50)

    async def publisher() -> None:
        for _ in range(300):
            await publish(hub, rng.choice(channels))
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)  # vary the interleaving, seeded
        await publish(hub, "orders/end", type="end")

    async def reader() -> list[Event]:
        # Like a client: on "lagged", resume from the subscription's cursor.
        got: list[Event] = []
        cursor = since
        while True:
            sub = await hub.subscribe(pats, cursor, "sse")
            assert sub.recovered is True, sub.reason
            while True:
                batch = await sub.next_batch(rng.choice([1, 3, 50]))
                if not batch:
                    assert sub.ended == "lagged"
                    cursor = Cursor.parse(sub.cursor)
                    break
                got += batch
                if batch[-1].type == "end":
                    sub.close()
                    return got
                for _ in range(rng.randrange(4)):
                    await asyncio.sleep(0)  # a reader that sometimes falls behind, seeded

    async with asyncio.timeout(GUARD), asyncio.TaskGroup() as tg:
        tg.create_task(publisher())
        reading = tg.create_task(reader())
    got = reading.result()
    expected = [e.seq for e in await log.read(since.seq, pats, 1_000_000)]
    assert seqs(got) == expected
    assert got[-1].type == "end"


class DeferredBroker:
    """A broker whose messages arrive after the log commit (as from Redis or NATS): ``flush``."""

    def __init__(self) -> None:
        self._deliver: Callable[[Sequence[Event]], None] | None = None
        self.pending: list[list[Event]] = []

    def attach(self, deliver: Callable[[Sequence[Event]], None]) -> None:
        self._deliver = deliver

    def publish(self, events: Sequence[Event]) -> None:
        self.pending.append(list(events))

    def flush(self) -> None:
        assert self._deliver is not None
        pending, self.pending = self.pending, []
        for events in pending:
            self._deliver(events)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


async def test_late_broker_delivery_of_events_already_read_from_the_log_is_ignored() -> None:
    broker = DeferredBroker()
    hub = Hub(MemoryLog(), broker)
    await hub.start()
    try:
        await publish(hub, "a", 10)  # committed, not yet delivered by the broker
        resumed = await hub.subscribe(patterns("a"), Cursor(hub.log.epoch, 3), "sse")
        live = await hub.subscribe(patterns("a"), None, "sse")
        assert seqs(await drain(resumed)) == list(range(4, 11))
        assert await drain(live) == []
        broker.flush()  # 1..10 arrive late: all at or before both positions
        assert await drain(resumed) == []
        assert await drain(live) == []
        await publish(hub, "a", 2)
        broker.flush()
        assert seqs(await drain(resumed)) == [11, 12]
        assert seqs(await drain(live)) == [11, 12]
    finally:
        await hub.stop()


async def test_pattern_subscriptions_resume_with_one_cursor(hub: Hub) -> None:
    layout = ["orders/1", "orders/1/items", "invoices/1", "orders/2", "orders/2/items/3"]
    for _ in range(4):
        for channel in layout:
            await publish(hub, channel)
    head = await hub.log.head()
    assert head == 20
    since = Cursor(hub.log.epoch, 7)

    one = await hub.subscribe(patterns("orders/*"), since, "sse")
    got = await drain(one)
    assert {e.channel for e in got} == {"orders/1", "orders/2"}
    assert seqs(got) == [e.seq for e in await hub.log.read(7, patterns("orders/*"), 100)]
    assert all(e.seq > 7 for e in got)

    many = await hub.subscribe(patterns("orders/**"), since, "sse")
    got = await drain(many)
    assert {e.channel for e in got} == {
        "orders/1",
        "orders/1/items",
        "orders/2",
        "orders/2/items/3",
    }
    assert seqs(got) == [
        e.seq for e in await hub.log.read(7, None, 100) if e.channel != "invoices/1"
    ]

    both = await hub.subscribe(patterns("orders/*", "orders/**", "invoices/*"), since, "sse")
    got = await drain(both)
    assert seqs(got) == list(range(8, 21))  # every channel once, in log order


async def test_cursor_handed_out_mid_stream_resumes_exactly(hub: Hub) -> None:
    layout = ["orders/1", "invoices/1", "orders/2/x", "orders/3"]
    for i in range(40):
        await publish(hub, layout[i % 4])
    pats = patterns("orders/**")
    first = await hub.subscribe(pats, Cursor(hub.log.epoch, 0), "sse")
    part = await first.next_batch(limit=7)
    cursor = first.cursor
    assert cursor == part[-1].cursor
    first.close()
    for i in range(10):
        await publish(hub, layout[i % 4])
    second = await hub.subscribe(pats, Cursor.parse(cursor), "sse")
    assert second.recovered is True
    rest = await drain(second)
    everything = [e.seq for e in await hub.log.read(0, pats, 1000)]
    assert seqs(part) + seqs(rest) == everything


# -- continuity lost -------------------------------------------------------------------------


async def test_cursor_from_another_epoch_is_not_recovered(hub: Hub) -> None:
    await publish(hub, "a", 5)
    other = "0" if hub.log.epoch != "0" else "1"
    sub = await hub.subscribe(patterns("a"), Cursor(other, 2), "sse")
    assert sub.recovered is False
    assert sub.reason is not None and "epoch" in sub.reason
    assert await drain(sub) == []  # no replay of an unrelated history
    assert sub.cursor == f"{hub.log.epoch}:5"
    assert seqs(await publish(hub, "a")) == seqs(await drain(sub)) == [6]


async def test_cursor_ahead_of_the_head_is_not_recovered(hub: Hub) -> None:
    await publish(hub, "a", 3)
    sub = await hub.subscribe(patterns("a"), Cursor(hub.log.epoch, 8), "sse")
    assert sub.recovered is False
    assert sub.reason is not None and "ahead" in sub.reason
    assert await drain(sub) == []
    # Starts at the real head: the next events (seq 4.., below the bogus cursor) arrive.
    assert seqs(await publish(hub, "a", 2)) == seqs(await drain(sub)) == [4, 5]


async def test_cursor_older_than_retention_is_not_recovered(make_hub: MakeHub) -> None:
    log = MemoryLog(max_events=5)
    hub = await make_hub(log)
    await publish(hub, "a", 10)
    assert await log.low() == 5
    sub = await hub.subscribe(patterns("a"), Cursor(log.epoch, 2), "sse")
    assert sub.recovered is False
    assert sub.reason is not None and "retention" in sub.reason
    assert await drain(sub) == []  # never a silent partial replay of 6..10
    assert seqs(await publish(hub, "a")) == seqs(await drain(sub)) == [11]


async def test_cursor_at_the_retention_boundary_is_recovered(make_hub: MakeHub) -> None:
    log = MemoryLog(max_events=5)
    hub = await make_hub(log)
    await publish(hub, "a", 10)
    sub = await hub.subscribe(patterns("a"), Cursor(log.epoch, 5), "sse")
    assert sub.recovered is True
    assert seqs(await drain(sub)) == [6, 7, 8, 9, 10]


async def test_events_trimmed_during_catch_up_are_not_skipped_silently(
    make_hub: MakeHub,
) -> None:
    # The cursor is inside history when the subscription starts, but retention removes the
    # events it needs before the first read. The promise: every missed event, or an explicit
    # "not recovered" — never a silent partial replay.
    log = MemoryLog(max_events=5)
    hub = await make_hub(log)
    await publish(hub, "a", 10)
    sub = await hub.subscribe(patterns("a"), Cursor(log.epoch, 5), "sse")
    assert sub.recovered is True
    await publish(hub, "a", 3)  # trims 6, 7, 8 before the subscriber reads
    got = await drain(sub)
    complete = seqs(got) == list(range(6, 14))
    told = sub.recovered is False or sub.ended is not None
    assert complete or told, f"got {seqs(got)} with recovered={sub.recovered}, ended={sub.ended}"


# -- slow subscribers ------------------------------------------------------------------------


async def test_subscriber_that_never_reads_is_ended_as_lagged(make_hub: MakeHub) -> None:
    hub = await make_hub(queue_size=5)
    idle = await hub.subscribe(patterns("a"), None, "sse")
    busy = await hub.subscribe(patterns("a"), None, "sse")
    received = []
    for i in range(12):
        await publish(hub, "a")
        received += await drain(busy)
        assert idle.ended == (None if i < 5 else "lagged"), i
    assert seqs(received) == list(range(1, 13))
    assert busy.ended is None
    assert hub.subscriber_count == 1
    assert await idle.next_batch() == []


async def test_a_subscriber_that_never_reads_holds_at_most_its_queue_bound(
    make_hub: MakeHub,
) -> None:
    # Memory per subscriber is bounded: live, it lags at the bound and lets go of its buffer;
    # catching up (it has history left to read), it drops its buffer and rereads the log.
    hub = await make_hub(queue_size=8)
    first = (await publish(hub, "a", 3))[0]
    live = await hub.subscribe(patterns("a"), None, "sse")
    catching_up = await hub.subscribe(patterns("a"), Cursor(first.epoch, 0), "sse")
    for _ in range(100):
        await publish(hub, "a", 7)
        assert len(live._buffer) <= 8 and len(catching_up._buffer) <= 8
    assert live.ended == "lagged" and not live._buffer
    assert catching_up.ended is None
    assert seqs(await drain(catching_up)) == list(range(1, 704))


async def test_subscriber_that_stops_reading_is_ended_as_lagged(make_hub: MakeHub) -> None:
    hub = await make_hub(queue_size=5)
    slow = await hub.subscribe(patterns("a"), None, "sse")
    fast = await hub.subscribe(patterns("a"), None, "sse")
    await publish(hub, "a", 2)
    first = await drain(slow)  # reads once, then stalls
    received = await drain(fast)
    for i in range(10):
        await publish(hub, "a")
        received += await drain(fast)
        assert slow.ended == (None if i < 5 else "lagged"), i
    assert seqs(first) == [1, 2]
    assert seqs(received) == list(range(1, 13))
    assert fast.ended is None
    assert hub.subscriber_count == 1
    assert await slow.next_batch() == []  # ended: returns at once, empty


async def test_lagged_subscriber_resumes_from_its_cursor_without_loss(make_hub: MakeHub) -> None:
    hub = await make_hub(queue_size=4)
    sub = await hub.subscribe(patterns("a/*"), None, "sse")
    await publish(hub, "a/1", 3)
    got = await drain(sub)
    await publish(hub, "a/2", 10)
    assert sub.ended == "lagged"
    again = await hub.subscribe(patterns("a/*"), Cursor.parse(sub.cursor), "sse")
    assert again.recovered is True
    got += await drain(again)
    assert seqs(got) == list(range(1, 14))


async def test_lagged_metric_counts_disconnects_per_transport(make_hub: MakeHub) -> None:
    hub = await make_hub(queue_size=2)
    assert lagged_count(hub, "sse") == 0
    subs = [await hub.subscribe(patterns("a"), None, t) for t in ("sse", "sse", "longpoll")]
    for sub in subs:
        assert await sub.poll_batch() == []  # each has started reading, then stalls
    await publish(hub, "a", 3)
    assert [s.ended for s in subs] == ["lagged"] * 3
    assert lagged_count(hub, "sse") == 2
    assert lagged_count(hub, "longpoll") == 1
    await publish(hub, "a", 3)  # already gone: not counted again
    assert lagged_count(hub, "sse") == 2
    gauge = hub.metrics.registry.get_sample_value("tidings_subscribers", {"transport": "sse"})
    assert gauge == 0


# -- shutdown --------------------------------------------------------------------------------


async def test_stop_ends_subscriptions_with_shutdown() -> None:
    hub = Hub(MemoryLog(), MemoryBroker())
    await hub.start()
    waiting = await hub.subscribe(patterns("a"), None, "sse")
    idle = await hub.subscribe(patterns("b/**"), None, "sse")
    await publish(hub, "b/1")
    async with asyncio.timeout(GUARD), asyncio.TaskGroup() as tg:
        reader = tg.create_task(waiting.next_batch())
        await asyncio.sleep(0)  # let the reader start waiting (the result is the same if not)
        await hub.stop()
    assert reader.result() == []
    assert waiting.ended == "shutdown"
    assert idle.ended == "shutdown"
    assert await idle.next_batch() == []  # buffered events are not handed out after shutdown
    assert hub.subscriber_count == 0
    with pytest.raises(Unavailable):
        await hub.publish([make_draft("a", b"x")])
    with pytest.raises(Unavailable):
        await hub.subscribe(patterns("a"), None, "sse")


# -- idempotent publish ----------------------------------------------------------------------


async def test_idempotent_publish_logs_one_event(hub: Hub) -> None:
    sub = await hub.subscribe(patterns("orders/*"), None, "sse")
    [first] = await hub.publish([make_draft("orders/1", b'{"a":1}', idempotency_key="k-1")])
    [second] = await hub.publish([make_draft("orders/1", b'{"a":1}', idempotency_key="k-1")])
    assert first.created is True
    assert second.created is False
    assert second.event.cursor == first.event.cursor
    assert await hub.log.head() == 1
    assert seqs(await drain(sub)) == [1]  # delivered once
    published = hub.metrics.registry.get_sample_value("tidings_published_events_total")
    assert published == 1


async def test_idempotency_key_is_scoped_to_the_channel(hub: Hub) -> None:
    [a] = await hub.publish([make_draft("orders/1", b"x", idempotency_key="k")])
    [b] = await hub.publish([make_draft("orders/2", b"x", idempotency_key="k")])
    assert a.created and b.created
    assert a.event.seq != b.event.seq


async def test_idempotent_replay_inside_one_batch(hub: Hub) -> None:
    drafts = [make_draft("a", b"x", idempotency_key="k") for _ in range(3)]
    results = await hub.publish(drafts)
    assert [r.created for r in results] == [True, False, False]
    assert {r.event.cursor for r in results} == {results[0].event.cursor}
    assert await hub.log.head() == 1
