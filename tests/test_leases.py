"""Leases (``tidings/leases``) against the real Redis on 127.0.0.1:6379 and NATS JetStream on
127.0.0.1:4222, and the memory leases.

Every test owns a unique prefix (its Redis keys, its NATS bucket) and removes it. Without an
engine its tests skip with the reason, and fail under ``CI=true`` (tests/brokers.py). A node
that vanishes or is cut off reaches its engine through a test-owned TCP proxy that the test
cuts; the engines themselves are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import nats.js.errors
import pytest
import redis.asyncio

from brokers import TCPProxy, require_service
from tidings.exceptions import ConfigError
from tidings.leases import LeaseRunner, Leases, check_name, leases_for
from tidings.leases.memory import MemoryLeases
from tidings.leases.nats import NatsLeases
from tidings.leases.redis import RedisLeases

TTL = 1.0
GUARD = 10.0  # seconds; only a guard against a hang, never a timing assertion
LEASE = "webhooks"
REDIS = ("127.0.0.1", 6379)
NATS = ("127.0.0.1", 4222)


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + GUARD
    while not check():
        assert time.monotonic() < deadline, f"{what}: not after {GUARD} s"
        await asyncio.sleep(0.02)


class Tally:
    """Which nodes' work is running now, and every time two ran at once."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.overlaps: list[set[str]] = []


class Node:
    """One node's ``Leases``, running ``LEASE`` with work that runs until cancelled (or raises
    on the calls listed in ``fail``), counting starts and cancellations."""

    def __init__(self, label: str, leases: Leases, tally: Tally, fail: tuple[int, ...] = ()):
        self.label = label
        self.leases = leases
        self.tally = tally
        self.fail = fail
        self.stopping = asyncio.Event()
        self.starts = 0
        self.cancels = 0
        self.task: asyncio.Task[None] | None = None

    @property
    def holding(self) -> bool:
        return self.leases.holding(LEASE)

    def start(self, tg: asyncio.TaskGroup) -> Node:
        self.task = tg.create_task(self.leases.run(LEASE, self.work, self.stopping))
        return self

    async def stop(self) -> None:
        self.stopping.set()
        assert self.task is not None
        async with asyncio.timeout(GUARD):
            await self.task

    async def work(self) -> None:
        self.starts += 1
        if self.starts in self.fail:
            raise RuntimeError(f"work {self.starts} fails")
        if self.tally.running:
            self.tally.overlaps.append({*self.tally.running, self.label})
        self.tally.running.add(self.label)
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            self.cancels += 1
            raise
        finally:
            self.tally.running.discard(self.label)


class Engine:
    """Makes ``Leases`` on one engine under one unique prefix, reads and steals their keys
    behind their backs, and cleans up."""

    kind = "memory"
    address = ("", 0)

    def __init__(self) -> None:
        self.prefix = "t" + uuid.uuid4().hex[:12]
        self.tally = Tally()
        self.made: list[LeaseRunner[Any]] = []
        self.proxies: list[TCPProxy] = []

    def url(self, host: str, port: int) -> str:
        return "memory://"

    async def node(self, label: str, *, proxied: bool = False, **kwargs: Any) -> Node:
        """A node, open; ``proxied``: through a new proxy (``self.proxies[-1]``)."""
        host, port = self.address
        if proxied:
            self.proxies.append(TCPProxy(host, port).start())
            host, port = "127.0.0.1", self.proxies[-1].port
        leases = leases_for(self.url(host, port), prefix=self.prefix, ttl=TTL, node=label)
        assert isinstance(leases, LeaseRunner)
        self.made.append(leases)
        await leases.open()
        return Node(label, leases, self.tally, **kwargs)

    async def value(self, name: str) -> bytes | None:
        raise NotImplementedError

    async def steal(self, name: str) -> None:
        """Delete the lease's key, then acquire it as another holder."""
        raise NotImplementedError

    async def cleanup(self) -> None:
        for leases in self.made:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(GUARD):
                    await leases.close()
        for proxy in self.proxies:
            proxy.stop()


class Redis(Engine):
    kind = "redis"
    address = REDIS

    def __init__(self) -> None:
        super().__init__()
        self.client = redis.asyncio.Redis(host=REDIS[0], port=REDIS[1])

    def url(self, host: str, port: int) -> str:
        return f"redis://{host}:{port}"

    def key(self, name: str) -> str:
        return f"{self.prefix}:lease:{name}"

    async def value(self, name: str) -> bytes | None:
        value: bytes | None = await self.client.get(self.key(name))
        return value

    async def steal(self, name: str) -> None:
        await self.client.delete(self.key(name))
        assert await self.client.set(self.key(name), b"thief/1", nx=True, px=int(TTL * 1000))

    async def cleanup(self) -> None:
        await super().cleanup()
        async for key in self.client.scan_iter(match=f"{self.prefix}:*"):
            await self.client.delete(key)
        await self.client.aclose()


class Nats(Engine):
    kind = "nats"
    address = NATS

    def url(self, host: str, port: int) -> str:
        return f"nats://{host}:{port}"

    async def connect(self) -> None:
        self.nc = await nats.connect(self.url(*NATS))
        self.js = self.nc.jetstream()

    async def value(self, name: str) -> bytes | None:
        kv = await self.js.key_value(f"{self.prefix}_leases")
        try:
            return (await kv.get(name)).value
        except nats.js.errors.KeyNotFoundError:
            return None

    async def steal(self, name: str) -> None:
        kv = await self.js.key_value(f"{self.prefix}_leases")
        await kv.delete(name)
        await kv.create(name, b"thief/1")

    async def cleanup(self) -> None:
        await super().cleanup()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_key_value(f"{self.prefix}_leases")
        await self.nc.close()


@contextlib.asynccontextmanager
async def made(kind: str) -> AsyncIterator[Engine]:
    engine: Engine
    if kind == "redis":
        require_service(*REDIS, "Redis")
        engine = Redis()
    elif kind == "nats":
        require_service(*NATS, "NATS")
        engine = Nats()
        await engine.connect()
    else:
        engine = Engine()
    try:
        yield engine
    finally:
        await engine.cleanup()


@pytest.fixture(params=["redis", "nats"])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    async with made(request.param) as engine:
        yield engine


@pytest.fixture(params=["memory", "redis", "nats"])
async def any_engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    async with made(request.param) as engine:
        yield engine


def holder(nodes: list[Node]) -> Node | None:
    holding = [node for node in nodes if node.holding]
    assert len(holding) <= 1, [node.label for node in holding]
    return holding[0] if holding else None


async def three_nodes_started(engine: Engine, tg: asyncio.TaskGroup) -> tuple[list[Node], Node]:
    """Nodes a, b and c running the lease's work in ``tg``, once one of them holds it: the
    nodes, and the one holding."""
    nodes = [await engine.node(label) for label in "abc"]
    for node in nodes:
        node.start(tg)
    await until(lambda: holder(nodes) is not None, "a node holds the lease")
    first = holder(nodes)
    assert first is not None
    return nodes, first


async def a_holding_and_b_waiting(engine: Engine, tg: asyncio.TaskGroup) -> tuple[Node, Node]:
    """Node a, through a proxy (``engine.proxies[-1]``), holding the lease in ``tg``, then node
    b started, trying for it."""
    a = await engine.node("a", proxied=True)
    b = await engine.node("b")
    a.start(tg)
    await until(lambda: a.holding, "a holds the lease")
    b.start(tg)
    return a, b


async def test_one_of_three_nodes_runs_the_work_at_a_time(engine: Engine) -> None:
    async with asyncio.TaskGroup() as tg:
        nodes, first = await three_nodes_started(engine, tg)
        await asyncio.sleep(2 * TTL)  # several renewals, and tries by the others
        assert holder(nodes) is first
        assert first is not None and first.starts == 1 and first.cancels == 0
        assert sum(node.starts for node in nodes) == 1
        for node in nodes:
            await node.stop()
    assert engine.tally.overlaps == []


async def test_stopping_the_holder_releases_its_lease_and_another_takes_over(
    engine: Engine,
) -> None:
    # On NATS the release leaves a delete marker, which the next create must accept.
    async with asyncio.TaskGroup() as tg:
        nodes, first = await three_nodes_started(engine, tg)
        await first.stop()
        assert not first.holding and first.cancels == 1
        value = await engine.value(LEASE)
        assert value is None or not value.startswith(f"{first.label}/".encode())
        await until(lambda: holder(nodes) not in (None, first), "another node took over")
        for node in nodes:
            await node.stop()
    assert engine.tally.overlaps == []


async def test_a_holder_that_vanishes_without_releasing_is_replaced_within_the_ttl(
    engine: Engine,
) -> None:
    async with asyncio.TaskGroup() as tg:
        a, b = await a_holding_and_b_waiting(engine, tg)
        # As kill -9 does: the connection drops, and nothing is released.
        engine.proxies[-1].cut()
        assert a.task is not None
        a.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await a.task
        assert a.cancels == 1
        await until(lambda: b.holding, "b took over once a's lease expired")
        assert b.starts == 1
        await b.stop()


async def test_a_holder_cut_off_from_the_engine_cancels_its_work_and_another_takes_over(
    engine: Engine,
) -> None:
    async with asyncio.TaskGroup() as tg:
        a, b = await a_holding_and_b_waiting(engine, tg)
        engine.proxies[-1].cut()
        await until(lambda: a.cancels == 1 and not a.holding, "a gave up its unrenewed lease")
        await until(lambda: b.holding, "b took over once a's lease expired")
        engine.proxies[-1].heal()
        await asyncio.sleep(TTL)  # a reconnects and tries again, but b holds the lease
        assert b.holding and not a.holding and a.starts == 1
        await a.stop()
        await b.stop()


async def test_a_holder_whose_lease_was_taken_cancels_its_work(engine: Engine) -> None:
    a = await engine.node("a")
    async with asyncio.TaskGroup() as tg:
        a.start(tg)
        await until(lambda: a.holding, "a holds the lease")
        await engine.steal(LEASE)
        await until(lambda: a.cancels == 1, "a's renewal found the lease taken")
        assert not a.holding
        # The thief never renews, so a gets the lease back once it expires.
        await until(lambda: a.holding and a.starts == 2, "a holds the lease again")
        await a.stop()


async def test_work_that_raises_is_logged_and_restarted(
    any_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    a = await any_engine.node("a", fail=(1,))
    async with asyncio.TaskGroup() as tg:
        a.start(tg)
        await until(lambda: a.starts == 2 and a.holding, "the work ran again")
        await a.stop()
    assert a.cancels == 1
    failed = [r for r in caplog.records if r.name == "tidings.leases" and r.exc_info]
    assert [str(r.exc_info[1]) for r in failed if r.exc_info] == ["work 1 fails"]


async def test_close_releases_every_lease_and_ends_its_runs(any_engine: Engine) -> None:
    a = await any_engine.node("a")
    stopping = asyncio.Event()  # never set: close() ends the runs

    async def work() -> None:
        await asyncio.get_running_loop().create_future()

    async with asyncio.TaskGroup() as tg:
        for name in ("one", "two.b"):
            tg.create_task(a.leases.run(name, work, stopping))
        await until(lambda: a.leases.holding("one") and a.leases.holding("two.b"), "both held")
        async with asyncio.timeout(GUARD):
            await a.leases.close()
    assert not a.leases.holding("one") and not a.leases.holding("two.b")
    if any_engine.kind != "memory":
        assert await any_engine.value("one") is None
        assert await any_engine.value("two.b") is None


async def test_work_that_watches_stopping_finishes_by_itself(any_engine: Engine) -> None:
    a = await any_engine.node("a")
    stopping = asyncio.Event()
    finished: list[str] = []

    async def work() -> None:  # like a relay: on stopping, it tidies up and returns
        await stopping.wait()
        await asyncio.sleep(0.05)
        finished.append("tidied")

    async with asyncio.TaskGroup() as tg:
        tg.create_task(a.leases.run("graceful", work, stopping))
        await until(lambda: a.leases.holding("graceful"), "the lease is held")
        stopping.set()
    assert finished == ["tidied"], "the work was cancelled instead of finishing"
    assert not a.leases.holding("graceful")
    await a.leases.close()


async def test_memory_runs_of_one_name_take_turns() -> None:
    async with made("memory") as engine:
        a = await engine.node("a")
        twin = Node("twin", a.leases, engine.tally)
        async with asyncio.TaskGroup() as tg:
            a.start(tg)
            await until(lambda: a.starts == 1, "a runs")
            twin.start(tg)
            await asyncio.sleep(0.1)
            assert twin.starts == 0
            await a.stop()
            await until(lambda: twin.starts == 1, "the twin runs once a stopped")
            await twin.stop()
        assert engine.tally.overlaps == []


async def test_nats_refuses_a_bucket_made_with_another_ttl() -> None:
    async with made("nats") as engine:
        await engine.node("a")
        other = NatsLeases(engine.url(*NATS), prefix=engine.prefix, ttl=2 * TTL)
        with pytest.raises(ConfigError, match=r"after 1\.0 s, but this node's lease ttl is 2\.0"):
            await other.open()


async def test_nats_uses_a_bucket_made_otherwise_whose_entries_expire_after_the_ttl() -> None:
    async with made("nats") as engine:
        assert isinstance(engine, Nats)
        bucket = f"{engine.prefix}_leases"
        await engine.js.create_key_value(bucket=bucket, history=5, ttl=TTL, description="x")
        a = await engine.node("a")
        async with asyncio.TaskGroup() as tg:
            a.start(tg)
            await until(lambda: a.holding, "a holds the lease")
            await a.stop()


def test_leases_for_picks_the_engine_by_url_scheme() -> None:
    assert isinstance(leases_for("memory://"), MemoryLeases)
    assert isinstance(leases_for("redis://localhost:6379/0", ttl=5), RedisLeases)
    assert isinstance(leases_for("nats://localhost:4222"), NatsLeases)
    with pytest.raises(ConfigError, match="no leases"):
        leases_for("sqlite:///tmp/x")


@pytest.mark.parametrize("name", ["", "a b", ".a", "a.", "a..b", "a*", "a>"])
def test_lease_names_are_words_and_inner_dots(name: str) -> None:
    with pytest.raises(ValueError, match="lease name"):
        check_name(name)
    assert check_name("relay.mqtt-1_x") == "relay.mqtt-1_x"


def test_ttl_must_be_positive() -> None:
    for ttl in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="ttl"):
            RedisLeases(ttl=ttl)
