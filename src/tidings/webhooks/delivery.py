"""Webhook delivery: each endpoint is a durable consumer of the log (docs/webhooks.md).

Rules:
- An endpoint reads history after its own cursor, stored in the log's consumer table as
  ``webhook:<endpoint id>``. The cursor moves past an event once the event is *settled*
  (delivered by a 2xx, or failed after its last attempt) or *handed to the retry table* (its
  next attempt and due time stored by the ``Reporter`` before the cursor moves). So a crash or
  ``kill -9`` loses nothing: after a restart delivery resumes from the cursor and the stored
  retries; an event in flight at the crash is sent again (at-least-once) with the same
  ``webhook-id``.
- At most ``concurrency`` attempts of one endpoint are in flight. An event waiting for a retry
  holds no slot, so one failing event does not stop the others; at most ``max_retrying`` wait
  at once, then reading stops until some settle. With ``strict_order`` one event is in flight
  and the next waits for it, retries included (its cursor holds until it settles).
- Each attempt is signed afresh (``webhook-timestamp`` is the attempt's time) with every secret
  still valid (rotation); ``webhook-id`` is the event's cursor on every attempt.
- The cursor is written behind: one write at a time, each taking the newest position, so a
  fast endpoint costs one log write per batch of deliveries, not one per event.
- The worker is woken by the log's commit listener, so new events go out at once; a worker
  with nothing to do waits without polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import aiohttp

from .. import __version__
from ..events import Event, Pattern, parse_patterns
from ..exceptions import TidingsError
from ..log import Log
from .policy import Health, HealthState, Outcome, Schedule, Verdict, judge
from .signing import parse_secret, webhook_headers

logger = logging.getLogger("tidings.webhooks")

RESPONSE_HEAD = 1024  # bytes of a response body kept in the attempt log
MAX_RETRYING = 1000  # events of one endpoint waiting for a retry before reading stops
IDLE_TICK = 1.0  # an idle worker moves its read position to the head this often
LAZY_SAVE = 60.0  # and stores a cursor moved that way at most this often

USER_AGENT = f"tidings-webhooks/{__version__} (+https://www.standardwebhooks.com/)"

Trigger = Literal["delivery", "replay"]


@dataclass(frozen=True, slots=True)
class Secret:
    """A signing secret (``whsec_…``); a rotated-out one signs until ``expires``."""

    value: str
    created: float
    expires: float | None = None

    def live(self, now: float) -> bool:
        return self.expires is None or now < self.expires


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One registered receiver."""

    id: str
    url: str
    channels: tuple[str, ...]
    secrets: tuple[Secret, ...]  # the first is current; the others sign until they expire
    types: tuple[str, ...] = ()  # empty: every type
    headers: tuple[tuple[str, str], ...] = ()
    description: str = ""
    rate_limit: float = 0.0  # attempts per second; 0: no limit
    concurrency: int = 4
    strict_order: bool = False
    timeout: float = 15.0
    health: HealthState = field(default_factory=HealthState)
    created: float = 0.0
    updated: float = 0.0

    @property
    def consumer(self) -> str:
        return f"webhook:{self.id}"

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return parse_patterns(self.channels)

    @property
    def enabled(self) -> bool:
        return self.health.health is not Health.DISABLED

    def wants(self, event: Event) -> bool:
        return not self.types or event.type in self.types

    def keys(self, now: float) -> list[bytes]:
        """The secrets that sign a request at ``now`` (the current one always)."""
        current, *older = self.secrets
        return [parse_secret(current.value)] + [parse_secret(s.value) for s in older if s.live(now)]


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
    seq: int
    number: int  # 0-based
    time: float
    duration: float
    status: int | None
    error: str | None
    response: bytes
    outcome: Outcome
    trigger: Trigger = "delivery"


@dataclass(frozen=True, slots=True)
class Retry:
    """An event waiting for attempt ``number`` (0-based), due at ``due`` (unix seconds)."""

    seq: int
    number: int
    due: float


class Sender(Protocol):
    async def __call__(
        self, url: str, body: bytes, headers: dict[str, str], seconds: float
    ) -> Response: ...


class Reporter(Protocol):
    """Where a worker keeps what must outlive it, and tells what happened (webhooks.service)."""

    async def retries(self, endpoint: str) -> list[Retry]:
        """The stored retries of ``endpoint`` (to resume after a restart)."""
        ...

    async def retrying(self, endpoint: Endpoint, retry: Retry) -> None:
        """Store ``retry``; the cursor moves past its event only after this returns."""
        ...

    async def settled(
        self, endpoint: Endpoint, seq: int, attempts: int, failure: str | None
    ) -> None:
        """Event ``seq`` is delivered (``failure`` None) or failed for good after ``attempts``
        attempts; drop its stored retry if it had one (a failure, or more than one attempt)."""
        ...

    async def attempted(self, attempt: Attempt) -> None: ...

    async def health_changed(self, endpoint: Endpoint, before: HealthState) -> None: ...

    async def lost(self, endpoint: Endpoint, after: int, low: int) -> None:
        """Events ``(after, low]`` were removed by retention before this endpoint got them."""
        ...


Sleep = Callable[[float], Awaitable[None]]


class EndpointWorker:
    """Delivers the events of one endpoint, from its stored cursor on."""

    def __init__(
        self,
        endpoint: Endpoint,
        log: Log,
        send: Sender,
        reporter: Reporter,
        *,
        schedule: Schedule,
        disable_after: float,
        max_retrying: int = MAX_RETRYING,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.endpoint = endpoint  # the service swaps in edits (url, headers, secrets, rate)
        self.log = log
        self.send = send
        self.reporter = reporter
        self.schedule = schedule
        self.disable_after = disable_after
        self.max_retrying = max_retrying
        self.sleep = sleep
        self.clock = clock
        self.jitter = jitter
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(1)
        self._pending: dict[int, float] = {}  # read, not settled: seq -> event time
        self._retrying: dict[int, float] = {}  # handed to the retry table: seq -> event time
        self._read = 0  # the last event read (handed out or skipped)
        self.cursor = 0  # every matching event up to here is settled or in the retry table
        self._saved = 0
        self._saved_at = 0.0  # monotonic time of the last cursor write
        self.loaded = False  # the stored cursor has been read (``cursor`` is meaningful)
        self._saving: asyncio.Task[None] | None = None
        self._tasks: asyncio.TaskGroup | None = None  # set while running
        self._jobs: set[asyncio.Task[None]] = set()  # its tasks, to cancel on disable
        self._paced = 0.0  # rate limit: when the next attempt may start (monotonic)

    @property
    def disabled(self) -> bool:
        return not self.endpoint.enabled

    def wake(self) -> None:
        """New events may be there (called from the log's commit listener)."""
        self._wake.set()

    def lag(self, now: float) -> float:
        """Seconds since the oldest event read and not yet delivered or failed was published."""
        oldest = min((*self._pending.values(), *self._retrying.values()), default=None)
        return 0.0 if oldest is None else max(0.0, now - oldest)

    async def run(self, start: int) -> None:
        """Deliver until cancelled or disabled; ``start`` is where a new endpoint begins."""
        endpoint = self.endpoint
        stored = await self.log.get_consumer(endpoint.consumer)
        if stored is None:
            stored = start
            await self.log.set_consumer(endpoint.consumer, stored)
        self.cursor = self._saved = self._read = stored
        self.loaded = True
        waiting = {r.seq: r for r in await self.reporter.retries(endpoint.id)}
        width = 1 if endpoint.strict_order else max(1, endpoint.concurrency)
        self._slots = asyncio.Semaphore(width)
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                for retry in sorted(waiting.values(), key=lambda r: r.seq):
                    if retry.seq <= stored:  # handed over before the cursor moved past it
                        del waiting[retry.seq]
                        self._spawn(self._resume(retry))
                await self._read_loop(waiting, width)
                for task in list(self._jobs):
                    task.cancel()  # disabled: whatever is in flight goes again once enabled
        finally:
            self._tasks = None
            if self._saved < self.cursor:
                await self.log.set_consumer(endpoint.consumer, self.cursor)
                self._saved = self.cursor

    async def _read_loop(self, waiting: dict[int, Retry], width: int) -> None:
        patterns = self.endpoint.patterns
        read_after = self._read
        while not self.disabled:
            self._wake.clear()
            if len(self._retrying) >= self.max_retrying:
                await self._wake.wait()  # a retry that settles wakes this
                continue
            low = await self.log.low()
            if read_after < low:
                await self.reporter.lost(self.endpoint, read_after, low)
                read_after = self._read = low
                self._advance()
            head = await self.log.head()
            page = await self.log.read(read_after, patterns, width * 4)
            if not page:
                # Nothing for this endpoint through ``head``; and while no wake comes, nothing
                # after it either (every matching commit wakes the worker before its append
                # returns). So the read position follows the head: retention that trims
                # other channels' events past it is no loss to report.
                while True:
                    read_after = self._read = max(read_after, head)
                    self._advance(lazy=True)
                    if await self._woken(IDLE_TICK):
                        break
                    head = await self.log.head()
                continue
            for event in page:
                await self._slots.acquire()
                if self.disabled:  # while this waited for a slot
                    self._slots.release()
                    return
                read_after = self._read = event.seq
                if self.endpoint.wants(event):
                    self._pending[event.seq] = event.time
                    self._spawn(self._deliver(event, waiting.pop(event.seq, None), True))
                else:
                    self._slots.release()
                    self._advance()

    def _spawn(self, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        assert self._tasks is not None
        task = self._tasks.create_task(job)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return task

    async def _woken(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a wake; whether one came."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        return self._wake.is_set()

    async def _resume(self, retry: Retry) -> None:
        """A retry stored before a restart: fetch its event and carry on where it was."""
        page = await self.log.read(retry.seq - 1, None, 1)
        if not page or page[0].seq != retry.seq:
            reason = "removed from history by retention before it could be delivered"
            await self.reporter.settled(self.endpoint, retry.seq, retry.number, reason)
            return
        event = page[0]
        self._retrying[event.seq] = event.time
        await self._deliver(event, retry, False)

    async def _deliver(self, event: Event, retry: Retry | None, held: bool) -> None:
        """Attempt ``event`` until it settles or the endpoint is disabled. ``held``: the caller
        took a slot for the first attempt; ``retry``: where a stored retry left off."""
        seq = event.seq
        number, due = (retry.number, retry.due) if retry is not None else (0, None)
        strict = self.endpoint.strict_order
        try:
            while True:
                if due is not None:
                    if not strict:  # a waiting event holds no slot, and not the cursor
                        if held:
                            self._slots.release()
                            held = False
                        if seq in self._pending:
                            self._retrying[seq] = self._pending.pop(seq)
                            self._advance()
                    await self.sleep(max(0.0, due - self.clock()))
                if not held:
                    await self._slots.acquire()
                    held = True
                outcome = await self.attempt(event, number)
                if outcome.verdict is Verdict.DELIVERED:
                    return await self._settle(seq, number + 1, None)
                if outcome.verdict is Verdict.GONE or self.disabled:
                    return  # not settled: it goes again from the cursor once re-enabled
                delay = self.schedule.next_delay(number, outcome, self.jitter)
                if delay is None:
                    return await self._settle(seq, number + 1, outcome.reason)
                number += 1
                due = self.clock() + delay
                await self.reporter.retrying(self.endpoint, Retry(seq, number, due))
        finally:
            if held:
                self._slots.release()

    async def attempt(self, event: Event, number: int, trigger: Trigger = "delivery") -> Outcome:
        """One signed attempt of ``event``: reported, and judged into the endpoint's health."""
        await self._pace()
        endpoint = self.endpoint
        body = event.json()
        started = self.clock()
        headers = {name.lower(): value for name, value in endpoint.headers}  # ours win below
        headers.update(webhook_headers(endpoint.keys(started), event.cursor, int(started), body))
        headers["content-type"] = "application/json"
        headers["user-agent"] = USER_AGENT
        headers["accept-encoding"] = "identity"  # the attempt log keeps the body's first bytes
        response = await self.send(endpoint.url, body, headers, endpoint.timeout)
        finished = self.clock()
        outcome = judge(response.status, response.error, response.retry_after, finished)
        attempt = Attempt(endpoint.id, event.cursor, event.seq, number, started,
                          finished - started, response.status, response.error,
                          response.head[:RESPONSE_HEAD], outcome, trigger)  # fmt: skip
        await self.reporter.attempted(attempt)
        await self._health(outcome, finished)
        return outcome

    async def _pace(self) -> None:
        rate = self.endpoint.rate_limit
        if rate <= 0:
            return
        now = time.monotonic()
        start = max(now, self._paced)
        self._paced = start + 1 / rate
        if start > now:
            await asyncio.sleep(start - now)

    async def _health(self, outcome: Outcome, now: float) -> None:
        before = self.endpoint.health
        after = before.after(outcome, now, self.disable_after)
        if after == before:
            return
        self.endpoint = replace(self.endpoint, health=after)
        if after.health is not before.health:  # a transition, not a new reason
            await self.reporter.health_changed(self.endpoint, before)
            if after.health is Health.DISABLED:
                self._wake.set()  # the reading loop notices and stops

    async def _settle(self, seq: int, attempts: int, failure: str | None) -> None:
        await self.reporter.settled(self.endpoint, seq, attempts, failure)
        if self._pending.pop(seq, None) is not None:
            self._advance()
        elif self._retrying.pop(seq, None) is not None:
            self._wake.set()  # reading may have stopped at max_retrying

    def _advance(self, lazy: bool = False) -> None:
        """Move the cursor up to the oldest event still pending, and write it behind (when
        ``lazy``, only if the last write is ``LAZY_SAVE`` old: an idle endpoint following the
        head needs no write per tick; a restart then reads a little more to find nothing)."""
        cursor = min(self._pending) - 1 if self._pending else self._read
        if cursor <= self.cursor:
            return
        self.cursor = cursor
        if lazy and time.monotonic() - self._saved_at < LAZY_SAVE:
            return
        if self._tasks is not None and (self._saving is None or self._saving.done()):
            self._saving = self._spawn(self._save())

    async def _save(self) -> None:
        while self._saved < self.cursor:
            cursor = self.cursor
            await self.log.set_consumer(self.endpoint.consumer, cursor)
            self._saved, self._saved_at = cursor, time.monotonic()


class HttpSender:
    """Sends attempts with an aiohttp session (``ssrf.safe_session`` in production: every URL
    is checked, and only checked addresses are connected to). Redirects are never followed."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def __call__(
        self, url: str, body: bytes, headers: dict[str, str], seconds: float
    ) -> Response:
        try:
            async with await self._post(url, body, headers, seconds) as answer:
                head = b""
                while len(head) < RESPONSE_HEAD:
                    chunk = await answer.content.read(RESPONSE_HEAD - len(head))
                    if not chunk:
                        break
                    head += chunk
                if not answer.content.at_eof():
                    answer.close()  # the body is left unread: the connection cannot be reused
                return Response(answer.status, None, answer.headers.get("retry-after"), head)
        except TimeoutError:  # aiohttp's ServerTimeoutError and ConnectionTimeoutError too
            return Response(None, "timeout")
        except aiohttp.ClientError as exc:
            return Response(None, f"{type(exc).__name__}: {exc}"[:300])
        except TidingsError as exc:  # ssrf.BlockedAddress, InvalidEndpoint: a failed attempt
            return Response(None, f"{exc.code}: {exc.detail}"[:300])
        except (UnicodeError, ValueError) as exc:  # a header aiohttp cannot encode, say
            return Response(None, f"cannot send the request: {exc}"[:300])

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str], seconds: float
    ) -> aiohttp.ClientResponse:
        """The response's status and headers; ``seconds`` bounds everything, the body too."""
        deadline = asyncio.get_running_loop().time() + seconds
        try:
            return await self._send(url, body, headers, seconds)
        except aiohttp.ServerDisconnectedError as exc:
            if not isinstance(exc.message, str):  # a partial response came before the close
                raise
        # A kept-alive connection the receiver closed as this request went out on it, before
        # any response byte (``message`` is then aiohttp's text). aiohttp retries that only for
        # idempotent methods. The request may have reached the receiver, but webhooks are
        # at-least-once anyway (same ``webhook-id``): send it once more. The pool has dropped
        # that connection; the retry gets another open one or a new one.
        left = deadline - asyncio.get_running_loop().time()
        return await self._send(url, body, headers, max(left, 0.001))

    async def _send(
        self, url: str, body: bytes, headers: dict[str, str], seconds: float
    ) -> aiohttp.ClientResponse:
        timeout = aiohttp.ClientTimeout(total=seconds)
        return await self.session.post(
            url, data=body, headers=headers, allow_redirects=False, timeout=timeout
        )
