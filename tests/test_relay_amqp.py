"""The AMQP relay against the real RabbitMQ on 127.0.0.1:5672 (guest/guest).

Every test owns uniquely named exchanges and queues and deletes them at the end. Without a
broker the broker tests skip with the reason, and fail under ``CI=true`` (tests/brokers.py).
Faults come from a test-owned TCP proxy between tidings and RabbitMQ, or from ``kill -9`` of
a ``tidings serve`` process; the broker itself is never restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractQueue

import brokers
from brokers import (
    DEADLINE,
    TCPProxy,
    counter,
    history,
    history_until,
    publish,
    require_service,
    until_serving,
)
from conftest import RunningServer, make_settings
from serving import Serve
from streaming import SSEClient
from tidings.backoff import Backoff
from tidings.events import Cursor, Event
from tidings.exceptions import (
    Forbidden,
    InvalidChannel,
    InvalidEvent,
    PayloadTooLarge,
    Unavailable,
)
from tidings.relays import CURSOR_PROPERTY
from tidings.relays import amqp as relay_amqp
from tidings.relays.amqp import PERSISTENT, channel_of, properties, reason_of

HOST, PORT = "127.0.0.1", 5672
BROKER = f"amqp://guest:guest@{HOST}:{PORT}/"

# -- the pure mappings (no broker) -------------------------------------------------------------


def test_outbound_properties_carry_cursor_channel_type_and_are_persistent() -> None:
    event = Event("e1", 7, "orders/42", "order.paid", b'{"a":1}', "application/json", 1.7e9)
    props = properties(event)
    assert props.message_id == "e1:7"
    assert props.headers == {CURSOR_PROPERTY: "e1:7", "tidings-channel": "orders/42"}
    assert props.delivery_mode == PERSISTENT == aio_pika.DeliveryMode.PERSISTENT
    assert (props.message_type, props.content_type, props.app_id) == (
        "order.paid", "application/json", "tidings"
    )  # fmt: skip
    assert props.timestamp is not None and props.timestamp.timestamp() == 1.7e9


def test_inbound_channel_is_the_header_when_present_else_the_mapped_routing_key() -> None:
    assert channel_of("sensors.7.temp", {}) == "sensors/7/temp"
    assert channel_of("ignored", {"tidings-channel": "orders/v1.2"}) == "orders/v1.2"
    assert channel_of("ignored", {"tidings-channel": b"orders/x"}) == "orders/x"
    with pytest.raises(InvalidChannel):
        channel_of("x", {"tidings-channel": b"\xff"})
    with pytest.raises(InvalidChannel):
        channel_of("x", {"tidings-channel": 42})


def test_refusals_map_to_dead_letter_reasons_and_unavailable_is_not_one() -> None:
    assert reason_of(PayloadTooLarge("big")) == "too_large"
    assert reason_of(InvalidChannel("bad")) == "invalid_channel"
    assert reason_of(InvalidEvent("bad")) == "invalid_event"
    assert reason_of(Forbidden("no")) == "forbidden"
    assert reason_of(Unavailable("stopping")) is None


async def idle_until_lost() -> tuple[asyncio.Task[None], asyncio.Future[str]]:
    """A task idling inside ``_CancelOnLoss``, started, and the future that reports the loss."""
    lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def idle() -> None:
        async with relay_amqp._CancelOnLoss(lost):
            await asyncio.sleep(60)

    task = asyncio.create_task(idle())
    await asyncio.sleep(0)
    return task, lost


async def test_a_lost_connection_cancels_the_work_inside_as_connection_error() -> None:
    task, lost = await idle_until_lost()
    lost.set_result("broker connection lost (test)")
    with pytest.raises(ConnectionError, match="test"):
        await task


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    task, lost = await idle_until_lost()
    task.cancel()
    lost.set_result("lost at the same time")
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_direction_that_fails_is_restarted_not_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_amqp, "Backoff", lambda **_: Backoff(initial=0.001, cap=0.001))
    stopping = asyncio.Event()
    runs: list[int] = []

    async def flaky(stop: asyncio.Event) -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("the log is on fire")
        stop.set()

    await asyncio.wait_for(relay_amqp._supervise("outbound", flaky, stopping), 5)
    assert len(runs) == 3


# -- fixtures and helpers ------------------------------------------------------------------------


@dataclass
class Names:
    """One test's exchanges and queues, all deleted afterwards."""

    prefix: str
    queues: list[str] = field(default_factory=list)

    @property
    def exchange(self) -> str:
        return f"{self.prefix}.out"

    @property
    def inbound_exchange(self) -> str:
        return f"{self.prefix}.in"

    @property
    def inbound_queue(self) -> str:
        return f"{self.prefix}.inq"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    def queue(self, suffix: str) -> str:
        name = f"{self.prefix}.q.{suffix}"
        self.queues.append(name)
        return name

    def settings(self, url: str = BROKER) -> dict[str, Any]:
        return {
            "amqp_url": url,
            "amqp_exchange": self.exchange,
            "amqp_inbound_exchange": self.inbound_exchange,
            "amqp_inbound_queue": self.inbound_queue,
            "amqp_dead_letter_exchange": self.dead_letter_exchange,
        }

    def environ(self) -> dict[str, str]:
        return {f"TIDINGS_{k.upper()}": v for k, v in self.settings().items()}


@pytest.fixture
def rabbit() -> None:
    require_service(HOST, PORT, "RabbitMQ")


@pytest.fixture
async def amqp(rabbit: None) -> AsyncIterator[AbstractConnection]:
    connection = await aio_pika.connect(BROKER)
    yield connection
    await connection.close()


@pytest.fixture
async def names(amqp: AbstractConnection) -> AsyncIterator[Names]:
    made = Names(f"tidings-test-{uuid.uuid4().hex[:10]}")
    yield made
    queues = [made.inbound_queue, f"{made.inbound_queue}.dead", *made.queues]
    exchanges = [made.exchange, made.inbound_exchange, made.dead_letter_exchange]
    for kind, name in [("queue", q) for q in queues] + [("exchange", e) for e in exchanges]:
        channel = await amqp.channel()  # a failed delete closes its channel: one each
        try:
            if kind == "queue":
                await channel.queue_delete(name)
            else:
                await channel.exchange_delete(name)
        except Exception:  # it was never declared
            pass
        finally:
            if not channel.is_closed:
                await channel.close()


@pytest.fixture
def servers(names: Names, tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start tidings nodes relaying to ``names``; overrides as in ``make_server``."""
    started: list[RunningServer] = []

    def start(url: str = BROKER, **overrides: Any) -> RunningServer:
        settings = make_settings(tmp_path, **{**names.settings(url), **overrides})
        node = RunningServer(settings).start()
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in reversed(started):
            node.stop()


relay_status = partial(brokers.relay_status, relay="amqp")
until_connected = partial(brokers.until_connected, relay="amqp")


async def collect(
    queue: AbstractQueue, done: Callable[[list[AbstractIncomingMessage]], bool]
) -> list[AbstractIncomingMessage]:
    """Consume (and ack) ``queue`` until ``done(received)``."""
    received: list[AbstractIncomingMessage] = []
    async with asyncio.timeout(DEADLINE), queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            received.append(message)
            if done(received):
                return received
    raise AssertionError("the queue iterator ended")


async def counter_until(
    client: httpx.AsyncClient, minimum: float, name: str, **labels: str
) -> float:
    deadline = time.monotonic() + DEADLINE
    while (value := await counter(client, name, **labels)) < minimum:
        assert time.monotonic() < deadline, f"{name}{labels} stayed at {value}"
        await asyncio.sleep(0.05)
    return value


async def send_inbound(
    amqp: AbstractConnection, exchange: str, messages: list[tuple[str, aio_pika.Message]]
) -> None:
    """Publish to ``exchange`` with publisher confirms, as a worker would."""
    channel = await amqp.channel(publisher_confirms=True)
    target = await channel.get_exchange(exchange)
    for start in range(0, len(messages), 500):
        chunk = messages[start : start + 500]
        await asyncio.gather(*(target.publish(m, key) for key, m in chunk))
    await channel.close()


# -- outbound ------------------------------------------------------------------------------------


@pytest.mark.parametrize("one_write", [True, False], ids=["one-write", "basic-publish"])
async def test_http_publish_reaches_a_bound_queue_with_cursor_routing_key_and_headers(
    servers: Callable[..., RunningServer],
    names: Names,
    amqp: AbstractConnection,
    one_write: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_amqp, "ONE_WRITE", one_write)
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(
        names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(names.queue("orders"), durable=True)
    await queue.bind(exchange, "orders.#")
    node = servers()
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as client:
        await until_connected(client)
        before = time.time()
        cursor = await publish(client, "orders/42/status", {"state": "paid"},
                               params={"type": "order.paid"})  # fmt: skip
        await publish(client, "other/1", {"not": "bound"})  # unroutable: counted, not retried
        text = await client.post("/channels/orders/7", content=b"hi",
                                 headers={"content-type": "text/plain"})  # fmt: skip
        assert text.status_code == 201
        [first, second] = await collect(queue, lambda got: len(got) == 2)
        assert first.message_id == cursor
        assert first.routing_key == "orders.42.status"
        assert first.headers == {CURSOR_PROPERTY: cursor, "tidings-channel": "orders/42/status"}
        assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert (first.type, first.content_type, first.app_id) == (
            "order.paid", "application/json", "tidings"
        )  # fmt: skip
        assert orjson.loads(first.body) == {"state": "paid"}
        assert first.timestamp is not None
        assert int(before) <= first.timestamp.timestamp() <= time.time()
        assert (second.routing_key, second.body) == ("orders.7", b"hi")
        assert second.content_type == "text/plain"
        assert second.message_id == text.json()["id"]
        status = await relay_status(client)
        assert status["unroutable"] == 1


async def test_healthz_shows_the_relay_connected_with_its_confirmed_cursor(
    servers: Callable[..., RunningServer],
) -> None:
    node = servers()
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as client:
        status = await until_connected(client)
        assert status["cursor"] is not None
        Cursor.parse(status["cursor"])
        assert "error" not in status  # /healthz is public: errors name hosts
        cursor = await publish(client, "health/1", {"n": 1})
        deadline = time.monotonic() + DEADLINE
        while (status := await relay_status(client))["cursor"] != cursor:
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.05)
        assert status["connected"] is True and status["lag"] == 0.0
        assert await counter(client, "tidings_relay_connected", relay="amqp") == 1.0


async def test_events_published_while_the_broker_path_is_cut_all_arrive_in_order(
    servers: Callable[..., RunningServer], names: Names, amqp: AbstractConnection
) -> None:
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(
        names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(names.queue("fault"), durable=True)
    await queue.bind(exchange, "fault.#")  # declared first: it buffers through the cuts
    proxy = TCPProxy(HOST, PORT).start()
    try:
        node = servers(url=f"amqp://guest:guest@{proxy.address}/")
        async with httpx.AsyncClient(base_url=node.url, timeout=10) as client:
            await until_connected(client)
            published: dict[str, list[str]] = {}  # channel -> cursors in publish order
            bodies: dict[str, bytes] = {}
            total = 900
            for i in range(total):
                if i in (150, 500):
                    proxy.cut()
                elif i in (320, 720):
                    proxy.heal()
                name = f"fault/{i % 3}"
                cursor = await publish(client, name, {"i": i})
                published.setdefault(name, []).append(cursor)
                bodies[cursor] = orjson.dumps({"i": i})
                if i % 10 == 0:
                    await asyncio.sleep(0.01)  # spread the publishes over the cuts
            assert proxy.cuts == 2
            received = await collect(queue, lambda got: len({m.message_id for m in got}) >= total)
            first: dict[str, AbstractIncomingMessage] = {}
            for message in received:
                assert message.message_id is not None
                if message.message_id in first:  # a resend: the very same message again
                    assert message.body == first[message.message_id].body
                    assert message.routing_key == first[message.message_id].routing_key
                else:
                    first[message.message_id] = message
            for name, cursors in published.items():
                key = name.replace("/", ".")
                in_order = [m.message_id for m in first.values() if m.routing_key == key]
                assert in_order == cursors, f"{name}: broker order differs from publish order"
            assert all(first[c].body == bodies[c] for c in bodies)
            status = await until_connected(client)  # both directions are back
            assert status["cursor"] == published["fault/2"][-1]  # total - 1 ≡ 2 (mod 3)
    finally:
        proxy.stop()


async def test_an_idle_relay_notices_a_lost_broker_and_reconnects_by_itself(
    servers: Callable[..., RunningServer],
) -> None:
    proxy = TCPProxy(HOST, PORT).start()
    try:
        node = servers(url=f"amqp://guest:guest@{proxy.address}/")
        async with httpx.AsyncClient(base_url=node.url, timeout=10) as client:
            await until_connected(client)
            proxy.cut()  # no event is published: nothing but the loss itself can tell
            deadline = time.monotonic() + DEADLINE
            while (status := await relay_status(client))["outbound"]:
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.02)
            assert status["connected"] is False
            proxy.heal()
            status = await until_connected(client)
            assert status["outbound"] is True and status["inbound"] is True
    finally:
        proxy.stop()


async def test_the_relay_redeclares_its_exchange_after_a_channel_error(
    servers: Callable[..., RunningServer], names: Names, amqp: AbstractConnection
) -> None:
    node = servers()
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as client:
        await until_connected(client)
        channel = await amqp.channel()
        await channel.exchange_delete(names.exchange)  # publishing there is now a 404
        lost = await publish(client, "gone/1", {"n": 1})
        deadline = time.monotonic() + DEADLINE
        while (await relay_status(client))["cursor"] != lost:  # sent again, once redeclared
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        exchange = await channel.get_exchange(names.exchange)  # it exists again
        queue = await channel.declare_queue(names.queue("again"), durable=True)
        await queue.bind(exchange, "gone.#")
        cursor = await publish(client, "gone/2", {"n": 2})
        [message] = await collect(queue, lambda got: len(got) == 1)
        assert message.message_id == cursor


# -- inbound -------------------------------------------------------------------------------------


async def test_messages_published_to_the_inbound_exchange_become_events(
    servers: Callable[..., RunningServer], names: Names, amqp: AbstractConnection
) -> None:
    node = servers()
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as client:
        await until_connected(client)  # the relay declared and bound its queue
        with SSEClient(node.url, "sensors/**") as sse:
            await send_inbound(amqp, names.inbound_exchange, [
                ("sensors.7.temp", aio_pika.Message(
                    b'{"c": 21.5}', content_type="application/json", type="reading",
                    message_id=str(uuid.uuid4()))),
                ("anything", aio_pika.Message(
                    b"v1.2 up", content_type="text/plain", headers={
                        "tidings-channel": "sensors/v1.2"})),
            ])  # fmt: skip
            streamed = await asyncio.to_thread(sse.events, 2)
        events = await history_until(client, "sensors/**", 2)
        reading, text = events
        assert (reading["channel"], reading["type"]) == ("sensors/7/temp", "reading")
        assert reading["datacontenttype"] == "application/json"
        assert reading["data"] == {"c": 21.5}
        Cursor.parse(reading["id"])
        assert (text["channel"], text["type"], text["data"]) == ("sensors/v1.2", "message",
                                                                  "v1.2 up")  # fmt: skip
        assert [e.id for e in streamed] == [reading["id"], text["id"]]
        assert await counter(client, "tidings_relay_events_total",
                             relay="amqp", direction="in") == 2  # fmt: skip


async def test_one_publish_makes_one_event_when_inbound_overlaps_outbound(
    servers: Callable[..., RunningServer], names: Names, amqp: AbstractConnection
) -> None:
    node = servers()
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as client:
        await until_connected(client)
        channel = await amqp.channel()
        inbound = await channel.get_queue(names.inbound_queue)
        await inbound.bind(names.exchange, "#")  # everything relayed out comes back in
        await publish(client, "loop/a", {"from": "http"})
        await counter_until(client, 1, "tidings_relay_dropped_messages_total",
                            relay="amqp", reason="relayed")  # fmt: skip
        await send_inbound(amqp, names.inbound_exchange,
                           [("loop.b", aio_pika.Message(b'{"from": "amqp"}'))])  # fmt: skip
        await counter_until(client, 2, "tidings_relay_dropped_messages_total",
                            relay="amqp", reason="relayed")  # fmt: skip
        events = await history(client, "loop/**")
        assert [(e["channel"], e["data"]) for e in events] == [
            ("loop/a", {"from": "http"}), ("loop/b", {"from": "amqp"})
        ]  # fmt: skip


async def test_bad_inbound_messages_are_dead_lettered_with_the_reason(
    servers: Callable[..., RunningServer], names: Names, amqp: AbstractConnection
) -> None:
    node = servers(http_max_event_bytes=1024, amqp_inbound_publish=("in/**",))
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as client:
        await until_connected(client)
        bad = {
            "invalid_event": ("in.json", aio_pika.Message(
                b"\xff\xfe not utf-8", content_type="application/json", message_id="m1",
                user_id="guest", expiration=60)),
            "too_large": ("in.big", aio_pika.Message(b"x" * 2000, message_id="m2")),
            "invalid_channel": ("in..empty", aio_pika.Message(b"{}", message_id="m3")),
            "forbidden": ("other.x", aio_pika.Message(b"{}", message_id="m4")),
        }  # fmt: skip
        await send_inbound(amqp, names.inbound_exchange, list(bad.values()))
        await send_inbound(amqp, names.inbound_exchange, [
            ("in.ok", aio_pika.Message(b'{"ok": true}', content_type="application/json"))
        ])  # fmt: skip
        [good] = await history_until(client, "**", 1)
        assert (good["channel"], good["data"]) == ("in/ok", {"ok": True})
        channel = await amqp.channel()
        dead = await channel.get_queue(f"{names.inbound_queue}.dead")
        kept = await collect(dead, lambda got: len(got) == len(bad))
        by_reason = {m.headers["tidings-reason"]: m for m in kept}
        assert set(by_reason) == set(bad)
        for reason, (key, sent) in bad.items():
            copy = by_reason[reason]
            assert (copy.routing_key, copy.body, copy.message_id) == (
                key,
                sent.body,
                sent.message_id,
            )
            assert copy.headers["tidings-exchange"] == names.inbound_exchange
            assert isinstance(copy.headers["tidings-detail"], str | bytes)
            assert await counter(client, "tidings_relay_dropped_messages_total",
                                 relay="amqp", reason=reason) == 1  # fmt: skip
        assert by_reason["invalid_event"].content_type == "application/json"
        assert "not valid JSON" in str(by_reason["invalid_event"].headers["tidings-detail"])
        assert by_reason["invalid_event"].expiration is None
        assert await history(client, "**") == [good]  # nothing else got in
        assert (await relay_status(client))["connected"] is True  # the relay did not flinch
        queue = await channel.declare_queue(names.inbound_queue, passive=True)
        assert queue.declaration_result.message_count == 0


# -- ack only after the event is durable ---------------------------------------------------------


def serve(db: Path, tmp_path: Path, environ: dict[str, str]) -> Serve:
    """``tidings serve --amqp`` as a process, for kill -9; not waited for."""
    return Serve(db, tmp_path, "--grpc-port", "0", "--amqp", BROKER, env=environ, wait=False)


async def prefill(amqp: AbstractConnection, names: Names, key: str, total: int) -> None:
    """Queue ``total`` messages for the relay before it runs, declaring its queue as it does,
    so a stop or kill can land while most of them are still waiting."""
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(
        names.inbound_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(
        names.inbound_queue,
        durable=True,
        arguments={"x-dead-letter-exchange": names.dead_letter_exchange},
    )
    await queue.bind(exchange, "#")
    await channel.close()
    await send_inbound(amqp, names.inbound_exchange, [
        (key, aio_pika.Message(orjson.dumps({"i": i}), message_id=f"m{i}",
                               content_type="application/json"))
        for i in range(total)
    ])  # fmt: skip


async def first_event(url: str, pattern: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        deadline = time.monotonic() + DEADLINE
        while True:
            with contextlib.suppress(httpx.TransportError):  # a process may not listen yet
                page = await client.get("/history", params={"channel": pattern})
                if page.json()["events"]:
                    return
            assert time.monotonic() < deadline, "nothing arrived"
            await asyncio.sleep(0.005)


async def waiting(amqp: AbstractConnection, queue: str) -> int:
    """Messages ready in ``queue`` once the broker has requeued a dead consumer's unacked."""
    channel = await amqp.channel()
    deadline = time.monotonic() + 5
    while True:
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count or 0
        if count > 0 or time.monotonic() > deadline:
            await channel.close()
            return count
        await asyncio.sleep(0.05)


async def test_inbound_messages_survive_kill_9_exactly_once(
    names: Names, amqp: AbstractConnection, tmp_path: Path
) -> None:
    total = 5000
    await prefill(amqp, names, "crash.c", total)
    db = tmp_path / "relay.db"
    environ = {**names.environ(), "TIDINGS_AMQP_PREFETCH": "8"}  # small steps: a kill lands
    processes = [serve(db, tmp_path, environ)]
    try:
        await first_event(processes[0].url, "crash/c")
        processes[0].kill()  # mid-stream: some published and acked, some published only
        assert await waiting(amqp, names.inbound_queue) > 0, "the kill came too late"
        processes.append(serve(db, tmp_path, names.environ()))
        await until_serving(processes[1], "amqp")
        async with httpx.AsyncClient(base_url=processes[1].url, timeout=10) as client:
            await history_until(client, "crash/c", total)
            await asyncio.sleep(0.5)  # a straggler would show up now
            events = await history(client, "crash/c")
        seen = [e["data"]["i"] for e in events]
        assert sorted(seen) == list(range(total)), "lost or duplicated inbound messages"
        assert seen == list(range(total)), "inbound order changed"
    finally:
        for process in processes:
            process.kill()


async def test_stopping_the_server_requeues_the_messages_it_has_not_published(
    servers: Callable[..., RunningServer], names: Names, amqp: AbstractConnection
) -> None:
    total = 5000
    await prefill(amqp, names, "stop.c", total)
    first = servers(amqp_prefetch=8)
    await first_event(first.url, "stop/c")
    await asyncio.to_thread(first.stop)  # the hub refuses (Unavailable) while it drains
    assert await waiting(amqp, names.inbound_queue) > 0, "the stop came too late"
    second = servers()
    async with httpx.AsyncClient(base_url=second.url, timeout=10) as client:
        await history_until(client, "stop/c", total)
        await asyncio.sleep(0.5)
        events = await history(client, "stop/c")
        assert [e["data"]["i"] for e in events] == list(range(total))
