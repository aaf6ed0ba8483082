"""The webhook store: endpoints, retries, failed marks and the attempt log, on SQLite (a file,
and in memory), on Redis and on NATS JetStream (the same tests, then what only a shared store
does)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.js.errors
import pytest
import redis.asyncio as redis

from brokers import TCPProxy, require_service, until
from tidings.exceptions import ConfigError, Unavailable
from tidings.webhooks.delivery import Attempt, Endpoint, Retry, Secret
from tidings.webhooks.nats_store import NatsWebhookStore
from tidings.webhooks.natscodec import Names
from tidings.webhooks.policy import Health, HealthState, judge
from tidings.webhooks.redis_store import RedisWebhookStore
from tidings.webhooks.store import Failed, Store, WebhookStore

REDIS = ("127.0.0.1", 6379)
REDIS_URL = "redis://127.0.0.1:6379/0"
NATS = ("127.0.0.1", 4222)
NATS_URL = "nats://127.0.0.1:4222"


@contextlib.asynccontextmanager
async def scratch_prefix() -> AsyncIterator[str]:
    """A key prefix no other test uses; its keys are deleted afterwards."""
    require_service(*REDIS, "Redis")
    prefix = f"tidings-test-{uuid.uuid4().hex}"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


@contextlib.asynccontextmanager
async def nats_prefix() -> AsyncIterator[str]:
    """A prefix no other test uses; its bucket and stream are deleted afterwards."""
    require_service(*NATS, "NATS")
    prefix = f"tidings-test-{uuid.uuid4().hex}"
    try:
        yield prefix
    finally:
        nc = await nats.connect(NATS_URL)
        try:
            names = Names(prefix)
            for stream in (names.kv_stream, names.attempts_stream):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await nc.jetstream().delete_stream(stream)
        finally:
            await nc.close()


@pytest.fixture(params=["file", "memory", "redis", "nats"])
async def store(request: Any, tmp_path: Any) -> AsyncIterator[Store]:
    async with contextlib.AsyncExitStack() as stack:
        opened: Store
        if request.param == "redis":
            opened = RedisWebhookStore(REDIS_URL, await stack.enter_async_context(scratch_prefix()))
        elif request.param == "nats":
            require_service(*NATS, "NATS")
            opened = NatsWebhookStore(NATS_URL, await stack.enter_async_context(nats_prefix()))
        else:
            path = os.path.join(str(tmp_path), "t.db") if request.param == "file" else ":memory:"
            opened = WebhookStore(path)
        await opened.open()
        yield opened
        await opened.close()


def endpoint(id: str = "ep_1", **kwargs: Any) -> Endpoint:
    return Endpoint(
        id=id,
        url="https://example.com/hook",
        channels=("orders/**", "users/*"),
        secrets=(Secret("whsec_a", 1.0), Secret("whsec_b", 0.5, expires=99.0)),
        **kwargs,
    )


def attempt(
    seq: int, number: int = 0, status: int | None = 200, when: float = 10.0, on: str = "ep_1"
) -> Attempt:
    outcome = judge(status, None if status else "timeout")
    return Attempt(on, f"e:{seq}", seq, number, when, 0.25, status,
                   None if status else "timeout", b"ok", outcome)  # fmt: skip


async def test_an_endpoint_comes_back_as_it_was_stored(store: Store) -> None:
    stored = endpoint(
        types=("paid",),
        headers=(("x-team", "billing"),),
        description="billing",
        rate_limit=5.0,
        concurrency=2,
        strict_order=True,
        timeout=3.0,
        health=HealthState(Health.FAILING, 12.5, "500"),
        created=1.0,
        updated=2.0,
    )
    await store.put(stored)
    await store.put(endpoint("ep_2"))
    assert sorted(await store.endpoints(), key=lambda e: e.id) == [stored, endpoint("ep_2")]
    await store.put(endpoint(description="edited"))  # a put replaces
    [first, _] = sorted(await store.endpoints(), key=lambda e: e.id)
    assert first.description == "edited"


async def test_retries_and_failed_marks(store: Store) -> None:
    await store.set_retry("ep_1", Retry(5, 1, 100.0))
    await store.set_retry("ep_1", Retry(3, 2, 50.0))
    await store.set_retry("ep_1", Retry(5, 2, 200.0))  # the next attempt replaces the row
    await store.set_retry("ep_2", Retry(5, 1, 100.0))
    assert await store.retries("ep_1") == [Retry(3, 2, 50.0), Retry(5, 2, 200.0)]
    await store.settle("ep_1", 3, None)  # delivered
    await store.settle("ep_1", 5, Failed(5, 300.0, "503"))  # failed for good
    assert await store.retries("ep_1") == []
    assert await store.retries("ep_2") == [Retry(5, 1, 100.0)]
    assert await store.failed("ep_1", 0, 10, 10) == [Failed(5, 300.0, "503")]
    assert await store.failed("ep_1", 5, 10, 10) == []  # (after, until]
    await store.settle("ep_1", 5, None)  # a replay delivered it
    assert await store.failed("ep_1", 0, 10, 10) == []


async def test_an_events_retry_and_failed_mark_are_kept_apart(store: Store) -> None:
    await store.settle("ep_1", 5, Failed(5, 1.0, "503"))
    await store.set_retry("ep_1", Retry(5, 1, 100.0))  # tried again (by a node that lagged)
    await store.set_retry("ep_1", Retry(5, 2, 200.0))
    assert await store.retries("ep_1") == [Retry(5, 2, 200.0)]
    assert await store.failed("ep_1", 0, 10, 10) == [Failed(5, 1.0, "503")]
    assert await store.trim(before=0.0, low=5) == 0  # the mark goes with its event
    assert await store.failed("ep_1", 0, 10, 10) == []
    assert await store.retries("ep_1") == [Retry(5, 2, 200.0)]  # the retry stays
    await store.settle("ep_1", 5, Failed(5, 3.0, "again"))
    assert await store.retries("ep_1") == []
    assert await store.failed("ep_1", 0, 10, 10) == [Failed(5, 3.0, "again")]


async def test_the_attempt_log_pages_newest_first_and_trims_by_age(store: Store) -> None:
    for seq in range(1, 6):
        await store.record(attempt(seq, when=float(seq)))
    await store.record(attempt(2, number=1, status=None, when=6.0))
    newest = await store.attempts("ep_1", None, None, 4)
    assert [(a.seq, a.number) for a in newest] == [(2, 1), (5, 0), (4, 0), (3, 0)]
    assert newest[0].error == "timeout" and newest[0].outcome == "retry"
    older = await store.attempts("ep_1", None, newest[-1].id, 4)
    assert [a.seq for a in older] == [2, 1]
    assert [a.number for a in await store.attempts("ep_1", 2, None, 10)] == [1, 0]
    assert await store.trim(before=3.0) == 2
    assert [a.seq for a in await store.attempts("ep_1", None, None, 10)] == [2, 5, 4, 3]


async def test_recording_waits_for_the_flush_when_far_behind(store: Store) -> None:
    stopping = asyncio.Event()
    flusher = asyncio.create_task(store.run(stopping))
    await asyncio.gather(*(store.record(attempt(i)) for i in range(1, 5001)))
    stopping.set()
    await flusher
    assert len(await store.attempts("ep_1", None, None, 1000)) == 1000


async def test_delete_removes_everything_kept_about_an_endpoint(store: Store) -> None:
    await store.put(endpoint())
    await store.set_retry("ep_1", Retry(1, 1, 1.0))
    await store.settle("ep_1", 2, Failed(2, 1.0, "x"))
    await store.record(attempt(1))
    await store.delete("ep_1")
    assert await store.endpoints() == []
    assert await store.retries("ep_1") == []
    assert await store.failed("ep_1", 0, 10, 10) == []
    assert await store.attempts("ep_1", None, None, 10) == []


async def test_one_events_attempts_page_below_an_id_and_other_endpoints_stay_apart(
    store: Store,
) -> None:
    for number in range(4):
        await store.record(attempt(7, number=number, status=500))
        await store.record(attempt(8, number=number))
        await store.record(attempt(7, number=number, on="ep_2"))
    page = await store.attempts("ep_1", 7, None, 2)
    assert [a.number for a in page] == [3, 2]
    rest = await store.attempts("ep_1", 7, page[-1].id, 10)
    assert [a.number for a in rest] == [1, 0]
    assert all(a.seq == 7 and a.status == 500 and a.outcome == "retry" for a in page + rest)
    assert await store.attempts("ep_1", 7, rest[-1].id, 10) == []
    assert await store.attempts("ep_1", 9, None, 10) == []
    everything = await store.attempts("ep_1", None, None, 100)
    assert len(everything) == 8
    assert [a.id for a in everything] == sorted((a.id for a in everything), reverse=True)
    assert len(await store.attempts("ep_2", None, None, 100)) == 4
    assert await store.attempts("ep_1", None, None, 0) == []


async def test_a_stored_attempt_keeps_every_field(store: Store) -> None:
    sent = Attempt("ep_1", "e:3", 3, 2, 1234.5, 0.125, None, "connection refused",
                   b"\x00\n{binary}\xff" * 3, judge(None, "connection refused"),
                   "replay")  # fmt: skip
    await store.record(sent)
    [got] = await store.attempts("ep_1", None, None, 10)
    assert (got.seq, got.number, got.time, got.duration, got.status, got.error, got.response,
            got.outcome, got.reason, got.trigger) == (
        3, 2, 1234.5, 0.125, None, "connection refused", sent.response,
        sent.outcome.verdict.value, sent.outcome.reason, "replay")  # fmt: skip


async def test_failed_marks_page_oldest_first_and_trim_drops_those_retention_removed(
    store: Store,
) -> None:
    for seq in (2, 4, 6, 8):
        await store.settle("ep_1", seq, Failed(seq, float(seq), f"{seq}xx"))
        await store.settle("ep_2", seq, Failed(seq, float(seq), "x"))
    await store.settle("ep_1", 4, Failed(4, 40.0, "again"))  # a later failure replaces the mark
    assert await store.failed("ep_1", 0, 100, 2) == [
        Failed(2, 2.0, "2xx"),
        Failed(4, 40.0, "again"),
    ]
    assert [f.seq for f in await store.failed("ep_1", 2, 6, 10)] == [4, 6]  # (after, until]
    assert await store.trim(before=0.0, low=4) == 0
    assert [f.seq for f in await store.failed("ep_1", 0, 100, 10)] == [6, 8]
    assert [f.seq for f in await store.failed("ep_2", 0, 100, 10)] == [6, 8]


async def test_pages_of_a_long_attempt_log_are_those_of_one_full_read(store: Store) -> None:
    mine = [n % 3 == 0 or 1000 <= n < 1400 for n in range(3000)]  # ep_1's: unevenly spread
    for n in range(3000):
        on = "ep_1" if mine[n] else f"ep_{2 + n % 2}"
        await store.record(attempt(n // 7, number=n % 7, on=on))
        if n % 1000 == 999:
            await store.flush()
    everything = await store.attempts("ep_1", None, None, -1)
    assert len(everything) == sum(mine) == len({a.id for a in everything})
    for limit in (1, 7, 100, 500):
        paged: list[Any] = []
        before = None
        for _ in range(30):  # every page of the larger limits, the first of the others
            page = await store.attempts("ep_1", None, before, limit)
            if not page:
                break
            assert len(page) == limit or len(paged) + len(page) == len(everything)
            paged.extend(page)
            before = page[-1].id
        assert paged == everything[: len(paged)], limit
        assert limit < 100 or len(paged) == len(everything)
    middle = everything[len(everything) // 2].id
    assert (
        await store.attempts("ep_1", None, middle, 5)
        == [a for a in everything if a.id < middle][:5]
    )
    one = await store.attempts("ep_1", 150, None, 100)
    assert one == [a for a in everything if a.seq == 150] and len(one) == 7
    assert await store.attempts("ep_1", 150, one[2].id, 2) == one[3:5]


# SQLite only: the file reopened. The Redis and NATS counterpart is
# test_a_second_node_sees_what_the_first_stored.
async def test_the_file_keeps_it_all_across_a_reopen(tmp_path: Any) -> None:
    path = os.path.join(str(tmp_path), "t.db")
    first = WebhookStore(path)
    await first.open()
    await first.put(endpoint())
    await first.set_retry("ep_1", Retry(4, 3, 9.0))
    await first.record(attempt(4))
    await first.close()  # flushes the attempt log
    second = WebhookStore(path)
    await second.open()
    try:
        assert await second.endpoints() == [endpoint()]
        assert await second.retries("ep_1") == [Retry(4, 3, 9.0)]
        assert [a.seq for a in await second.attempts("ep_1", None, None, 10)] == [4]
    finally:
        await second.close()


# -- Redis and NATS: a store several nodes share ----------------------------------------------


S = TypeVar("S", bound=Store)


@contextlib.asynccontextmanager
async def opened(store: S) -> AsyncIterator[S]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def redis_store(
    prefix: str, url: str = REDIS_URL
) -> contextlib.AbstractAsyncContextManager[RedisWebhookStore]:
    return opened(RedisWebhookStore(url, prefix))


def nats_store(
    prefix: str, url: str = NATS_URL
) -> contextlib.AbstractAsyncContextManager[NatsWebhookStore]:
    return opened(NatsWebhookStore(url, prefix))


async def keys_of(prefix: str) -> list[str]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return sorted([key async for key in client.scan_iter(match=f"{prefix}:*")])
    finally:
        await client.aclose()


async def messages_of(prefix: str) -> dict[str, int]:
    """How many messages each of the deployment's webhook streams holds."""
    nc = await nats.connect(NATS_URL)
    try:
        names = Names(prefix)
        js = nc.jetstream()
        return {
            stream: (await js.stream_info(stream)).state.messages
            for stream in (names.kv_stream, names.attempts_stream)
        }
    finally:
        await nc.close()


@dataclass(frozen=True)
class Shared:
    """One engine of the stores several nodes share, for the tests both pass."""

    name: str  # as the store's messages name it
    service: tuple[str, int]
    prefix: Callable[[], contextlib.AbstractAsyncContextManager[str]]
    store: Callable[..., contextlib.AbstractAsyncContextManager[Store]]  # (prefix, url=), open
    make: Callable[[str, str], Store]  # (url, prefix), not open
    url: Callable[[str], str]  # the store's URL for a host:port

    async def assert_nothing_left(self, prefix: str) -> None:
        """Nothing of the deployment's attempts, endpoints and events is stored."""
        if self.name == "Redis":
            assert await keys_of(prefix) == [f"{prefix}:wh:attempt-id"]
        else:
            assert set((await messages_of(prefix)).values()) == {0}


@pytest.fixture(params=["redis", "nats"])
def shared(request: Any) -> Shared:
    if request.param == "redis":
        return Shared("Redis", REDIS, scratch_prefix, redis_store, RedisWebhookStore,
                      lambda at: f"redis://{at}/0")  # fmt: skip
    require_service(*NATS, "NATS")
    return Shared("NATS", NATS, nats_prefix, nats_store, NatsWebhookStore,
                  lambda at: f"nats://{at}")  # fmt: skip


async def store_some_of_everything(store: Store, *ids: str) -> None:
    """An endpoint, a retry, a failed mark and an attempt of each of ``ids``, all flushed."""
    for id in ids:
        await store.put(endpoint(id))
        await store.set_retry(id, Retry(1, 1, 1.0))
        await store.settle(id, 2, Failed(2, 1.0, "x"))
        await store.record(attempt(1, on=id))
    await store.flush()


async def test_a_second_node_sees_what_the_first_stored(shared: Shared) -> None:
    async with (
        shared.prefix() as prefix,
        shared.store(prefix) as first,
        shared.store(prefix) as second,
    ):
        await first.put(endpoint())
        await first.set_retry("ep_1", Retry(4, 3, 9.0))
        await first.settle("ep_1", 5, Failed(5, 1.0, "503"))
        for seq in (1, 2):
            await first.record(attempt(seq))
            await second.record(attempt(seq, number=1))
            await first.flush()
            await second.flush()
        assert await second.endpoints() == [endpoint()]
        assert await second.retries("ep_1") == [Retry(4, 3, 9.0)]
        assert await second.failed("ep_1", 0, 10, 10) == [Failed(5, 1.0, "503")]
        seen = [(a.seq, a.number) for a in await first.attempts("ep_1", None, None, 10)]
        assert seen == [(2, 1), (2, 0), (1, 1), (1, 0)]  # ids follow the order of the flushes
        # On NATS, the revision first remembers of its own write is old now.
        await second.set_retry("ep_1", Retry(4, 4, 10.0))
        await first.set_retry("ep_1", Retry(4, 5, 11.0))
        assert await second.retries("ep_1") == [Retry(4, 5, 11.0)]
        await second.delete("ep_1")
        assert await first.endpoints() == []
        assert await first.attempts("ep_1", None, None, 10) == []


async def test_trim_removes_the_oldest_attempts_across_endpoints(shared: Shared) -> None:
    # Redis removes them a batch (TRIM_BATCH) at a time, NATS purges the oldest run.
    async with shared.prefix() as prefix, shared.store(prefix) as store:
        for seq in range(2500):
            await store.record(attempt(seq, when=float(seq), on=f"ep_{seq % 2}"))
            if seq % 1000 == 999:
                await store.flush()  # no run(): record would wait at FLUSH_ROWS
        await store.flush()
        assert await store.trim(before=2200.0) == 2200
        assert len(await store.attempts("ep_0", None, None, -1)) == 150
        assert await store.trim(before=1e12) == 300
        await shared.assert_nothing_left(prefix)


async def test_a_lost_connection_is_unavailable_and_the_flush_catches_up_after_it(
    shared: Shared, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = TCPProxy(*shared.service).start()
    url = shared.url(proxy.address)
    try:
        async with (
            shared.prefix() as prefix,
            shared.store(prefix, url) as store,
            shared.store(prefix) as reader,
        ):
            stopping = asyncio.Event()
            flusher = asyncio.create_task(store.run(stopping))
            await store.put(endpoint())
            proxy.cut()
            for write in (store.put(endpoint()), store.set_retry("ep_1", Retry(1, 1, 1.0)),
                          store.settle("ep_1", 1, None), store.endpoints(),
                          store.failed("ep_1", 0, 10, 10)):  # fmt: skip
                with pytest.raises(Unavailable, match=f"cannot reach {shared.name} at {url}"):
                    await write
            for seq in (1, 2, 3):
                await store.record(attempt(seq))
            await until(lambda: _true("attempts wait to be written" in caplog.text), "a warning")
            proxy.heal()

            async def written() -> int:
                return len(await reader.attempts("ep_1", None, None, 10))

            assert await until(written, "the buffered attempts written") == 3
            stopping.set()
            await flusher
            assert [a.seq for a in await store.attempts("ep_1", None, None, 10)] == [3, 2, 1]
            await store.set_retry("ep_1", Retry(1, 1, 1.0))  # the connection is back
            assert await reader.retries("ep_1") == [Retry(1, 1, 1.0)]
    finally:
        proxy.stop()


async def test_closing_while_the_engine_is_unreachable_logs_the_lost_attempts(
    shared: Shared, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = TCPProxy(*shared.service).start()
    try:
        async with shared.prefix() as prefix:
            store = shared.make(shared.url(proxy.address), prefix)
            await store.open()
            await store.record(attempt(1))
            proxy.cut()
            started = time.monotonic()
            await store.close()  # shutting down does not wait for the engine
            assert time.monotonic() - started < 2
            assert "1 attempts not written" in caplog.text
    finally:
        proxy.stop()


async def _true(value: bool) -> bool:
    return value


# -- Redis only -------------------------------------------------------------------------------


async def test_keys_stay_under_the_prefix_and_delete_leaves_none_of_the_endpoint() -> None:
    async with scratch_prefix() as prefix, redis_store(prefix) as store:
        await store_some_of_everything(store, "ep_1", "ep_1:retries")  # one like a key suffix
        assert all(key.startswith(f"{prefix}:wh:") for key in await keys_of(prefix))
        await store.delete("ep_1:retries")
        assert await store.retries("ep_1") == [Retry(1, 1, 1.0)]
        assert [e.id for e in await store.endpoints()] == ["ep_1"]
        await store.delete("ep_1")
        assert await keys_of(prefix) == [f"{prefix}:wh:attempt-id"]


async def test_an_unreachable_redis_fails_open_with_one_line_naming_it() -> None:
    dead = "redis://:s3cret@127.0.0.1:1/0"
    with pytest.raises(ConfigError) as raised:
        await RedisWebhookStore(dead).open()
    message = raised.value.detail
    assert "Redis" in message and "redis://:***@127.0.0.1:1/0" in message, message
    assert "s3cret" not in message and "\n" not in message
    with pytest.raises(ConfigError, match="not a Redis URL"):
        await RedisWebhookStore("http://127.0.0.1:6379").open()


# -- NATS only --------------------------------------------------------------------------------


async def test_names_stay_under_the_prefix_and_delete_leaves_nothing_of_the_endpoint() -> None:
    async with nats_prefix() as prefix, nats_store(prefix) as store:
        ids = ("ep_1", "ep_1:retries", "ep_1.x", "ep_1.>", "ep_1*")  # ids that look like wildcards
        await store_some_of_everything(store, *ids)
        nc = await nats.connect(NATS_URL)
        try:
            mine = {i.config.name for i in await nc.jetstream().streams_info() if
                    i.config.name and prefix.upper() in i.config.name.upper()}  # fmt: skip
        finally:
            await nc.close()
        assert mine == {store.names.kv_stream, store.names.attempts_stream}
        for id in ids[1:]:
            await store.delete(id)
            assert await store.retries("ep_1") == [Retry(1, 1, 1.0)]
            assert len(await store.attempts("ep_1", None, None, 10)) == 1
        assert [e.id for e in await store.endpoints()] == ["ep_1"]
        await store.delete("ep_1")
        assert set((await messages_of(prefix)).values()) == {0}


async def test_an_old_attempt_recorded_after_a_younger_one_goes_at_a_later_trim() -> None:
    # The one difference from SQLite: trim purges the oldest run of the log, so an attempt
    # that began earlier than one recorded before it (it took longer) waits for that one.
    async with nats_prefix() as prefix, nats_store(prefix) as store:
        for seq, when in ((1, 10.0), (2, 30.0), (3, 20.0), (4, 40.0)):
            await store.record(attempt(seq, when=when))
        await store.flush()
        assert await store.trim(before=25.0) == 1
        assert [a.seq for a in await store.attempts("ep_1", None, None, 10)] == [4, 3, 2]
        assert await store.trim(before=35.0) == 2
        assert [a.seq for a in await store.attempts("ep_1", None, None, 10)] == [4]


async def test_a_stream_deleted_under_the_store_is_made_again() -> None:
    async with nats_prefix() as prefix, nats_store(prefix) as store:
        await store.put(endpoint())
        nc = await nats.connect(NATS_URL)
        try:
            for stream in (store.names.kv_stream, store.names.attempts_stream):
                await nc.jetstream().delete_stream(stream)
        finally:
            await nc.close()
        await store.record(attempt(1))
        assert [a.seq for a in await store.attempts("ep_1", None, None, 10)] == [1]
        assert await store.endpoints() == []
        await store.put(endpoint())
        assert await store.endpoints() == [endpoint()]


async def test_an_unreachable_nats_fails_open_with_one_line_naming_it() -> None:
    dead = "nats://u:s3cret@127.0.0.1:1"
    started = time.monotonic()
    with pytest.raises(ConfigError) as raised:
        await NatsWebhookStore(dead).open()
    assert time.monotonic() - started < 8
    message = raised.value.detail
    assert "NATS" in message and "nats://u:***@127.0.0.1:1" in message, message
    assert "s3cret" not in message and "\n" not in message
    with pytest.raises(ConfigError, match="not a NATS URL"):
        await NatsWebhookStore("http://127.0.0.1:4222").open()
    with pytest.raises(ConfigError, match="prefix"):
        NatsWebhookStore(NATS_URL, "no spaces")
