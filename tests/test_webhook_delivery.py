"""Webhook delivery as a durable consumer of the log, to a real local HTTP receiver."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from tidings.events import Event, make_draft
from tidings.log.memory import MemoryLog
from tidings.webhooks.delivery import Attempt, Endpoint, EndpointWorker, HttpSender
from tidings.webhooks.policy import Health, HealthState, Schedule
from tidings.webhooks.signing import generate_secret, parse_secret, sign
from tidings.webhooks.ssrf import AddressPolicy, safe_client

FAST = Schedule((0, 0.01, 0.01, 0.01), jitter=0)
TIMEOUT = 10


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP/1.1 server on 127.0.0.1 that records requests; ``answers`` scripts replies."""

    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    delay: float = 0.0
    requests: list[Received] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")[1:]
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(Received(headers, body))
                await asyncio.sleep(self.delay)
                status, extra = self.answers.pop(0) if self.answers else (200, {})
                extra_lines = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-length: 2\r\n{extra_lines}\r\nok".encode()
                )
                await writer.drain()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[Receiver]:
    server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
    receiver.port = server.sockets[0].getsockname()[1]
    async with server:
        yield receiver


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not predicate():  # noqa: ASYNC110 - a condition of another component
            await asyncio.sleep(0.01)


@pytest.fixture
async def log() -> AsyncIterator[MemoryLog]:
    store = MemoryLog()
    await store.open()
    yield store
    await store.close()


async def publish(log: MemoryLog, channel: str, count: int, type: str = "made") -> list[Event]:
    drafts = [make_draft(channel, orjson.dumps({"n": i}), type=type) for i in range(count)]
    return [a.event for a in await log.append(drafts)]


@dataclass
class Run:
    worker: EndpointWorker
    attempts: list[Attempt]
    health: list[HealthState]
    failed: list[str]


@contextlib.asynccontextmanager
async def delivering(
    log: MemoryLog, endpoint: Endpoint, schedule: Schedule = FAST, disable_after: float = 3600
) -> AsyncIterator[Run]:
    attempts: list[Attempt] = []
    health: list[HealthState] = []
    failed: list[str] = []
    async with httpx.AsyncClient(follow_redirects=False) as client:
        worker = EndpointWorker(
            endpoint,
            log,
            HttpSender(client),
            schedule=schedule,
            disable_after=disable_after,
            on_attempt=attempts.append,
            on_health=lambda _e, state: health.append(state),
            on_failed=lambda _e, event: failed.append(event.cursor),
        )
        log.listen(lambda _events: worker.wake())
        task = asyncio.create_task(worker.run(start=0))
        try:
            yield Run(worker, attempts, health, failed)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def endpoint(url: str, **kwargs: Any) -> Endpoint:
    secret = kwargs.pop("secret", generate_secret())
    return Endpoint(id="ep1", url=url, channels=("orders/**",), secrets=(secret,), **kwargs)


async def test_every_matching_event_is_delivered_signed_with_its_cursor(log: MemoryLog) -> None:
    secret = generate_secret()
    async with receiving(Receiver()) as receiver:
        hook = endpoint(receiver.url, secret=secret, strict_order=True)
        events = await publish(log, "orders/1", 3)
        await publish(log, "users/1", 2)  # not for this endpoint
        async with delivering(log, hook) as run:
            await until(lambda: len(receiver.requests) == 3)
            await until(lambda: run.worker.cursor == events[-1].seq)
    assert [r.headers["webhook-id"] for r in receiver.requests] == [e.cursor for e in events]
    for request, event in zip(receiver.requests, events, strict=True):
        assert request.body == event.json()  # the same envelope as every transport
        stamp = int(request.headers["webhook-timestamp"])
        expected = sign(parse_secret(secret), event.cursor, stamp, request.body)
        assert request.headers["webhook-signature"] == expected
    assert await log.get_consumer("webhook:ep1") == events[-1].seq


async def test_failures_are_retried_with_the_same_id_until_a_2xx(log: MemoryLog) -> None:
    script = [(500, {}), (429, {"retry-after": "0"}), (301, {"location": "http://x/"}), (200, {})]
    async with receiving(Receiver(answers=script)) as receiver:
        [event] = await publish(log, "orders/1", 1)
        async with delivering(log, endpoint(receiver.url)) as run:
            await until(lambda: run.worker.cursor == event.seq)
    assert [r.headers["webhook-id"] for r in receiver.requests] == [event.cursor] * 4
    assert [a.status for a in run.attempts] == [500, 429, 301, 200]
    assert "redirect" in run.attempts[2].outcome.reason
    assert [s.health for s in run.health] == [Health.FAILING, Health.HEALTHY]


async def test_after_the_last_attempt_the_event_is_failed_and_the_cursor_moves_on(
    log: MemoryLog,
) -> None:
    async with receiving(Receiver(answers=[(503, {})] * 4)) as receiver:
        first, second = await publish(log, "orders/1", 2)
        async with delivering(log, endpoint(receiver.url, strict_order=True)) as run:
            await until(lambda: run.worker.cursor == second.seq)
    assert run.failed == [first.cursor]
    assert [r.headers["webhook-id"] for r in receiver.requests] == [first.cursor] * 4 + [
        second.cursor
    ]


async def test_410_gone_disables_the_endpoint_and_nothing_more_is_sent(log: MemoryLog) -> None:
    async with receiving(Receiver(answers=[(410, {})])) as receiver:
        events = await publish(log, "orders/1", 3)
        async with delivering(log, endpoint(receiver.url, strict_order=True)) as run:
            await until(lambda: run.worker.disabled)
            await asyncio.sleep(0.1)
    assert len(receiver.requests) == 1
    assert run.health[-1].health is Health.DISABLED and "410" in (run.health[-1].reason or "")
    assert await log.get_consumer("webhook:ep1") == 0  # nothing counted as delivered
    assert events


async def test_timeouts_fail_the_attempt(log: MemoryLog) -> None:
    async with receiving(Receiver(delay=0.5)) as receiver:
        [event] = await publish(log, "orders/1", 1)
        hook = endpoint(receiver.url, timeout=0.1)
        async with delivering(log, hook, schedule=Schedule((0,), jitter=0)) as run:
            await until(lambda: run.worker.cursor == event.seq)
    assert run.attempts[0].error == "timeout" and run.attempts[0].outcome.slow
    assert run.failed == [event.cursor]


async def test_a_crash_mid_delivery_resends_from_the_stored_cursor(log: MemoryLog) -> None:
    async with receiving(Receiver(delay=0.2)) as receiver:
        events = await publish(log, "orders/1", 4)
        hook = endpoint(receiver.url, strict_order=True)
        async with delivering(log, hook) as run:
            await until(lambda: run.worker.cursor >= events[1].seq)
        # Cancelled mid-delivery, as a kill would: a new worker resumes from the stored cursor.
        stored = await log.get_consumer("webhook:ep1")
        assert stored is not None and stored < events[-1].seq
        receiver.delay = 0
        async with delivering(log, hook) as run:
            await until(lambda: run.worker.cursor == events[-1].seq)
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert set(ids) == {e.cursor for e in events}  # every event at least once
    assert ids == sorted(ids, key=lambda c: int(c.split(":")[1]))  # in order, repeats adjacent


async def test_event_type_filters(log: MemoryLog) -> None:
    async with receiving(Receiver()) as receiver:
        await publish(log, "orders/1", 2, type="noise")
        wanted = await publish(log, "orders/1", 1, type="paid")
        async with delivering(log, endpoint(receiver.url, types=("paid",))) as run:
            await until(lambda: run.worker.cursor == wanted[0].seq)
    assert [r.headers["webhook-id"] for r in receiver.requests] == [wanted[0].cursor]


async def test_an_endpoint_the_ssrf_policy_refuses_is_a_failed_attempt(log: MemoryLog) -> None:
    async with receiving(Receiver()) as receiver:
        [event] = await publish(log, "orders/1", 1)
        failed: list[str] = []
        attempts: list[Attempt] = []
        async with safe_client(AddressPolicy(allow_http=True), 5) as client:
            worker = EndpointWorker(
                endpoint(receiver.url),
                log,
                HttpSender(client),
                schedule=Schedule((0,), jitter=0),
                disable_after=3600,
                on_attempt=attempts.append,
                on_failed=lambda _e, ev: failed.append(ev.cursor),
            )
            task = asyncio.create_task(worker.run(start=0))
            await until(lambda: worker.cursor == event.seq)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert receiver.requests == []  # nothing reached the loopback receiver
    assert failed == [event.cursor]
    assert attempts[0].error is not None and "loopback" in attempts[0].error
