"""The AMQP 0-9-1 relay (RabbitMQ, through aio-pika): every event out to a topic exchange with
publisher confirms; messages from a durable queue in, acknowledged once they are in the log.

Rules:
- Routing key = channel with ``/`` → ``.``; inbound the other way round. A ``.`` inside a
  channel segment (``orders/v1.2``) does not survive that round trip, so relayed messages also
  carry the exact channel in the ``tidings-channel`` header, and an inbound message with that
  header is published to it rather than to its mapped routing key.
- Outbound, ``send`` publishes a whole batch pipelined on one confirm-mode channel and returns
  once the broker confirmed every message; a nack or a lost connection raises, and the relay
  sends again from its cursor (each message's ``message_id`` is its cursor: receivers dedupe).
  Messages are ``mandatory``: one no queue is bound for comes back and is counted as
  unroutable (``status()["unroutable"]``), not retried. A topic exchange dropping what nobody
  subscribed to is normal pub/sub; retrying it would stall every later event behind it until a
  worker binds a queue. Operators who must keep such events give the exchange an
  ``alternate-exchange`` policy.
- Inbound, a message is acked only after ``Ingest.publish`` returned (the event is durable in
  the log). ``message_id`` is the idempotency key, so a message redelivered after a crash
  between publish and ack is not logged twice (within ``log.idempotency_window``).
- A message that can never be published (see ``relays.REASONS``) is not simply rejected: RabbitMQ's
  own dead-lettering (``x-death``) cannot say why. It is copied to the dead-letter exchange
  with ``tidings-reason`` (the metric label) and ``tidings-detail`` (the human reason) headers,
  the copy's publisher confirm is awaited, and only then is the original acked. A failure in
  between leaves the original unacked, so the broker redelivers it and it is judged again: a
  refused message is never lost, at worst dead-lettered twice. The queue keeps its
  ``x-dead-letter-exchange`` for what the broker itself dead-letters (TTL, length limits).
- When the hub refuses for its own reasons (shutting down, a log failure) the messages go
  back to the queue (nack, requeue) and the session ends; nothing is dead-lettered for it.
- A message carrying ``CURSOR_PROPERTY`` is one this relay sent out (overlapping bindings):
  acked and skipped, counted as dropped with reason ``relayed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from yarl import URL

from ..backoff import Backoff
from ..config import AMQPSettings
from ..events import Event, parse_patterns
from ..exceptions import (
    ConfigError,
    InvalidChannel,
    TidingsError,
    Unavailable,
)
from ..hub import Hub
from . import CURSOR_PROPERTY, Ingest, Link, OutboundRelay, refusal_reason, sleep_unless

logger = logging.getLogger("tidings.relays.amqp")

CHANNEL_HEADER = "tidings-channel"
REASON_HEADER = "tidings-reason"
DETAIL_HEADER = "tidings-detail"
APP_ID = "tidings"
PERSISTENT = 2  # delivery mode: the broker writes the message to disk (AMQP 0-9-1 §1.8.2)
CONNECT_TIMEOUT = 10.0  # seconds for TCP + AMQP handshake; a black-holed broker must not hang
CLOSE_TIMEOUT = 5.0
STOP_GRACE = 5.0  # an outbound batch in flight at shutdown gets this long for its confirms

# -- the pure part: mappings between events and AMQP messages ----------------------------------


def routing_key(channel: str) -> str:
    return channel.replace("/", ".")


def channel_of(routing_key: str, headers: dict[str, Any]) -> str:
    """The channel an inbound message publishes to: its ``tidings-channel`` header, else its
    routing key with ``.`` → ``/`` (validated later, by the publish)."""
    named = headers.get(CHANNEL_HEADER)
    if named is None:
        return routing_key.replace(".", "/")
    if isinstance(named, bytes):
        try:
            named = named.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidChannel(f"the {CHANNEL_HEADER} header is not UTF-8") from None
    if not isinstance(named, str):
        raise InvalidChannel(f"the {CHANNEL_HEADER} header must be a string")
    return named


def properties(event: Event) -> Basic.Properties:
    """The AMQP properties of an outbound event (built as pamqp's frame properties directly:
    ``aio_pika.Message`` would cost more than the rest of a publish)."""
    return Basic.Properties(
        content_type=event.content_type,
        delivery_mode=PERSISTENT,
        message_id=event.cursor,
        timestamp=datetime.fromtimestamp(event.time, UTC),  # AMQP: whole seconds
        message_type=event.type,
        app_id=APP_ID,
        headers={CURSOR_PROPERTY: event.cursor, CHANNEL_HEADER: event.channel},
    )


def reason_of(exc: TidingsError) -> str | None:
    """The dead-letter reason for a refusal, or None when it is not the message's fault."""
    return refusal_reason(exc)


def dead_letter_copy(
    message: AbstractIncomingMessage, reason: str, detail: str
) -> aio_pika.Message:
    """The refused message as kept on the dead-letter exchange: body and properties as they
    came, plus why. ``expiration`` is dropped (the copy would expire from the dead-letter queue)
    and so is ``user_id`` (RabbitMQ refuses one that is not the relay's own user)."""
    headers = dict(message.headers or {})
    headers[REASON_HEADER] = reason
    headers[DETAIL_HEADER] = detail[:1000]
    headers["tidings-exchange"] = message.exchange or ""
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


# -- connections ---------------------------------------------------------------------------------


class _CancelOnLoss:
    """Cancels the task inside it when the connection is lost, and turns that cancellation into
    ``ConnectionError`` on the way out: ``asyncio.timeout``'s mechanism, with a lost connection
    (or a shutdown that outlasted its grace) in place of a deadline.

    Why: ``OutboundRelay`` notices a dead link only when it next sends. Without this an idle
    relay would report itself connected after the broker went away and would reconnect only
    when the next event came, so ``/healthz`` would lie in both directions."""

    def __init__(self, lost: asyncio.Future[str]) -> None:
        self.lost = lost
        self.task: asyncio.Task[Any] | None = None
        self.fired = False

    async def __aenter__(self) -> None:
        self.task = asyncio.current_task()
        self.lost.add_done_callback(self._fire)

    def _fire(self, lost: asyncio.Future[str]) -> None:
        if self.task is not None and not self.fired:
            self.fired = True
            self.task.cancel()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.lost.remove_done_callback(self._fire)
        task, self.task = self.task, None
        if self.fired and kind is asyncio.CancelledError and task and task.uncancel() == 0:
            raise ConnectionError(self.lost.result()) from None


class _Connection(aio_pika.Connection):
    """A connection that closes itself when it fails to open. (aio-pika leaves a failed one
    to its ``__del__``, which schedules ``close()`` on whatever loop the collector runs on.)"""

    async def connect(self, timeout: float | int | None = None) -> None:  # noqa: ASYNC109
        try:
            await super().connect(timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.close()
            raise


def _watch(*senders: AbstractConnection | AbstractChannel) -> asyncio.Future[str]:
    """A future resolved with why, when any of ``senders`` (connection, channels) closes."""
    lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def closed(sender: object, exc: BaseException | None = None, *_: object) -> None:
        if not lost.done():
            why = f"{type(exc).__name__}: {exc}" if exc is not None else "closed"
            lost.set_result(f"broker connection lost ({why})"[:300])

    for sender in senders:
        sender.close_callbacks.add(closed)
    return lost


class _Outbound:
    """The outbound link: one confirm-mode channel on the relay's outbound connection."""

    def __init__(self, relay: AMQPRelay, channel: aiormq.Channel, exchange: str) -> None:
        self.relay = relay
        self.channel = channel
        self.exchange = exchange
        self.one_write = ONE_WRITE and _can_write_batches(channel)

    async def send(self, events: Sequence[Event]) -> None:
        if self.one_write:
            confirms = await self._publish_in_one_write(events)
        else:
            confirms = self._publish_each(events)
        results = await asyncio.gather(*confirms, return_exceptions=True)
        unroutable = 0
        for result in results:
            if isinstance(result, BaseException):
                raise result  # a nack (DeliveryError) or the connection failing: resend
            if not isinstance(result, Basic.Ack):
                unroutable += 1  # basic.return: no queue bound for this routing key
        if unroutable:
            self.relay.unroutable(unroutable, events)

    def _publish_each(self, events: Sequence[Event]) -> list[Awaitable[object]]:
        """aiormq's public path: one ``basic_publish`` each, all in flight at once. gather
        starts them in order and the channel lock is FIFO, so the broker gets them in log
        order; ``wait=False`` holds that lock only until a frame is queued, not written."""
        publish, exchange = self.channel.basic_publish, self.exchange
        return [
            asyncio.ensure_future(publish(e.data, exchange=exchange, routing_key=routing_key(
                e.channel), properties=properties(e), mandatory=True, wait=False))
            for e in events
        ]  # fmt: skip

    async def _publish_in_one_write(self, events: Sequence[Event]) -> list[Awaitable[object]]:
        """The whole batch as one socket write; returns the confirm futures to await.

        ``basic_publish`` costs a socket write per message, a third of the server's CPU in
        benchmarks/amqpbench.py. This does its bookkeeping for each message (delivery tag,
        confirmation future, message id for returns) under its lock, so acks, nacks, returns
        and a closing channel resolve these futures as they resolve its own, but sends every
        frame in one ``ChannelFrame``. Those attributes of ``aiormq.Channel`` are not documented
        API (they are the same in aiormq 6.8 and 7.x): ``_can_write_batches`` checks them once
        per link, and without them the link uses ``_publish_each``. Frames are built before the
        lock is taken, so a bad event fails before any tag is counted; a failure after that
        (the connection, a cancellation) ends the link, and its channel is never used again."""
        channel, exchange = self.channel, self.exchange
        frames: list[Any] = []
        for event in events:
            key, body = routing_key(event.channel), event.data
            frames.append(Basic.Publish(exchange=exchange, routing_key=key, mandatory=True))
            frames.append(ContentHeader(properties=properties(event), body_size=len(body)))
            frames.extend(channel._split_body(body))
        payload = ChannelFrame.marshall(channel_number=channel.number, frames=frames)
        confirms: list[Awaitable[object]] = []
        async with channel.lock:  # raises if the channel closed
            tags = channel.message_id_delivery_tag
            for event in events:
                channel.delivery_tag += 1
                tag = channel.delivery_tag
                confirm = channel.create_future()
                channel.confirmations[tag] = confirm
                tags[event.cursor] = tag  # how a basic.return finds its confirmation
                confirm.add_done_callback(partial(_forget, tags, event.cursor, tag))
                confirms.append(confirm)
            await channel.write_queue.put(payload)  # bounded: waits while the writer is behind
        return confirms


ONE_WRITE = True  # tests turn it off to cover the fallback


def _can_write_batches(channel: aiormq.Channel) -> bool:
    names = ("lock", "delivery_tag", "confirmations", "message_id_delivery_tag",
             "create_future", "_split_body", "write_queue", "number")  # fmt: skip
    return channel.publisher_confirms and all(hasattr(channel, n) for n in names)


def _forget(tags: dict[str, int], message_id: str, tag: int, _: object) -> None:
    if tags.get(message_id) == tag:
        del tags[message_id]


# -- the relay -----------------------------------------------------------------------------------


class AMQPRelay:
    """Relays events to and from RabbitMQ as ``[amqp]`` configures (docs/relays.md).

    Connections are plain ``aio_pika.connect``, not ``connect_robust``. The OutboundRelay
    already owns reconnection: it reconnects with backoff and resends from its durable cursor.
    A robust connection would reconnect underneath it on a schedule of its own, hide the loss
    from ``send`` (or fail it in ways that cannot be told apart), and replay declarations and
    consumers while the relay does the same. One owner per direction: the outbound loop in
    OutboundRelay, the inbound loop here, both with ``Backoff``.

    Each direction has its own connection, as RabbitMQ advises: the broker throttles a
    publishing connection under flow control or a resource alarm, and that must not stall
    the acks of the inbound consumer (or the other way round)."""

    name = "amqp"

    def __init__(self, hub: Hub, settings: AMQPSettings, max_event_bytes: int) -> None:
        if not settings.channels and not settings.inbound_queue:
            raise ConfigError(
                "amqp: nothing to relay: amqp.channels (outbound) and amqp.inbound_queue "
                "(inbound) are both empty"
            )
        self.hub = hub
        self.settings = settings
        self.outbound: OutboundRelay | None = None
        if settings.channels:
            self.outbound = OutboundRelay(
                self.name, hub.log, self._link, parse_patterns(settings.channels), hub.metrics
            )
            hub.log.listen(self.outbound.listen)
        self.ingest = Ingest(hub, self.name, settings.inbound_publish, max_event_bytes)
        self.inbound_connected = False
        self.inbound_error: str | None = None
        self._outbound_up = False  # the outbound link as this module sees it (not just opened)
        self._unroutable = 0
        self._unroutable_logged = 0.0
        self._stopping = asyncio.Event()
        url = URL(settings.url)  # errors and logs name the broker, never its password
        self._where = f"{url.scheme}://{url.host}:{url.port}{url.path}"

    async def run(self, stopping: asyncio.Event) -> None:
        self._stopping = stopping
        async with asyncio.TaskGroup() as tasks:
            if self.outbound is not None:
                tasks.create_task(_supervise("outbound", self.outbound.run, stopping))
            if self.settings.inbound_queue:
                tasks.create_task(_supervise("inbound", self._run_inbound, stopping))

    async def status(self) -> dict[str, object]:
        out = self.outbound
        up = [self._outbound_up] if out is not None else []
        if self.settings.inbound_queue:
            up.append(self.inbound_connected)
        errors = [f"outbound: {out.error}" if out and out.error else None,
                  f"inbound: {self.inbound_error}" if self.inbound_error else None]  # fmt: skip
        return {
            "connected": bool(up) and all(up),
            "cursor": f"{self.hub.log.epoch}:{out.cursor}" if out is not None else None,
            "lag": await out.lag() if out is not None else 0.0,
            "error": "; ".join(e for e in errors if e) or None,
            "outbound": self._outbound_up if out is not None else None,
            "inbound": self.inbound_connected if self.settings.inbound_queue else None,
            "unroutable": self._unroutable,
        }

    def unroutable(self, count: int, events: Sequence[Event]) -> None:
        self._unroutable += count
        now = time.monotonic()
        if now - self._unroutable_logged > 60:  # one line a minute, however many there are
            self._unroutable_logged = now
            logger.info(
                "relay amqp: %d event(s) had no queue bound on exchange %r (e.g. routing key %r); "
                "%d in all so far",
                count, self.settings.exchange, routing_key(events[0].channel), self._unroutable,
            )  # fmt: skip

    async def _connect(self, direction: str) -> AbstractConnection:
        """A plain connection, given up on when the server stops meanwhile."""
        attempt = asyncio.ensure_future(
            aio_pika.connect(
                self.settings.url,
                timeout=CONNECT_TIMEOUT,
                client_properties={"connection_name": f"tidings relay ({direction})"},
                connection_class=_Connection,
            )
        )
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([attempt, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not attempt.done():
            attempt.cancel()
            with contextlib.suppress(BaseException):
                await attempt
            raise ConnectionError("the server is stopping")
        try:
            return attempt.result()
        except Exception as exc:  # aiormq's kinds, StopAsyncIteration on an early EOF among them
            raise ConnectionError(
                f"cannot connect to {self._where}: {type(exc).__name__}: {exc}"
            ) from None

    # -- outbound: the Connect that OutboundRelay opens and reopens ------------------------------

    @contextlib.asynccontextmanager
    async def _link(self) -> AsyncIterator[Link]:
        connection = await self._connect("outbound")
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
            await channel.declare_exchange(
                self.settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            underlay = await channel.get_underlay_channel()
            if not isinstance(underlay, aiormq.Channel):  # aio-pika's channels are aiormq's
                raise TypeError(f"unexpected AMQP channel {underlay!r}")
            lost = _watch(connection, channel)
            grace = asyncio.ensure_future(self._stop_after_grace(lost))
            self._outbound_up = True
            try:
                async with _CancelOnLoss(lost):
                    yield _Outbound(self, underlay, self.settings.exchange)
            finally:
                self._outbound_up = False
                grace.cancel()
        finally:
            await _close(connection)

    async def _stop_after_grace(self, lost: asyncio.Future[str]) -> None:
        """At shutdown, end a send still waiting for confirms after ``STOP_GRACE``."""
        await self._stopping.wait()
        await asyncio.sleep(STOP_GRACE)
        if not lost.done():
            lost.set_result("the server is stopping")

    # -- inbound ---------------------------------------------------------------------------------

    async def _run_inbound(self, stopping: asyncio.Event) -> None:
        backoff = Backoff(initial=0.2, cap=30.0)
        while not stopping.is_set():
            try:
                await self._consume(stopping, backoff)
            except Exception as exc:  # aio-pika/aiormq raise their own kinds: all mean retry
                if stopping.is_set():
                    break
                self.inbound_error = f"{type(exc).__name__}: {exc}"[:300]
                logger.warning("relay amqp inbound: %s; reconnecting", self.inbound_error)
            finally:
                self.inbound_connected = False
            if not stopping.is_set():
                await sleep_unless(stopping, backoff.next())

    async def _consume(self, stopping: asyncio.Event, backoff: Backoff) -> None:
        """One inbound session: declare, consume, settle batches until stopping or a loss."""
        cfg = self.settings
        connection = await self._connect("inbound")
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
            await channel.set_qos(prefetch_count=cfg.prefetch)
            source = await channel.declare_exchange(
                cfg.inbound_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            dlx = await channel.declare_exchange(
                cfg.dead_letter_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            dead = await channel.declare_queue(f"{cfg.inbound_queue}.dead", durable=True)
            await dead.bind(dlx, "#")
            queue = await channel.declare_queue(
                cfg.inbound_queue,
                durable=True,
                arguments={"x-dead-letter-exchange": cfg.dead_letter_exchange},
            )
            await queue.bind(source, cfg.inbound_binding)
            lost = _watch(connection, channel)
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

            async def deliver(message: AbstractIncomingMessage) -> None:
                inbox.put_nowait(message)  # in delivery order: aiormq starts these FIFO

            await queue.consume(deliver)
            self.inbound_connected, self.inbound_error = True, None
            backoff.reset()
            logger.info("relay amqp inbound: consuming %r", cfg.inbound_queue)
            while True:
                first = await _next(inbox, lost, stopping)
                if first is None:
                    return  # stopping: the broker requeues whatever was delivered but unacked
                batch = [first]
                while not inbox.empty() and len(batch) < cfg.prefetch:
                    batch.append(inbox.get_nowait())
                await self._settle(batch, dlx)
        finally:
            await _close(connection)

    async def _settle(self, batch: list[AbstractIncomingMessage], dlx: AbstractExchange) -> None:
        """Publish a batch of inbound messages and ack, dead-letter or requeue each one."""
        # Concurrent publishes share the log's group commit; gather starts them in order and
        # each reaches Log.append before its first await, so the log keeps the queue's order.
        outcomes = await asyncio.gather(*map(self._publish, batch), return_exceptions=True)
        refused: list[tuple[AbstractIncomingMessage, str, str]] = []
        requeue: set[int] = set()
        failure: BaseException | None = None
        for message, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, TidingsError) and (reason := reason_of(outcome)):
                refused.append((message, reason, outcome.detail))
            elif isinstance(outcome, BaseException):  # not the message's fault: requeue it
                requeue.add(id(message))
                failure = failure or outcome
        if refused:
            # Dead-letter copies first, confirmed, and only then the acks below.
            copies = [dlx.publish(dead_letter_copy(m, r, d), m.routing_key or "", mandatory=True)
                      for m, r, d in refused]  # fmt: skip
            for result in await asyncio.gather(*copies, return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result  # the originals stay unacked: redelivered, judged again
                if not isinstance(result, Basic.Ack):
                    raise ConnectionError(
                        f"the dead-letter queue {self.settings.inbound_queue}.dead is gone"
                    )
            for _, reason, detail in refused:
                self.ingest.dropped(reason, detail)
        if not requeue:
            await batch[-1].ack(multiple=True)  # one frame settles the whole batch
        else:
            for message in batch:
                if id(message) in requeue:
                    await message.nack(requeue=True)
                else:
                    await message.ack()
        if isinstance(failure, Unavailable):
            raise ConnectionError(f"the hub refused inbound messages: {failure.detail}")
        if failure is not None:
            raise failure

    async def _publish(self, message: AbstractIncomingMessage) -> Event | None:
        headers = message.headers or {}
        if CURSOR_PROPERTY in headers:
            # Ours, come back through an overlapping binding: never ingested twice.
            self.ingest.skipped(f"routing key {message.routing_key}, {CURSOR_PROPERTY} present")
            return None
        channel = channel_of(message.routing_key or "", headers)
        return await self.ingest.publish(
            channel,
            message.body,
            content_type=message.content_type,
            type=message.type,
            idempotency_key=message.message_id,
        )


async def _supervise(
    direction: str, run: Callable[[asyncio.Event], Awaitable[None]], stopping: asyncio.Event
) -> None:
    """Run one direction until ``stopping``. Broker trouble is handled inside; anything that
    escapes (a failing log, a bug) restarts the direction after a pause, and never reaches the
    server's TaskGroup, where it would stop the whole server."""
    backoff = Backoff(initial=1.0, cap=60.0)
    while not stopping.is_set():
        try:
            await run(stopping)
        except Exception:
            logger.exception("relay amqp %s failed; restarting it", direction)
            await sleep_unless(stopping, backoff.next())


async def _next(
    inbox: asyncio.Queue[AbstractIncomingMessage],
    lost: asyncio.Future[str],
    stopping: asyncio.Event,
) -> AbstractIncomingMessage | None:
    """The next delivery; None when stopping; ConnectionError when the connection is lost."""
    if not inbox.empty():
        return inbox.get_nowait()
    get = asyncio.ensure_future(inbox.get())
    stop = asyncio.ensure_future(stopping.wait())
    waits: list[asyncio.Future[Any]] = [get, stop, lost]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not get.done():
            get.cancel()
    if get.done() and not get.cancelled():
        return get.result()
    if lost.done():
        raise ConnectionError(lost.result())
    return None


async def _close(connection: AbstractConnection) -> None:
    """Close without raising: the connection may be half gone already."""
    with contextlib.suppress(Exception, TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await connection.close()
