"""Webhook delivery as a durable consumer of the log, to a real local HTTP receiver."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import orjson
import pytest

from tidings.events import Event, make_draft
from tidings.log.memory import MemoryLog
from tidings.webhooks.delivery import (
    Attempt,
    Endpoint,
    EndpointWorker,
    HttpSender,
    Retry,
    Secret,
)
from tidings.webhooks.policy import Health, HealthState, Schedule
from tidings.webhooks.signing import generate_secret, parse_secret, sign
from tidings.webhooks.ssrf import AddressPolicy, safe_session

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
    """A Reporter that keeps everything in memory, and the worker reporting to it."""

    log: MemoryLog
    worker: EndpointWorker | None = None
    attempts: list[Attempt] = field(default_factory=list)
    health: list[HealthState] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stored: dict[int, Retry] = field(default_factory=dict)
    handed: list[Retry] = field(default_factory=list)
    lost_ranges: list[tuple[int, int]] = field(default_factory=list)

    async def retries(self, endpoint: str) -> list[Retry]:
        return list(self.stored.values())

    async def retrying(self, endpoint: Endpoint, retry: Retry) -> None:
        self.stored[retry.seq] = retry
        self.handed.append(retry)

    async def settled(
        self, endpoint: Endpoint, seq: int, attempts: int, failure: str | None
    ) -> None:
        self.stored.pop(seq, None)
        if failure is not None:
            self.failed.append(f"{self.log.epoch}:{seq}")

    async def attempted(self, attempt: Attempt) -> None:
        self.attempts.append(attempt)

    async def health_changed(self, endpoint: Endpoint, before: HealthState) -> None:
        self.health.append(endpoint.health)

    async def lost(self, endpoint: Endpoint, after: int, low: int) -> None:
        self.lost_ranges.append((after, low))

    @property
    def running(self) -> EndpointWorker:
        assert self.worker is not None
        return self.worker


@contextlib.asynccontextmanager
async def delivering(
    log: MemoryLog,
    endpoint: Endpoint,
    schedule: Schedule = FAST,
    disable_after: float = 3600,
    run: Run | None = None,
    session: aiohttp.ClientSession | None = None,
) -> AsyncIterator[Run]:
    run = Run(log) if run is None else run
    async with contextlib.AsyncExitStack() as stack:
        if session is None:
            session = await stack.enter_async_context(aiohttp.ClientSession())
        worker = run.worker = EndpointWorker(
            endpoint, log, HttpSender(session), run, schedule=schedule, disable_after=disable_after
        )
        log.listen(lambda _events: worker.wake())
        task = asyncio.create_task(worker.run(start=0))
        try:
            yield run
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def endpoint(url: str, **kwargs: Any) -> Endpoint:
    if "secrets" not in kwargs:
        kwargs["secrets"] = (Secret(kwargs.pop("secret", generate_secret()), 0.0),)
    return Endpoint(id="ep1", url=url, channels=("orders/**",), **kwargs)


async def test_every_matching_event_is_delivered_signed_with_its_cursor(log: MemoryLog) -> None:
    secret = generate_secret()
    async with receiving(Receiver()) as receiver:
        hook = endpoint(receiver.url, secret=secret, strict_order=True)
        events = await publish(log, "orders/1", 3)
        await publish(log, "users/1", 2)  # not for this endpoint
        async with delivering(log, hook) as run:
            await until(lambda: len(receiver.requests) == 3)
            await until(lambda: run.running.cursor == 5)  # past users/1's: nothing there for it
    assert [r.headers["webhook-id"] for r in receiver.requests] == [e.cursor for e in events]
    for request, event in zip(receiver.requests, events, strict=True):
        assert request.body == event.json()  # the same envelope as every transport
        stamp = int(request.headers["webhook-timestamp"])
        expected = sign(parse_secret(secret), event.cursor, stamp, request.body)
        assert request.headers["webhook-signature"] == expected
    assert await log.get_consumer("webhook:ep1") == 5


async def test_failures_are_retried_with_the_same_id_until_a_2xx(log: MemoryLog) -> None:
    script = [(500, {}), (429, {"retry-after": "0"}), (301, {"location": "http://x/"}), (200, {})]
    async with receiving(Receiver(answers=script)) as receiver:
        [event] = await publish(log, "orders/1", 1)
        async with delivering(log, endpoint(receiver.url)) as run:
            await until(lambda: len(run.attempts) == 4 and not run.stored)
    assert [r.number for r in run.handed] == [1, 2, 3]  # each retry stored before its wait
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
            await until(lambda: run.running.cursor == second.seq)
    assert run.failed == [first.cursor]
    assert [r.headers["webhook-id"] for r in receiver.requests] == [first.cursor] * 4 + [
        second.cursor
    ]


async def test_410_gone_disables_the_endpoint_and_nothing_more_is_sent(log: MemoryLog) -> None:
    async with receiving(Receiver(answers=[(410, {})])) as receiver:
        events = await publish(log, "orders/1", 3)
        async with delivering(log, endpoint(receiver.url, strict_order=True)) as run:
            await until(lambda: run.running.disabled)
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
            await until(lambda: run.running.cursor == event.seq)
    assert run.attempts[0].error == "timeout" and run.attempts[0].outcome.slow
    assert run.failed == [event.cursor]


async def test_a_crash_mid_delivery_resends_from_the_stored_cursor(log: MemoryLog) -> None:
    async with receiving(Receiver(delay=0.2)) as receiver:
        events = await publish(log, "orders/1", 4)
        hook = endpoint(receiver.url, strict_order=True)
        async with delivering(log, hook) as run:
            await until(lambda: run.running.cursor >= events[1].seq)
        # Cancelled mid-delivery, as a kill would: a new worker resumes from the stored cursor.
        stored = await log.get_consumer("webhook:ep1")
        assert stored is not None and stored < events[-1].seq
        receiver.delay = 0
        async with delivering(log, hook) as run:
            await until(lambda: run.running.cursor == events[-1].seq)
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert set(ids) == {e.cursor for e in events}  # every event at least once
    assert ids == sorted(ids, key=lambda c: int(c.split(":")[1]))  # in order, repeats adjacent


async def test_event_type_filters(log: MemoryLog) -> None:
    async with receiving(Receiver()) as receiver:
        await publish(log, "orders/1", 2, type="noise")
        wanted = await publish(log, "orders/1", 1, type="paid")
        async with delivering(log, endpoint(receiver.url, types=("paid",))) as run:
            await until(lambda: run.running.cursor == wanted[0].seq)
    assert [r.headers["webhook-id"] for r in receiver.requests] == [wanted[0].cursor]


async def test_an_endpoint_the_ssrf_policy_refuses_is_a_failed_attempt(log: MemoryLog) -> None:
    async with receiving(Receiver()) as receiver:
        [event] = await publish(log, "orders/1", 1)
        once = Schedule((0,), jitter=0)
        async with (
            safe_session(AddressPolicy(allow_http=True), 5) as session,
            delivering(log, endpoint(receiver.url), once, session=session) as run,
        ):
            await until(lambda: run.running.cursor == event.seq)
    assert receiver.requests == []  # nothing reached the loopback receiver
    assert run.failed == [event.cursor]
    assert run.attempts[0].error is not None and "loopback" in run.attempts[0].error


async def test_a_failing_event_waits_for_its_retry_without_holding_back_the_others(
    log: MemoryLog,
) -> None:
    async with receiving(Receiver(answers=[(500, {})])) as receiver:
        first, *rest = await publish(log, "orders/1", 3)
        hook = endpoint(receiver.url)
        slow = Schedule((0, 3600), jitter=0)
        async with delivering(log, hook, slow) as run:
            await until(lambda: run.running.cursor == rest[-1].seq and len(run.attempts) == 3)
            [retry] = run.stored.values()
            assert retry.seq == first.seq and retry.number == 1
            assert run.running.lag(run.attempts[-1].time + 10) >= 10  # the waiting event
        # A restart resumes the stored retry: due in the past, so it goes at once.
        run.stored[first.seq] = replace(retry, due=0)
        async with delivering(log, hook, slow, run=run) as run:
            await until(lambda: not run.stored)
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert sorted(ids) == sorted([first.cursor] * 2 + [e.cursor for e in rest])
    assert ids[-1] == first.cursor and run.failed == []


async def test_strict_order_holds_the_cursor_through_retries_and_resumes_them(
    log: MemoryLog,
) -> None:
    async with receiving(Receiver(answers=[(500, {})])) as receiver:
        first, second = await publish(log, "orders/1", 2)
        hook = endpoint(receiver.url, strict_order=True)
        slow = Schedule((0, 3600), jitter=0)
        async with delivering(log, hook, slow) as run:
            await until(lambda: bool(run.stored))
            await asyncio.sleep(0.05)
            assert run.running.cursor == 0 and len(receiver.requests) == 1
        run.stored[first.seq] = replace(run.stored[first.seq], due=0)
        async with delivering(log, hook, slow, run=run) as run:
            await until(lambda: run.running.cursor == second.seq)
    assert [r.headers["webhook-id"] for r in receiver.requests] == [
        first.cursor,
        first.cursor,
        second.cursor,
    ]
    assert run.attempts[-2].number == 1  # the stored attempt number carried over the restart


async def test_events_removed_by_retention_before_delivery_are_reported_lost() -> None:
    log = MemoryLog(max_events=2)
    await log.open()
    try:
        async with receiving(Receiver()) as receiver:
            events = await publish(log, "orders/1", 5)
            await log.trim()
            async with delivering(log, endpoint(receiver.url)) as run:
                await until(lambda: run.running.cursor == events[-1].seq)
        assert run.lost_ranges == [(0, events[2].seq)]
        assert [r.headers["webhook-id"] for r in receiver.requests] == [
            e.cursor for e in events[3:]
        ]
    finally:
        await log.close()


async def test_a_rotated_out_secret_signs_until_it_expires(log: MemoryLog) -> None:
    old, new, expired = generate_secret(), generate_secret(), generate_secret()
    secrets = (Secret(new, 2.0), Secret(old, 1.0, expires=2e9), Secret(expired, 0.0, expires=1.0))
    async with receiving(Receiver()) as receiver:
        [event] = await publish(log, "orders/1", 1)
        async with delivering(log, endpoint(receiver.url, secrets=secrets)) as run:
            await until(lambda: run.running.cursor == event.seq)
    request = receiver.requests[0]
    stamp = int(request.headers["webhook-timestamp"])
    expected = [sign(parse_secret(s), event.cursor, stamp, request.body) for s in (new, old)]
    assert request.headers["webhook-signature"] == " ".join(expected)


async def test_the_rate_limit_spaces_attempts(log: MemoryLog) -> None:
    async with receiving(Receiver()) as receiver:
        events = await publish(log, "orders/1", 5)
        hook = endpoint(receiver.url, rate_limit=20.0, concurrency=8)
        async with delivering(log, hook) as run:
            await until(lambda: run.running.cursor == events[-1].seq)
    starts = sorted(a.time for a in run.attempts)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.04  # 1/20 s apart, less scheduling slack


async def test_retention_of_other_channels_events_is_no_loss() -> None:
    log = MemoryLog(max_events=2)
    await log.open()
    try:
        async with (
            receiving(Receiver()) as receiver,
            delivering(log, endpoint(receiver.url)) as run,
        ):
            for seq in range(1, 6):  # not this endpoint's: it reads past them
                await publish(log, "users/1", 1)
                await until(lambda seq=seq: run.running.cursor == seq)
            assert await log.low() == 3  # retention removed 1-3 (the memory log, at once)
            [event] = await publish(log, "orders/1", 1)
            await until(lambda: run.running.cursor == event.seq)
        assert run.lost_ranges == []
        assert [r.headers["webhook-id"] for r in receiver.requests] == [event.cursor]
        assert receiver.requests[0].headers["user-agent"].startswith("tidings-webhooks/")
    finally:
        await log.close()
