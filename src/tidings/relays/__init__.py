"""Relays to real brokers (MQTT, AMQP): tidings is a well-behaved client of the broker, never a
broker itself (docs/relays.md).

Rules:
- Outbound, a relay is a durable consumer of the log: it reads the events after its cursor
  (``relay:<name>`` in the log's consumer table) whose channel matches its patterns, hands them
  to the broker in order, and moves the cursor only once the broker has confirmed them (MQTT
  PUBACK, AMQP publisher confirm). A broker that goes away is reconnected with backoff and
  jitter, and delivery resumes from the cursor: nothing is lost, and what is sent twice carries
  the same cursor (at-least-once).
- Inbound, each broker message becomes one publish, checked like any other (channel, type,
  content type, size) and against the relay's own grant (which channels the broker may write).
- A message a relay sent out carries its cursor (``CURSOR_PROPERTY``); inbound drops such
  messages, so overlapping patterns never loop an event back in.
- The system channels (``_tidings/...``) go out only to a relay whose patterns name them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from ..auth import Grant
from ..backoff import Backoff
from ..events import Event, Pattern, make_draft, parse_patterns
from ..exceptions import (
    BadRequest,
    Forbidden,
    InvalidChannel,
    InvalidEvent,
    PayloadTooLarge,
    TidingsError,
)
from ..hub import Hub
from ..log import Log
from ..metrics import Metrics

logger = logging.getLogger("tidings.relays")

WARN_EVERY = 60.0  # seconds between warnings of one kind of dropped message
IDLE_POLL = 1.0  # an idle relay also looks at the log this often (commits on other nodes)
LAZY_SAVE = 60.0  # seconds between stores of a cursor moved past other channels' events only
CURSOR_PROPERTY = "tidings-cursor"  # MQTT 5 user property / AMQP header on relayed messages

# Why an inbound message was refused for good: the metric label, and the AMQP dead letter's
# ``tidings-reason`` header. Any other refusal (Unavailable: stopping) is not the message's fault.
REASONS: tuple[tuple[type[TidingsError], str], ...] = (
    (PayloadTooLarge, "too_large"),
    (InvalidChannel, "invalid_channel"),
    (InvalidEvent, "invalid_event"),
    (Forbidden, "forbidden"),
    (BadRequest, "invalid"),
)


def refusal_reason(exc: TidingsError) -> str | None:
    """The reason (``REASONS``) for a refusal, or None when it is not the message's fault."""
    return next((reason for kind, reason in REASONS if isinstance(exc, kind)), None)


class Link(Protocol):
    """One connection to a broker, open for the life of its context manager."""

    async def send(self, events: Sequence[Event]) -> None:
        """Publish ``events`` in order; return once the broker confirmed every one. Raise (any
        exception) when the connection fails or the broker refuses: the relay reconnects and
        sends again from its cursor."""
        ...


Connect = Callable[[], AbstractAsyncContextManager[Link]]


class Relay(Protocol):
    """A relay as the server runs it (``relays.mqtt.MQTTRelay``, ``relays.amqp.AMQPRelay``)."""

    name: str

    async def run(self, stopping: asyncio.Event) -> None:
        """Relay in both configured directions until ``stopping``; never raises for a broker
        that is down (it reconnects)."""
        ...

    async def status(self) -> dict[str, object]:
        """For ``/healthz`` and ``tidings status``: at least ``connected`` (bool), ``cursor``
        (the outbound cursor, or None), ``lag`` (seconds, see ``OutboundRelay.lag``) and
        ``error`` (why the last connection failed, or None); a relay may add its own keys."""
        ...


BACKENDS = {
    "mqtt": "tidings.relays.mqtt:MQTTRelay",
    "amqp": "tidings.relays.amqp:AMQPRelay",
}


class OutboundRelay:
    """Moves events from the log to one broker connection, from a stored cursor on."""

    def __init__(
        self,
        name: str,
        log: Log,
        connect: Connect,
        patterns: tuple[Pattern, ...],
        metrics: Metrics,
        *,
        batch: int = 256,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.log = log
        self.connect = connect
        self.patterns = patterns
        self.metrics = metrics
        self.batch = batch
        self.backoff = backoff or Backoff(initial=0.2, cap=30.0)
        self.clock = clock
        self.connected = False
        self.cursor = 0
        self.error: str | None = None  # why the last connection ended
        self._wake = asyncio.Event()
        self._sending: float | None = None  # time of the oldest event being sent
        self._saved = 0  # the cursor as stored
        self._saved_at = 0.0  # monotonic time of the last store

    @property
    def consumer(self) -> str:
        return f"relay:{self.name}"

    def wake(self) -> None:
        """New events may be there (called from the log's commit listener)."""
        self._wake.set()

    def listen(self, events: Sequence[Event]) -> None:
        """A commit listener: wake when an event for this relay was committed."""
        if any(p.matches(e.channel) for e in events for p in self.patterns):
            self._wake.set()

    async def lag(self) -> float:
        """Seconds since the oldest event not yet confirmed by the broker was published."""
        now = self.clock()
        if self._sending is not None:
            return max(0.0, now - self._sending)
        waiting = await self.log.read(self.cursor, self.patterns, 1)
        return max(0.0, now - waiting[0].time) if waiting else 0.0

    async def run(self, stopping: asyncio.Event) -> None:
        """Relay until ``stopping``; a new relay starts with the events published from now."""
        loaded = False
        while not stopping.is_set():
            try:
                if not loaded:  # in the loop: a log that fails here is retried, not fatal
                    stored = await self.log.get_consumer(self.consumer)
                    if stored is None:
                        stored = await self.log.head()
                        await self.log.set_consumer(self.consumer, stored)
                    self.cursor, self._saved, loaded = stored, stored, True
                async with self.connect() as link:
                    self.connected, self.error = True, None
                    self.metrics.relay_connected.labels(self.name).set(1)
                    logger.info("relay %s: connected", self.name)
                    await self._pump(link, stopping)
            except Exception as exc:  # the broker's library raises its own kinds: all mean retry
                self.error = f"{type(exc).__name__}: {exc}"[:300]
                logger.warning("relay %s: %s; reconnecting", self.name, self.error)
            finally:
                self.connected = False
                self._sending = None
                self.metrics.relay_connected.labels(self.name).set(0)
            if not stopping.is_set():
                await sleep_unless(stopping, self.backoff.next())

    async def _pump(self, link: Link, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self._wake.clear()
            low = await self.log.low()
            if self.cursor < low:
                lost = low - self.cursor
                logger.error(
                    "relay %s: events %d-%d were removed by retention before they were relayed",
                    self.name, self.cursor + 1, low,
                )  # fmt: skip
                self.metrics.relay_lost.labels(self.name).inc(lost)
                self.cursor = low
                await self.log.set_consumer(self.consumer, low)
            head = await self.log.head()
            events = await self.log.read(self.cursor, self.patterns, self.batch)
            if events:
                self._sending = events[0].time
                await link.send(events)
                self._sending = None
                self.backoff.reset()  # a confirmed batch: the connection works
                self.metrics.relay_events.labels(self.name, "out").inc(len(events))
            if len(events) < self.batch:
                # Nothing else for this relay through ``head``: move past the other channels'
                # events too, so reads start near the head and retention of those is no loss.
                await self._move(max(head, events[-1].seq if events else 0), lazy=not events)
                if not events:
                    await wait_either(self._wake, stopping, IDLE_POLL)
            else:
                await self._move(events[-1].seq, lazy=False)

    async def _move(self, cursor: int, lazy: bool) -> None:
        """Set the cursor; store it now, or when ``lazy`` (only other channels' events were
        passed) at most every ``LAZY_SAVE`` seconds."""
        if cursor <= self.cursor:
            return
        self.cursor = cursor
        now = time.monotonic()
        if not lazy or now - self._saved_at >= LAZY_SAVE:
            await self.log.set_consumer(self.consumer, cursor)
            self._saved, self._saved_at = cursor, now


class Ingest:
    """Turns inbound broker messages into publishes, under the relay's own grant."""

    def __init__(self, hub: Hub, name: str, publish: Sequence[str], max_bytes: int) -> None:
        self.hub = hub
        self.name = name
        self.grant = Grant(f"relay:{name}", (), parse_patterns(publish) if publish else ())
        self.max_bytes = max_bytes
        self._warned: dict[str, tuple[float, int]] = {}  # reason -> (last warning, quiet since)

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        content_type: str | None = None,
        type: str | None = None,
        idempotency_key: str | None = None,
    ) -> Event:
        """Publish one inbound message; raises the BadRequest or Forbidden that refuses it
        (its ``detail`` is the reason to log or dead-letter), or Unavailable when shutting
        down (not the message's fault: redeliver it later)."""
        if len(data) > self.max_bytes:
            raise PayloadTooLarge(
                f"message is {len(data)} bytes; the limit is {self.max_bytes} "
                "(http.max_event_bytes)"
            )
        draft = make_draft(channel, data, content_type=content_type, type=type,
                           idempotency_key=idempotency_key)  # fmt: skip
        self.grant.check_publish(draft.channel)
        [appended] = await self.hub.publish([draft])
        self.hub.metrics.relay_events.labels(self.name, "in").inc()
        return appended.event

    def dropped(self, reason: str, detail: str) -> None:
        """Count and log a message refused for good (``reason`` is a short metric label:
        too_large, invalid_channel, invalid_event, forbidden, invalid). One warning per reason
        per ``WARN_EVERY`` seconds, so a device flooding bad input cannot flood the log."""
        self.hub.metrics.relay_dropped.labels(self.name, reason).inc()
        now = time.monotonic()
        last, quiet = self._warned.get(reason, (-WARN_EVERY, 0))
        if now - last < WARN_EVERY:
            self._warned[reason] = (last, quiet + 1)
            return
        more = f" ({quiet} more since the last warning)" if quiet else ""
        logger.warning("relay %s: message dropped (%s): %s%s", self.name, reason, detail, more)
        self._warned[reason] = (now, 0)

    def skipped(self, detail: str) -> None:
        """Count a message this or another tidings relay sent out (it carries
        ``CURSOR_PROPERTY``): not an error, but an overlap worth seeing in the metrics."""
        self.hub.metrics.relay_dropped.labels(self.name, "relayed").inc()
        logger.debug("relay %s: skipped a message relayed out by tidings: %s", self.name, detail)


async def wait_either(event: asyncio.Event, stopping: asyncio.Event, seconds: float) -> None:
    """Wait until ``event`` or ``stopping`` is set, or ``seconds`` have passed."""
    waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stopping.wait())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def sleep_unless(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stopping`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stopping.wait()
