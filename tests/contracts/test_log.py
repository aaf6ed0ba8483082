"""The Log contract (see ``tidings/log/__init__.py``), run against every implementation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from tidings.events import Cursor, Draft, Event, Pattern, make_draft
from tidings.exceptions import ConfigError
from tidings.log import Appended, Log

from .conftest import Logs, load_sqlite_log

T = 1_700_000_000.0
GUARD = 10  # seconds; only a guard against a hang, never a timing assertion


def draft(
    channel: str = "a",
    data: bytes = b'{"n": 1}',
    *,
    key: str | None = None,
    at: float = T,
    content_type: str | None = None,
    type: str | None = None,
) -> Draft:
    return make_draft(channel, data, content_type, type, key, now=at)


def P(*texts: str) -> tuple[Pattern, ...]:
    return tuple(Pattern.parse(t) for t in texts)


def seqs(events: Sequence[Event]) -> list[int]:
    return [e.seq for e in events]


class Recorder:
    """A commit listener that keeps every batch it is called with."""

    def __init__(self) -> None:
        self.batches: list[list[Event]] = []

    def __call__(self, events: Sequence[Event]) -> None:
        self.batches.append(list(events))

    @property
    def seqs(self) -> list[int]:
        return [e.seq for batch in self.batches for e in batch]


async def fill(log: Log, channels: Sequence[str]) -> list[Event]:
    appended = await log.append(
        [draft(c, f'{{"i": {i}}}'.encode()) for i, c in enumerate(channels)]
    )
    return [a.event for a in appended]


# -- append, head, low, epoch ----------------------------------------------------------------


async def test_empty_log(logs: Logs) -> None:
    log = await logs.open()
    assert await log.head() == 0
    assert await log.low() == 0
    assert await log.read(0, None, 100) == []
    stats = await log.stats()
    assert (stats.events, stats.head, stats.low) == (0, 0, 0)


async def test_append_assigns_consecutive_seqs_from_one(logs: Logs) -> None:
    log = await logs.open()
    first = await log.append([draft("a")])
    assert first == [Appended(first[0].event, True)]
    assert first[0].event.seq == 1
    more = await log.append([draft("b"), draft("c"), draft("a")])
    assert [a.event.seq for a in more] == [2, 3, 4]
    assert all(a.created for a in more)
    assert await log.head() == 4
    assert await log.low() == 0
    stats = await log.stats()
    assert (stats.events, stats.head, stats.low) == (4, 4, 0)


async def test_append_of_nothing_changes_nothing(logs: Logs) -> None:
    log = await logs.open()
    recorder = Recorder()
    log.listen(recorder)
    assert await log.append([]) == []
    assert await log.head() == 0
    assert recorder.batches == []


async def test_appended_events_carry_the_draft_and_the_cursor(logs: Logs) -> None:
    log = await logs.open()
    d = draft(
        "orders/42",
        b"\x00\xff binary",
        key="k1",
        at=T + 0.125,
        content_type="application/octet-stream",
        type="order.created",
    )
    [appended] = await log.append([d])
    event = appended.event
    assert event.epoch == log.epoch
    assert event.seq == 1
    assert event.cursor == f"{log.epoch}:1"
    assert Cursor.parse(event.cursor) == Cursor(log.epoch, 1)
    assert (event.channel, event.type, event.data, event.content_type, event.time) == (
        "orders/42",
        "order.created",
        b"\x00\xff binary",
        "application/octet-stream",
        T + 0.125,
    )
    assert event.idempotency_key == "k1"


async def test_read_returns_events_exactly_as_appended(logs: Logs) -> None:
    log = await logs.open()
    drafts = [
        draft("a", b'{"x": [1, 2]}', at=T + 0.001),
        draft("b/c", "héllo".encode(), content_type="text/plain; charset=utf-8", at=T + 1.5),
        draft("d", bytes(range(256)), content_type="application/octet-stream", key="k"),
        draft("e", b"", content_type="text/plain", type="x.y/z:w"),
    ]
    await log.append(drafts)
    events = await log.read(0, None, 100)
    assert seqs(events) == [1, 2, 3, 4]
    for event, d in zip(events, drafts, strict=True):
        assert event.epoch == log.epoch
        assert event.cursor == f"{log.epoch}:{event.seq}"
        assert (event.channel, event.type, event.data, event.content_type) == (
            d.channel,
            d.type,
            d.data,
            d.content_type,
        )
        assert event.time == d.time
        assert event.idempotency_key == d.idempotency_key
        assert isinstance(event.data, bytes)


async def test_epoch_is_a_cursor_epoch_and_stable(logs: Logs) -> None:
    log = await logs.open(max_events=3, max_age=100)
    epoch = log.epoch
    assert epoch
    assert Cursor.parse(f"{epoch}:0").epoch == epoch
    await fill(log, ["a"] * 10)
    await log.trim(now=T + 1000)
    await log.set_consumer("c", 1)
    assert log.epoch == epoch
    assert {e.epoch for e in await log.read(0, None, 100)} <= {epoch}


async def test_separate_logs_have_different_epochs(logs: Logs) -> None:
    one = await logs.open("one.db")
    two = await logs.open("two.db")
    assert one.epoch != two.epoch


# -- read ------------------------------------------------------------------------------------

LAYOUT = [
    "orders/1",  # 1
    "orders/1/items",  # 2
    "invoices/1",  # 3
    "orders/2",  # 4
    "orders/10",  # 5
    "orders",  # 6
    "orders/2/items/3",  # 7
    "invoices/2",  # 8
    "orders/1",  # 9
    "users/1/orders",  # 10
]


async def test_read_all_after_a_position_in_order(logs: Logs) -> None:
    log = await logs.open()
    await fill(log, LAYOUT)
    assert seqs(await log.read(0, None, 100)) == list(range(1, 11))
    assert seqs(await log.read(4, None, 100)) == list(range(5, 11))
    assert seqs(await log.read(9, None, 100)) == [10]
    assert await log.read(10, None, 100) == []
    assert await log.read(50, None, 100) == []


async def test_read_limit(logs: Logs) -> None:
    log = await logs.open()
    await fill(log, LAYOUT)
    assert seqs(await log.read(0, None, 3)) == [1, 2, 3]
    assert seqs(await log.read(3, None, 3)) == [4, 5, 6]
    assert seqs(await log.read(8, None, 3)) == [9, 10]
    assert seqs(await log.read(0, None, 1)) == [1]
    assert seqs(await log.read(0, P("orders/*"), 2)) == [1, 4]


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (("orders/1",), [1, 9]),  # exact: not orders/10, not orders/1/items
        (("orders",), [6]),
        (("orders/*",), [1, 4, 5, 9]),  # one segment: not orders, not orders/1/items
        (("orders/**",), [1, 2, 4, 5, 7, 9]),  # one or more: not orders itself
        (("*/1",), [1, 3, 9]),
        (("*/*/orders",), [10]),
        (("**",), list(range(1, 11))),
        (("invoices/*", "orders/1"), [1, 3, 8, 9]),  # union, in log order
        (("orders/*", "orders/**", "orders/1"), [1, 2, 4, 5, 7, 9]),  # overlaps: each once
        (("nothing/*",), []),
        (("orders/1/items/**",), []),
    ],
)
async def test_read_filters_by_patterns(
    logs: Logs, texts: tuple[str, ...], expected: list[int]
) -> None:
    log = await logs.open()
    await fill(log, LAYOUT)
    events = await log.read(0, P(*texts), 100)
    assert seqs(events) == expected
    assert all(any(p.matches(e.channel) for p in P(*texts)) for e in events)


async def test_read_filtered_with_limit_skips_long_runs_of_other_channels(logs: Logs) -> None:
    # Matches are sparse (one in 300), so an implementation reading in pages must keep going.
    log = await logs.open()
    channels = ["wanted/x" if i % 300 == 299 else f"noise/{i % 7}/x" for i in range(1500)]
    await fill(log, channels)
    wanted = [i + 1 for i, c in enumerate(channels) if c == "wanted/x"]
    assert seqs(await log.read(0, P("wanted/*"), 100)) == wanted
    assert seqs(await log.read(0, P("wanted/*"), 2)) == wanted[:2]
    assert seqs(await log.read(wanted[1], P("wanted/*"), 2)) == wanted[2:4]
    # '*' must not cross '/', even where the backend's own matcher (SQLite GLOB) would.
    assert seqs(await log.read(0, P("noise/*"), 100)) == []
    assert len(await log.read(0, P("noise/*/x"), 10_000)) == 1500 - len(wanted)


# -- listeners -------------------------------------------------------------------------------


async def test_listeners_get_new_events_in_order_before_append_returns(logs: Logs) -> None:
    log = await logs.open()
    first, second = Recorder(), Recorder()
    log.listen(first)
    log.listen(second)
    appended = await log.append([draft("a"), draft("b"), draft("c")])
    # Already called when append returns.
    assert first.seqs == [1, 2, 3]
    assert second.seqs == [1, 2, 3]
    assert [e.channel for b in first.batches for e in b] == ["a", "b", "c"]
    assert [e.cursor for b in first.batches for e in b] == [a.event.cursor for a in appended]
    await log.append([draft("d")])
    assert first.seqs == [1, 2, 3, 4]


async def test_listeners_are_not_called_for_idempotent_replays(logs: Logs) -> None:
    log = await logs.open()
    recorder = Recorder()
    log.listen(recorder)
    await log.append([draft("a", key="k")])
    assert recorder.seqs == [1]
    [replay] = await log.append([draft("a", key="k")])
    assert replay.created is False
    assert recorder.seqs == [1]
    mixed = await log.append([draft("a", key="k"), draft("b", key="k"), draft("a")])
    assert [a.created for a in mixed] == [False, True, True]
    assert recorder.seqs == [1, 2, 3]


async def test_listeners_are_not_called_by_trim(logs: Logs) -> None:
    log = await logs.open(max_age=10)
    await fill(log, ["a"] * 3)
    recorder = Recorder()
    log.listen(recorder)
    assert await log.trim(now=T + 100) == 3
    assert recorder.batches == []


# -- idempotency -----------------------------------------------------------------------------


async def test_idempotent_replay_returns_the_logged_event(logs: Logs) -> None:
    log = await logs.open(idempotency_window=60)
    [original] = await log.append([draft("orders/1", b'{"v": 1}', key="k", at=T)])
    [replay] = await log.append([draft("orders/1", b'{"v": 2}', key="k", at=T + 30)])
    assert original.created is True
    assert replay.created is False
    assert replay.event.seq == original.event.seq == 1
    assert replay.event.cursor == original.event.cursor
    assert replay.event.data == b'{"v": 1}'  # the event as logged, not the replayed draft
    assert await log.head() == 1
    assert seqs(await log.read(0, None, 10)) == [1]


async def test_idempotency_is_scoped_to_channel_and_key(logs: Logs) -> None:
    log = await logs.open()
    results = await log.append(
        [
            draft("orders/1", key="k"),
            draft("orders/2", key="k"),  # same key, other channel
            draft("orders/1", key="K"),  # keys are case-sensitive
            draft("orders/1", key="k2"),
            draft("orders/1"),  # no key: never de-duplicated
            draft("orders/1"),
        ]
    )
    assert [a.created for a in results] == [True] * 6
    assert [a.event.seq for a in results] == [1, 2, 3, 4, 5, 6]
    again = await log.append([draft("orders/2", key="k"), draft("orders/1", key="k")])
    assert [(a.created, a.event.seq) for a in again] == [(False, 2), (False, 1)]


async def test_idempotent_replay_within_one_batch(logs: Logs) -> None:
    log = await logs.open()
    results = await log.append([draft("a", key="k"), draft("b"), draft("a", key="k")])
    assert [(a.created, a.event.seq) for a in results] == [(True, 1), (True, 2), (False, 1)]
    assert await log.head() == 2


async def test_idempotency_window(logs: Logs) -> None:
    log = await logs.open(idempotency_window=60)
    [a] = await log.append([draft("a", key="k", at=T)])
    [b] = await log.append([draft("a", key="k", at=T + 59)])
    [c] = await log.append([draft("a", key="k", at=T + 61)])  # past the window: a new event
    [d] = await log.append([draft("a", key="k", at=T + 100)])  # inside the new event's window
    assert (a.created, b.created, c.created, d.created) == (True, False, True, False)
    assert b.event.seq == a.event.seq == 1
    assert c.event.seq == d.event.seq == 2
    assert await log.head() == 2


async def test_concurrent_replays_create_one_event(logs: Logs) -> None:
    log = await logs.open()
    recorder = Recorder()
    log.listen(recorder)
    results = await asyncio.gather(*(log.append([draft("a", key="same")]) for _ in range(20)))
    flat = [r[0] for r in results]
    assert sum(a.created for a in flat) == 1
    assert {a.event.seq for a in flat} == {1}
    assert recorder.seqs == [1]
    assert await log.head() == 1


async def test_a_failing_listener_does_not_wedge_the_log(logs: Logs) -> None:
    log = await logs.open()
    calls: list[list[int]] = []

    def flaky(events: Sequence[Event]) -> None:
        calls.append(seqs(events))
        if len(calls) == 1:
            raise RuntimeError("listener failed")

    log.listen(flaky)
    async with asyncio.timeout(3):  # a guard: a wedged log would hang here forever
        # The first append may report the listener's error or not; either way the event is in
        # history and the log must keep working.
        with contextlib.suppress(RuntimeError):
            await log.append([draft("a")])
        [second] = await log.append([draft("a")])
    assert second.event.seq == 2
    assert calls == [[1], [2]]
    assert seqs(await log.read(0, None, 10)) == [1, 2]


async def test_a_cancelled_append_does_not_break_the_log(logs: Logs) -> None:
    log = await logs.open()
    recorder = Recorder()
    log.listen(recorder)
    async with asyncio.timeout(GUARD):
        task = asyncio.create_task(log.append([draft("a")]))
        await asyncio.sleep(0)  # let it start; cancel it mid-flight
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        [later] = await log.append([draft("b")])
    head = await log.head()
    assert later.event.seq == head
    assert seqs(await log.read(0, None, 10)) == list(range(1, head + 1))
    assert recorder.seqs == list(range(1, head + 1))


# -- concurrency -----------------------------------------------------------------------------


async def test_concurrent_appends_get_distinct_consecutive_seqs(logs: Logs) -> None:
    log = await logs.open()
    recorder = Recorder()
    log.listen(recorder)

    async def one(i: int) -> Appended:
        [appended] = await log.append([draft(f"c/{i % 5}", f'{{"i": {i}}}'.encode())])
        # The listener has seen this event by the time its append returns.
        assert appended.event.seq in set(recorder.seqs)
        return appended

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert sorted(a.event.seq for a in results) == list(range(1, 201))
    assert all(a.created for a in results)
    assert recorder.seqs == list(range(1, 201))  # listeners see log order, each event once
    assert await log.head() == 200
    logged = await log.read(0, None, 1000)
    assert seqs(logged) == list(range(1, 201))
    by_seq = {a.event.seq: a.event.data for a in results}
    assert [e.data for e in logged] == [by_seq[e.seq] for e in logged]


async def test_concurrent_batches_keep_each_batch_contiguous_and_in_order(logs: Logs) -> None:
    log = await logs.open()
    recorder = Recorder()
    log.listen(recorder)
    batches = [[draft("b", f"{i}-{j}".encode()) for j in range(4)] for i in range(50)]
    results = await asyncio.gather(*(log.append(b) for b in batches))
    for batch, result in zip(batches, results, strict=True):
        got = [a.event.seq for a in result]
        assert got == list(range(got[0], got[0] + 4))
        assert [a.event.data for a in result] == [d.data for d in batch]
    assert sorted(a.event.seq for r in results for a in r) == list(range(1, 201))
    assert recorder.seqs == list(range(1, 201))


# -- retention -------------------------------------------------------------------------------


async def test_trim_by_age(logs: Logs) -> None:
    log = await logs.open(max_age=100)
    await log.append([draft("a", at=T + 10 * i) for i in range(10)])  # T .. T+90
    assert await log.trim(now=T + 45) == 0  # nothing older than 100 s yet
    assert await log.low() == 0
    assert await log.trim(now=T + 145) == 5  # cutoff T+45: removes T .. T+40
    assert await log.low() == 5
    assert await log.head() == 10
    assert seqs(await log.read(0, None, 100)) == [6, 7, 8, 9, 10]
    assert seqs(await log.read(5, None, 100)) == [6, 7, 8, 9, 10]
    stats = await log.stats()
    assert (stats.events, stats.head, stats.low) == (5, 10, 5)
    assert await log.trim(now=T + 145) == 0


async def test_trim_everything_keeps_the_sequence_going(logs: Logs) -> None:
    log = await logs.open(max_age=100)
    await fill(log, ["a"] * 4)
    assert await log.trim(now=T + 1000) == 4
    assert (await log.low(), await log.head()) == (4, 4)
    assert await log.read(0, None, 100) == []
    [appended] = await log.append([draft("a", at=T + 1000)])
    assert appended.event.seq == 5  # never reuses a sequence number within an epoch
    assert seqs(await log.read(0, None, 100)) == [5]


async def test_retention_by_count(logs: Logs) -> None:
    log = await logs.open(max_events=5)
    await fill(log, [f"c/{i}" for i in range(8)])
    await log.trim(now=T)  # a log may apply the count limit on append or on trim
    assert await log.low() == 3
    assert await log.head() == 8
    assert seqs(await log.read(0, None, 100)) == [4, 5, 6, 7, 8]
    stats = await log.stats()
    assert (stats.events, stats.head, stats.low) == (5, 8, 3)
    await fill(log, ["d"] * 4)
    await log.trim(now=T)
    assert await log.low() == 7
    assert seqs(await log.read(0, None, 100)) == [8, 9, 10, 11, 12]
    assert seqs(await log.read(0, P("c/*"), 100)) == [8]


async def test_low_never_decreases(logs: Logs) -> None:
    log = await logs.open(max_events=3, max_age=50)
    lows = [await log.low()]
    for i in range(6):
        await log.append([draft("a", at=T + 20 * i)])
        await log.trim(now=T + 20 * i)
        lows.append(await log.low())
    assert lows == sorted(lows)
    assert lows[-1] > 0


# -- consumer cursors ------------------------------------------------------------------------


async def test_consumer_cursors(logs: Logs) -> None:
    log = await logs.open()
    assert await log.get_consumer("webhook:1") is None
    await log.set_consumer("webhook:1", 5)
    await log.set_consumer("mqtt", 0)
    assert await log.get_consumer("webhook:1") == 5
    assert await log.get_consumer("mqtt") == 0
    await log.set_consumer("webhook:1", 9)
    assert await log.get_consumer("webhook:1") == 9
    await log.set_consumer("webhook:1", 2)  # a store, not a max: the consumer decides
    assert await log.get_consumer("webhook:1") == 2
    name = "webhooks/https://example.com/hook?x=1&y=ü"
    await log.set_consumer(name, 7)
    assert await log.get_consumer(name) == 7
    assert await log.get_consumer("webhook:2") is None
    await log.delete_consumer("webhook:1")
    await log.delete_consumer("never-set")  # nothing to delete is not an error
    assert await log.get_consumer("webhook:1") is None
    assert await log.get_consumer(name) == 7


# -- SQLite: what survives a restart ---------------------------------------------------------


@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_sqlite_reopen_keeps_epoch_events_head_low_and_consumers(
    sqlite_logs: Logs, durability: str
) -> None:
    options = {"durability": durability, "max_events": 5}
    log = await sqlite_logs.open("kept.db", **options)
    drafts = [draft(f"c/{i}", f'{{"i": {i}}}'.encode(), key=f"k{i}", at=T + i) for i in range(8)]
    await log.append(drafts)
    await log.trim(now=T + 8)
    await log.set_consumer("hooks", 6)
    before = (log.epoch, await log.head(), await log.low(), await log.read(0, None, 100))
    assert before[1:3] == (8, 3)
    await sqlite_logs.close(log)

    log = await sqlite_logs.open("kept.db", **options)
    epoch, head, low, events = before
    assert log.epoch == epoch
    assert await log.head() == head
    assert await log.low() == low
    reread = await log.read(0, None, 100)
    assert seqs(reread) == seqs(events) == [4, 5, 6, 7, 8]
    for a, b in zip(reread, events, strict=True):
        assert (a.cursor, a.channel, a.type, a.data, a.content_type, a.time) == (
            b.cursor,
            b.channel,
            b.type,
            b.data,
            b.content_type,
            b.time,
        )
        assert a.idempotency_key == b.idempotency_key
    assert seqs(await log.read(5, P("c/*"), 100)) == [6, 7, 8]
    assert await log.get_consumer("hooks") == 6
    [appended] = await log.append([draft("after-restart", at=T + 9)])
    assert appended.event.seq == 9
    assert appended.event.cursor == f"{epoch}:9"


async def test_sqlite_append_is_in_the_file_when_it_returns(sqlite_logs: Logs) -> None:
    # Acknowledged means committed: another opener of the file already sees the events.
    log = await sqlite_logs.open("shared.db")
    await log.append([draft("a"), draft("b")])
    [appended] = await log.append([draft("c", key="k")])
    observer = await sqlite_logs.open("shared.db")
    try:
        assert observer.epoch == log.epoch
        assert await observer.head() == 3
        events = await observer.read(0, None, 10)
        assert [e.cursor for e in events] == [f"{log.epoch}:{i}" for i in (1, 2, 3)]
        assert events[-1].idempotency_key == appended.event.idempotency_key == "k"
    finally:
        await sqlite_logs.close(observer)


async def test_sqlite_idempotency_survives_reopen(sqlite_logs: Logs) -> None:
    log = await sqlite_logs.open("idem.db")
    [original] = await log.append([draft("a", key="retry-me", at=T)])
    await sqlite_logs.close(log)
    log = await sqlite_logs.open("idem.db")
    [replay] = await log.append([draft("a", key="retry-me", at=T + 1)])
    assert replay.created is False
    assert replay.event.cursor == original.event.cursor


async def test_sqlite_reopen_after_trimming_everything_keeps_the_head(sqlite_logs: Logs) -> None:
    log = await sqlite_logs.open("empty.db", max_age=10)
    await fill(log, ["a"] * 6)
    assert await log.trim(now=T + 100) == 6
    epoch = log.epoch
    await sqlite_logs.close(log)
    log = await sqlite_logs.open("empty.db", max_age=10)
    assert log.epoch == epoch
    assert (await log.head(), await log.low()) == (6, 6)
    [appended] = await log.append([draft("a", at=T + 100)])
    assert appended.event.seq == 7  # a cursor of this epoch never names two events


async def test_sqlite_new_file_gets_a_new_epoch(sqlite_logs: Logs) -> None:
    log = await sqlite_logs.open("first.db")
    await fill(log, ["a"])
    first = log.epoch
    await sqlite_logs.close(log)
    other = await sqlite_logs.open("second.db")
    assert other.epoch != first
    assert await other.head() == 0


async def test_sqlite_rejects_unknown_durability(tmp_path: Path) -> None:
    sqlite_log = load_sqlite_log()
    with pytest.raises(ConfigError):
        sqlite_log(f"{tmp_path}/x.db", durability="sometimes")
