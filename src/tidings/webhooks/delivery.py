"""Webhook delivery: each endpoint is a durable consumer of the log (docs/webhooks.md).

Rules:
- An endpoint reads history after its own cursor, stored in the log's consumer table as
  ``webhook:<endpoint id>``. An event counts as done for the endpoint when a 2xx acknowledged it
  or its last attempt failed; the stored cursor moves only past events that are all done, so a
  crash or ``kill -9`` loses nothing: after a restart delivery resumes from the cursor, and an
  event in flight at the crash is sent again (at-least-once) with the same ``webhook-id``.
- At most ``concurrency`` events of one endpoint are in flight (1 with ``strict_order``: each
  event waits for the one before it, retries included). Reading ahead stops at that bound.
- Each attempt is signed afresh (``webhook-timestamp`` is the attempt's time); ``webhook-id``
  is the event's cursor on every attempt.
- The worker of an endpoint is woken by the log's commit listener, so new events go out at
  once; a worker with nothing to do waits without polling.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import httpx

from ..events import Event, Pattern, parse_patterns
from ..exceptions import TidingsError
from ..log import Log
from .policy import Health, HealthState, Outcome, Schedule, Verdict, judge
from .signing import parse_secret, webhook_headers

log = logging.getLogger("tidings.webhooks")

RESPONSE_HEAD = 1024  # bytes of a response body kept in the attempt log


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One registered receiver."""

    id: str
    url: str
    channels: tuple[str, ...]
    secrets: tuple[str, ...]  # whsec_…; the first is current, the others still sign (rotation)
    types: tuple[str, ...] = ()  # empty: every type
    headers: tuple[tuple[str, str], ...] = ()
    concurrency: int = 4
    strict_order: bool = False
    timeout: float = 15.0
    health: HealthState = field(default_factory=HealthState)

    @property
    def consumer(self) -> str:
        return f"webhook:{self.id}"

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return parse_patterns(self.channels)

    def wants(self, event: Event) -> bool:
        return not self.types or event.type in self.types


@dataclass(frozen=True, slots=True)
class Response:
    """What one attempt got: a status, or a transport error (``timeout`` for a timeout)."""

    status: int | None
    error: str | None = None
    retry_after: str | None = None
    head: bytes = b""  # the first RESPONSE_HEAD bytes of the body


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt, for the attempt log."""

    endpoint: str
    event: str  # the cursor
    number: int  # 0-based
    time: float
    duration: float
    status: int | None
    error: str | None
    response: bytes
    outcome: Outcome


class Sender(Protocol):
    async def __call__(
        self, url: str, body: bytes, headers: dict[str, str], seconds: float
    ) -> Response: ...


Sleep = Callable[[float], Awaitable[None]]


class EndpointWorker:
    """Delivers the events of one endpoint, from its stored cursor on."""

    def __init__(
        self,
        endpoint: Endpoint,
        log: Log,
        send: Sender,
        *,
        schedule: Schedule,
        disable_after: float,
        on_attempt: Callable[[Attempt], None] = lambda attempt: None,
        on_health: Callable[[Endpoint, HealthState], None] = lambda endpoint, state: None,
        on_failed: Callable[[Endpoint, Event], None] = lambda endpoint, event: None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.endpoint = endpoint
        self.log = log
        self.send = send
        self.schedule = schedule
        self.disable_after = disable_after
        self.on_attempt = on_attempt
        self.on_health = on_health
        self.on_failed = on_failed
        self.sleep = sleep
        self.clock = clock
        self.jitter = jitter
        self._wake = asyncio.Event()
        self._pending: set[int] = set()  # events read and not done yet
        self._read = 0  # the last event read (and handed out or skipped)
        self.cursor = 0  # the stored cursor: every matching event up to it is done

    @property
    def disabled(self) -> bool:
        return self.endpoint.health.health is Health.DISABLED

    def wake(self) -> None:
        """New events may be there (called from the log's commit listener)."""
        self._wake.set()

    async def run(self, start: int) -> None:
        """Deliver until cancelled; ``start`` is where a new endpoint begins (its creation)."""
        endpoint = self.endpoint
        stored = await self.log.get_consumer(endpoint.consumer)
        if stored is None:
            stored = start
            await self.log.set_consumer(endpoint.consumer, stored)
        self.cursor = self._read = read_after = stored
        width = 1 if endpoint.strict_order else max(1, endpoint.concurrency)
        slots = asyncio.Semaphore(width)
        patterns = endpoint.patterns
        async with asyncio.TaskGroup() as tasks:
            while not self.disabled:
                self._wake.clear()
                page = await self.log.read(read_after, patterns, width * 4)
                if not page:
                    await self._wake.wait()
                    continue
                for event in page:
                    await slots.acquire()
                    if self.disabled:  # while this waited for a slot
                        slots.release()
                        break
                    read_after = self._read = event.seq
                    self._pending.add(event.seq)
                    if endpoint.wants(event):
                        tasks.create_task(self._deliver(event, slots))
                    else:
                        slots.release()
                        await self._finish(event.seq)

    async def _deliver(self, event: Event, slots: asyncio.Semaphore) -> None:
        try:
            done = await self._attempts(event)
        finally:
            slots.release()
        if done:
            await self._finish(event.seq)

    async def _attempts(self, event: Event) -> bool:
        """Attempt ``event`` until it is delivered or failed (True), or the endpoint is
        disabled (False: not done; it goes again from the cursor once re-enabled)."""
        body = event.json()
        number = 0
        while True:
            endpoint = self.endpoint
            secrets = [parse_secret(s) for s in endpoint.secrets]
            started = self.clock()
            headers = dict(endpoint.headers)
            headers.update(webhook_headers(secrets, event.cursor, int(started), body))
            headers["content-type"] = "application/json"
            response = await self.send(endpoint.url, body, headers, endpoint.timeout)
            finished = self.clock()
            outcome = judge(response.status, response.error, response.retry_after, finished)
            self.on_attempt(
                Attempt(
                    endpoint.id,
                    event.cursor,
                    number,
                    started,
                    finished - started,
                    response.status,
                    response.error,
                    response.head[:RESPONSE_HEAD],
                    outcome,
                )
            )
            self._health(outcome, finished)
            if outcome.verdict is Verdict.DELIVERED:
                return True
            if outcome.verdict is Verdict.GONE or self.disabled:
                return False
            delay = self.schedule.next_delay(number, outcome, self.jitter)
            if delay is None:
                self.on_failed(endpoint, event)
                return True
            number += 1
            await self.sleep(delay)

    def _health(self, outcome: Outcome, now: float) -> None:
        before = self.endpoint.health
        after = before.after(outcome, now, self.disable_after)
        if after == before:
            return
        self.endpoint = replace(self.endpoint, health=after)
        if after.health is not before.health:  # a transition, not a new reason
            self.on_health(self.endpoint, after)
            if after.health is Health.DISABLED:
                self._wake.set()  # the reading loop notices and stops

    async def _finish(self, seq: int) -> None:
        """``seq`` is done: store the cursor up to the oldest event still in flight."""
        self._pending.discard(seq)
        cursor = min(self._pending) - 1 if self._pending else self._read
        if cursor > self.cursor:
            self.cursor = cursor
            await self.log.set_consumer(self.endpoint.consumer, cursor)


class HttpSender:
    """Sends attempts with an httpx client (``ssrf.safe_client`` in production: redirects are
    never followed, and only checked addresses are connected to)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def __call__(
        self, url: str, body: bytes, headers: dict[str, str], seconds: float
    ) -> Response:
        try:
            request = self.client.stream("POST", url, content=body, headers=headers,
                                         timeout=seconds)  # fmt: skip
            async with request as answer:
                head = b""
                async for chunk in answer.aiter_raw():
                    head += chunk
                    if len(head) >= RESPONSE_HEAD:
                        break
                return Response(answer.status_code, None, answer.headers.get("retry-after"), head)
        except httpx.TimeoutException:
            return Response(None, "timeout")
        except httpx.HTTPError as exc:
            return Response(None, f"{type(exc).__name__}: {exc}"[:300])
        except TidingsError as exc:  # ssrf.BlockedAddress, InvalidEndpoint: a failed attempt
            return Response(None, f"{exc.code}: {exc.detail}"[:300])
