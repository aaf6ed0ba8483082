"""Shared logs (``tidings/log/shared.py``): several nodes on one Redis or NATS JetStream stream.

Each test opens two or more logs on one prefix, which are two "nodes" of one deployment, and
checks what the rules of ``SharedLog`` promise across them. Faults are made by deleting the
engine's stream or by cutting a test-owned TCP proxy; the engine itself is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence

import pytest

from brokers import TCPProxy, until
from tidings.events import Event
from tidings.exceptions import Unavailable
from tidings.log import Appended, Log

from .conftest import NATS, NATS_URL, REDIS, REDIS_URL, Logs
from .test_log import GUARD, Recorder, T, draft


async def two_nodes(logs: Logs, name: str = "shared") -> tuple[Log, Log]:
    return await logs.open(name), await logs.open(name)


def events(recorder: Recorder) -> list[Event]:
    return [e for batch in recorder.batches for e in batch]


def same(a: Sequence[Event], b: Sequence[Event]) -> bool:
    fields = ("cursor", "channel", "type", "data", "content_type", "time", "idempotency_key")
    return [[getattr(e, f) for f in fields] for e in a] == [
        [getattr(e, f) for f in fields] for e in b
    ]


async def received(recorder: Recorder, count: int, who: str) -> list[Event]:
    async def enough() -> bool:
        return len(recorder.seqs) >= count

    await until(enough, lambda: f"{who}'s listener got {len(recorder.seqs)} of {count} events")
    return events(recorder)


async def drop_stream(logs: Logs, log: Log, name: str = "shared") -> None:
    """Delete the engine's stream under the running logs ``name``."""
    if logs.kind.startswith("redis"):
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        assert await client.delete(f"{logs.prefix(name)}:log:stream") == 1
        await client.aclose()
    else:
        import nats

        nc = await nats.connect(NATS_URL)
        assert await nc.jetstream().delete_stream(getattr(log, "stream"))  # noqa: B009
        await nc.close()


async def test_appends_on_one_node_reach_the_others_listeners_in_order_with_the_same_cursors(
    shared_logs: Logs,
) -> None:
    a, b = await two_nodes(shared_logs)
    assert a.epoch == b.epoch
    on_a, on_b = Recorder(), Recorder()
    a.listen(on_a)
    b.listen(on_b)
    first = await a.append([draft("orders/1", b'{"n": 1}'), draft("orders/2", key="k")])
    second = await a.append([draft("x.y/z", b"\x00raw", content_type="application/octet-stream")])
    sent = [x.event for x in [*first, *second]]
    assert same(events(on_a), sent)  # the appending node: before its append returned
    assert same(await received(on_b, 3, "node B"), sent)
    assert [len(batch) for batch in on_b.batches] in ([2, 1], [1, 1, 1], [3])
    assert same(await b.read(0, None, 10), sent)
    # Consumer positions are the deployment's, not a node's.
    await a.set_consumer("webhook:1", 2)
    assert await b.get_consumer("webhook:1") == 2


async def test_concurrent_appends_on_both_nodes_give_every_listener_one_order(
    shared_logs: Logs,
) -> None:
    a, b = await two_nodes(shared_logs)
    c = await shared_logs.open("shared")  # a third node that only listens
    recorders = {name: Recorder() for name in "abc"}
    for name, node in zip("abc", (a, b, c), strict=True):
        node.listen(recorders[name])

    async def publish(node: Log, i: int) -> list[Appended]:
        size = 1 + i % 3
        return await node.append([draft(f"c/{i}", f'{{"i": {i}, "j": {j}}}'.encode())
                                  for j in range(size)])  # fmt: skip

    async with asyncio.timeout(GUARD):
        results = await asyncio.gather(*(publish(a if i % 2 else b, i) for i in range(120)))
    total = sum(len(r) for r in results)
    assert sorted(x.event.seq for r in results for x in r) == list(range(1, total + 1))
    seen = {name: await received(r, total, f"node {name}") for name, r in recorders.items()}
    assert [e.seq for e in seen["a"]] == list(range(1, total + 1))  # no gap, no duplicate
    assert same(seen["a"], seen["b"])
    assert same(seen["a"], seen["c"])
    by_cursor = {x.event.cursor: x.event for r in results for x in r}
    assert same(seen["c"], [by_cursor[e.cursor] for e in seen["c"]])
    # Each batch stays in its order; across nodes batches may interleave (NATS has no atomic
    # batch on 2.9), so only a Redis batch is guaranteed contiguous.
    for r in results:
        seqs = [x.event.seq for x in r]
        assert seqs == sorted(seqs)
        if shared_logs.kind == "redis":
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_an_idempotency_key_is_the_deployments_not_a_nodes(shared_logs: Logs) -> None:
    a, b = await two_nodes(shared_logs)
    [original] = await a.append([draft("orders/1", b'{"v": 1}', key="order-1", at=T)])
    [retry] = await b.append([draft("orders/1", b'{"v": 2}', key="order-1", at=T + 1)])
    assert (retry.created, retry.event.cursor) == (False, original.event.cursor)
    assert retry.event.data == b'{"v": 1}'
    racing = await asyncio.gather(
        *(node.append([draft("orders/2", key="order-2", at=T + 2)]) for node in (a, b) * 10)
    )
    assert sum(r[0].created for r in racing) == 1
    assert len({r[0].event.cursor for r in racing}) == 1
    assert await b.head() == 2


async def test_a_replay_of_an_event_retention_removed_is_appended_anew(shared_logs: Logs) -> None:
    log = await shared_logs.open("short", max_events=2)
    await log.append([draft("a", key="k", at=T)])
    await log.append([draft("b", at=T + 1), draft("c", at=T + 2)])  # the first event goes
    await log.trim(now=T + 2)
    assert await log.low() == 1
    [again] = await log.append([draft("a", key="k", at=T + 3)])
    assert (again.created, again.event.seq) == (True, 4)
    [replay] = await log.append([draft("a", key="k", at=T + 4)])
    assert (replay.created, replay.event.seq) == (False, 4)
    assert [e.seq for e in await log.read(0, None, 10)] == [3, 4]


async def test_head_on_a_node_waits_until_its_listeners_have_the_other_nodes_events(
    shared_logs: Logs,
) -> None:
    a, b = await two_nodes(shared_logs)
    on_b = Recorder()
    b.listen(on_b)
    for round in range(5):
        appended = await a.append([draft("a", f'{{"r": {round}}}'.encode()) for _ in range(3)])
        last = appended[-1].event.seq
        head = await b.head()
        assert head >= last
        # No waiting here: head() returned only once B's listeners had everything up to it.
        assert on_b.seqs == list(range(1, head + 1))
        assert [e.seq for e in await b.read(0, None, 100)] == list(range(1, head + 1))


async def test_a_lost_stream_starts_a_new_epoch_and_both_nodes_say_so(shared_logs: Logs) -> None:
    a, b = await two_nodes(shared_logs)
    lost: dict[str, list[str]] = {"a": [], "b": []}
    a.on_discontinuity(lost["a"].append)
    b.on_discontinuity(lost["b"].append)
    on_b = Recorder()
    b.listen(on_b)
    await a.append([draft("a"), draft("b")])
    await a.set_consumer("relay", 2)
    old = a.epoch
    await received(on_b, 2, "node B")

    await drop_stream(shared_logs, a)

    async def both_told() -> bool:
        return bool(lost["a"] and lost["b"])

    await until(both_told, lambda: f"both nodes told of the loss: {lost}")
    new = a.epoch
    assert new != old
    assert b.epoch == new
    for why in (lost["a"][0], lost["b"][0]):
        assert new in why
        assert old in why
    # The new epoch works on both nodes, from sequence 1; old positions are gone.
    [appended] = await b.append([draft("after")])
    assert appended.event.cursor == f"{new}:1"
    assert await a.head() == 1
    assert [e.cursor for e in await a.read(0, None, 10)] == [f"{new}:1"]
    assert (await received(on_b, 3, "node B"))[-1].cursor == f"{new}:1"
    assert await a.get_consumer("relay") is None


async def test_an_append_right_after_the_stream_was_lost_lands_in_a_new_epoch(
    shared_logs: Logs,
) -> None:
    a, b = await two_nodes(shared_logs)
    lost: list[str] = []
    b.on_discontinuity(lost.append)
    on_b = Recorder()
    b.listen(on_b)
    await a.append([draft("a")])
    await received(on_b, 1, "node B")
    old = a.epoch
    await drop_stream(shared_logs, a)
    async with asyncio.timeout(GUARD):
        [appended] = await a.append([draft("first")])
    assert appended.event.epoch != old
    assert appended.event.seq == 1

    async def told() -> bool:
        return bool(lost)

    await until(told, "node B told of the loss")
    assert appended.event.epoch in lost[0]
    assert a.epoch == b.epoch == appended.event.epoch
    assert (await received(on_b, 2, "node B"))[-1].cursor == appended.event.cursor


@pytest.fixture
def proxy(shared_logs: Logs) -> Iterator[TCPProxy]:
    target = REDIS if shared_logs.kind.startswith("redis") else NATS
    started = TCPProxy(*target).start()
    yield started
    started.stop()


async def test_an_unreachable_engine_fails_appends_until_it_is_back(
    shared_logs: Logs, proxy: TCPProxy
) -> None:
    log = await shared_logs.open("cut", address=proxy.address)
    direct = await shared_logs.open("cut")  # another node, which keeps its connection
    on_log = Recorder()
    log.listen(on_log)
    await log.append([draft("before")])

    proxy.cut()
    async with asyncio.timeout(GUARD):
        with pytest.raises(Unavailable) as failed:
            await log.append([draft("during")])
    assert ("NATS" if shared_logs.kind == "nats" else "Redis") in failed.value.detail
    assert str(proxy.port) in failed.value.detail  # the URL the node uses
    await direct.append([draft("elsewhere")])  # the engine itself is fine

    proxy.heal()
    after: list[Appended] = []

    async def appended() -> bool:
        with contextlib.suppress(Unavailable):
            after.extend(await log.append([draft("after")]))
        return bool(after)

    await until(appended, "an append through the healed proxy")
    channels = [e.channel for e in await direct.read(0, None, 10)]
    # "during" may be logged or not: a refused append is either never sent, or timed out and
    # sent later from the client's buffer (hence "retry with the same Idempotency-Key").
    assert [c for c in channels if c != "during"] == ["before", "elsewhere", "after"]
    # The cut node's follower resumed where it was: its listener has everything, in order.
    seen = await received(on_log, len(channels), "the node behind the proxy")
    assert [e.channel for e in seen] == channels
    await shared_logs.close(log)  # before the proxy stops under it
