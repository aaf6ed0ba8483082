"""The NATS Log: one JetStream stream shared by every tidings node of a deployment (server 2.9+).

Layout (``natscodec``): the stream ``{PREFIX}_LOG`` on the one subject ``{prefix}.log``, file
storage, one message per event (channels ride in headers: a channel segment may contain ``.``),
stream sequence numbers as our sequence numbers; durable consumer positions as cursors in the KV
bucket ``{prefix}_consumers``, so a position from another epoch reads as unset. The epoch is a
digest of the stream's name and creation time: the same on every node, kept across server
restarts, new when the stream is deleted and recreated (by the first node to notice).

Appends: this node sends its appends' messages in order, under a lock held only while sending
(acknowledgements are awaited outside it), so concurrent appends share round trips and each
batch is contiguous among this node's appends. JetStream 2.9 has no atomic batch publish:
batches appended at the same moment on *different* nodes may interleave (every node still
delivers the stream's one order).

Idempotency: a keyed draft carries ``Nats-Msg-Id`` = a digest of (channel, key); the server drops
a repeat within its ``duplicate_window`` (the idempotency window, at most ``max_age``) and answers
with the logged event's seq, which is read back and returned. The server's window runs on its
clock, the contract's on the drafts' times, so a repeat past the window from the logged event by
the drafts' times, or whose event retention removed, is sent again as (channel, key, that seq):
one id on every node, so racing repeats still make one event, and later repeats follow the same
chain. Such a re-sent event lands after the rest of its batch.

Retention: the stream keeps at most ``max_events`` for at most ``max_age`` by the server's clock;
``trim(now)`` also purges the oldest events whose own time is past ``max_age`` (as the other logs
do), which usually finds nothing left.

Reading a range makes a short-lived pull consumer (ephemeral, in memory, no acks) and fetches
the page in one request rather than one direct get per event. Following uses a push consumer set
up like nats-py's ordered consumer (flow control, heartbeats); on a gap, silence or a reconnect
it is dropped, and the base class starts another where this node's delivery stands.

Durability: an acknowledged append is in the stream. With ``replicas=1`` the server has written
it to its file, which it fsyncs periodically (``sync_interval``: a minute or two by default), so
it survives a crash of the server process, not necessarily one of its machine. With
``replicas=3`` a majority of the stream's servers had it before the acknowledgement, so it
survives the loss of any one of them (see ``docs/cluster.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any, NoReturn

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from ..events import Draft, Event
from ..exceptions import ConfigError, Unavailable
from . import Appended, LogStats
from . import natscodec as codec
from .shared import EpochChanged, SharedLog

logger = logging.getLogger("tidings.log")

CONNECT_TIMEOUT = 5.0  # seconds ``open`` tries to reach a server
API_TIMEOUT = 5.0  # seconds for any JetStream API answer
ACK_TIMEOUT = 5.0  # seconds for the acknowledgements of an append
FOLLOW_IDLE = 1.0  # an idle follower yields this often, so the base class checks the epoch
SILENT = 3.5  # seconds without a word from the follower's consumer: start a new one
FOLLOW_BATCH = 1000
TRIM_PAGE = 500
MAX_ROUNDS = 16  # of an idempotency chain within one append; more means something is wrong

STREAM_CONFIG_DIFFERS = 10058  # "stream name already in use with a different configuration"


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's error as seen: its append may have given up on it."""
    if not future.cancelled():
        future.exception()


def _api_error(error: dict[str, Any]) -> NoReturn:
    nats.js.errors.APIError.from_error(error)  # raises the subclass for the code
    raise nats.js.errors.APIError(**error)


class _StreamGone(Exception):
    """No stream took an append's messages: it was deleted."""


class NatsLog(SharedLog):
    engine_name = "NATS"

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        prefix: str = "tidings",
        max_events: int = 1_000_000,
        max_age: float = 3 * 86_400,
        idempotency_window: float = 86_400,
        replicas: int = 1,
        cache_events: int = 10_000,
    ) -> None:
        super().__init__(cache_events=cache_events)
        self.servers = [s.strip() for s in url.split(",")]
        if not all(s.startswith(("nats://", "tls://")) for s in self.servers):
            raise ConfigError(f"the NATS log needs nats:// or tls:// URLs, not {url!r}")
        self.url = url
        self._names = codec.names(prefix)
        self.stream, self._subject, self.bucket = self._names
        self._max_events = max_events if max_events > 0 else 0
        self._max_age = max_age if max_age > 0 else 0.0
        self._window = idempotency_window
        # The server refuses a duplicate window past max_age; 0 would mean its default (2 min).
        dedupe = min(idempotency_window, self._max_age) if self._max_age else idempotency_window
        self._dedupe_window = max(dedupe, 0.001)
        self._replicas = max(1, replicas)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._sending = asyncio.Lock()
        self._follow_wake: asyncio.Event | None = None
        self._dropped: asyncio.Future[None] | None = None  # done when the connection drops
        self._last_error = ""

    # -- connection and errors -----------------------------------------------------------------

    def _connection(self) -> Client:
        if self._nc is None or self._js is None:
            raise Unavailable("the NATS log is not open")
        return self._nc

    def _jetstream(self) -> JetStreamContext:
        self._connection()
        assert self._js is not None
        return self._js

    def _reason(self, exc: BaseException) -> str:
        if self._nc is not None and not self._nc.is_connected:
            return "disconnected; reconnecting"
        if isinstance(exc, nats.js.errors.APIError):
            return exc.description or f"error {exc.code}"
        if isinstance(exc, asyncio.TimeoutError):
            return "no answer in time"
        if isinstance(exc, nats.errors.NoRespondersError):
            return "no responders (is JetStream enabled?)"
        return str(exc) or type(exc).__name__

    def _unavailable(self, exc: BaseException) -> Unavailable:
        return Unavailable(f"the log's NATS at {self.url} is unavailable: {self._reason(exc)}")

    async def _api(self, op: str, body: Any = None) -> dict[str, Any]:
        """One JetStream API request; raises nats' errors (APIError for an error answer)."""
        nc = self._connection()
        if not nc.is_connected:  # fail now rather than leave a reply waiting for nothing
            raise nats.errors.ConnectionReconnectingError
        payload = b"" if body is None else orjson.dumps(body)
        msg = await nc.request(f"$JS.API.{op}", payload, timeout=API_TIMEOUT)
        reply: dict[str, Any] = orjson.loads(msg.data)
        if "error" in reply:
            _api_error(reply["error"])
        return reply

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = str(exc) or type(exc).__name__
        logger.debug("log: NATS: %r", exc)

    async def _on_disconnected(self) -> None:
        if self._js is not None and not self._closing:
            logger.warning("log: disconnected from NATS at %s; reconnecting", self.url)
        if self._dropped is not None and not self._dropped.done():
            self._dropped.set_result(None)
        if self._follow_wake is not None:
            self._follow_wake.set()

    async def _on_reconnected(self) -> None:
        logger.info("log: reconnected to NATS at %s", self.url)
        self._dropped = asyncio.get_running_loop().create_future()

    # -- engine --------------------------------------------------------------------------------

    async def _engine_open(self) -> tuple[str, int]:
        nc = self._nc = Client()
        self._dropped = asyncio.get_running_loop().create_future()
        try:
            # nats-py retries a first connection for ever with max_reconnect_attempts=-1 (which
            # the node wants once it runs), hence the timeout. pending_size=0: a publish while
            # disconnected fails at once instead of waiting in a buffer past its timeout.
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await nc.connect(
                    self.servers, name=f"tidings log {self._subject}", connect_timeout=2,
                    max_reconnect_attempts=-1, reconnect_time_wait=1, pending_size=0,
                    ping_interval=10, max_outstanding_pings=2, error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
                )  # fmt: skip
            self._js = nc.jetstream(timeout=API_TIMEOUT)
            info = await self._open_stream()
            self._kv = await self._open_bucket(self._js)
        except ConfigError:
            await self._engine_close()
            raise
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            connected = nc.is_connected
            await self._engine_close()
            if not connected:
                reason = f"no server answered within {CONNECT_TIMEOUT:.0f} s"
                reason += f" ({self._last_error})" if self._last_error else ""
            else:
                reason = self._reason(exc)
            raise ConfigError(f"log: cannot use NATS at {self.url}: {reason}") from None
        self._trimmed(codec.low(info["state"]))
        return codec.epoch(info), int(info["state"]["last_seq"])

    def _stream_config(self) -> dict[str, Any]:
        return codec.stream_config(
            self._names, self._max_events, self._max_age, self._dedupe_window, self._replicas
        )

    async def _ensure_stream(self) -> dict[str, Any]:
        """The stream's info, creating the stream when there is none."""
        try:
            return await self._api(f"STREAM.INFO.{self.stream}")
        except nats.js.errors.NotFoundError:
            pass
        try:
            info = await self._api(f"STREAM.CREATE.{self.stream}", self._stream_config())
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_CONFIG_DIFFERS:
                raise
            return await self._api(f"STREAM.INFO.{self.stream}")  # another node made it
        logger.info("log: created the NATS stream %s (epoch %s)", self.stream, codec.epoch(info))
        return info

    async def _open_stream(self) -> dict[str, Any]:
        """The stream, made or brought to this node's settings (the deployment's latest)."""
        try:
            info = await self._ensure_stream()
            config: dict[str, Any] = info["config"]
            if config.get("subjects") != [self._subject]:
                raise ConfigError(
                    f"log: the NATS stream {self.stream} takes {config.get('subjects')}, not "
                    f"[{self._subject!r}]: it belongs to something else; choose another prefix"
                )
            wanted = self._stream_config()
            if any(config.get(k) != wanted[k] for k in codec.OWNED):
                logger.info("log: updating the NATS stream %s to this node's settings", self.stream)
                update = {**config, **{k: wanted[k] for k in codec.OWNED}}
                info = await self._api(f"STREAM.UPDATE.{self.stream}", update)
        except nats.js.errors.APIError as exc:
            raise ConfigError(
                f"log: the NATS stream {self.stream} at {self.url}: {exc.description}"
            ) from None
        return info

    async def _open_bucket(self, js: JetStreamContext) -> KeyValue:
        try:
            return await js.create_key_value(bucket=self.bucket, history=1, replicas=self._replicas)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_CONFIG_DIFFERS:
                raise
        return await js.key_value(self.bucket)  # made with other settings: usable all the same

    async def _engine_close(self) -> None:
        nc, self._nc, self._js, self._kv = self._nc, None, None, None
        if nc is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await nc.close()

    async def _engine_epoch(self) -> str:
        try:
            return codec.epoch(await self._ensure_stream())
        except nats.errors.Error as exc:
            raise self._unavailable(exc) from None

    async def _info(self) -> dict[str, Any]:
        try:
            return await self._api(f"STREAM.INFO.{self.stream}")
        except nats.errors.Error as exc:
            raise self._unavailable(exc) from None

    async def _engine_head(self) -> int:
        return int((await self._info())["state"]["last_seq"])

    async def low(self) -> int:
        low = codec.low((await self._info())["state"])
        self._trimmed(low)
        return low

    # -- appends -------------------------------------------------------------------------------

    async def _engine_append(self, drafts: Sequence[Draft]) -> list[Appended]:
        try:
            return await self._append(drafts, self._epoch)
        except _StreamGone:
            pass
        # Deleted under us: recreate it (a new epoch, as any node would) and append there.
        epoch = await self._engine_epoch()
        try:
            return await self._append(drafts, epoch)
        except _StreamGone:
            raise Unavailable(
                f"the log's NATS at {self.url}: the stream {self.stream} keeps disappearing"
            ) from None

    async def _append(self, drafts: Sequence[Draft], epoch: str) -> list[Appended]:
        out: list[Appended | None] = [None] * len(drafts)
        todo = [
            (i, codec.msg_id(d.channel, d.idempotency_key) if d.idempotency_key else None)
            for i, d in enumerate(drafts)
        ]
        known: dict[int, Event | None] = {}  # events by seq, made or read back by this append
        for _ in range(MAX_ROUNDS):
            acks = await self._send([(drafts[i], msg_id) for i, msg_id in todo])
            again: list[tuple[int, str | None]] = []
            for (i, _msg), ack in zip(todo, acks, strict=True):
                draft = drafts[i]
                if not ack.duplicate:
                    event = known[ack.seq] = Event.from_draft(draft, epoch, ack.seq)
                    out[i] = Appended(event, True)
                    continue
                if ack.seq not in known:
                    known[ack.seq] = await self._logged(epoch, ack.seq)
                logged = known[ack.seq]
                if logged is not None and draft.time - logged.time <= self._window:
                    out[i] = Appended(logged, False)
                else:  # past the window by the drafts' times, or removed: next in the chain
                    assert draft.idempotency_key is not None
                    again.append((i, codec.msg_id(draft.channel, draft.idempotency_key, ack.seq)))
            if not again:
                appended = [a for a in out if a is not None]
                last = max((a.event.seq for a in appended if a.created), default=0)
                if self._max_events and last > self._max_events:
                    self._trimmed(last - self._max_events)
                return appended
            todo = again
        raise Unavailable(f"the log's NATS at {self.url}: an idempotency key chain is too long")

    async def _send(self, items: list[tuple[Draft, str | None]]) -> list[api.PubAck]:
        """Publish ``items`` in order and return their acknowledgements."""
        if not self._connection().is_connected:
            raise self._unavailable(nats.errors.ConnectionReconnectingError())
        dropped = self._dropped  # this connection's: acknowledgements never outlive it
        assert dropped is not None
        # Shielded: a cancelled append still sends its whole batch, or none of it.
        publishing = asyncio.ensure_future(self._publish(items))
        publishing.add_done_callback(_retrieve)
        try:
            futures = await asyncio.shield(publishing)
        except nats.errors.Error as exc:
            raise self._unavailable(exc) from None
        acks = asyncio.gather(*futures, return_exceptions=True)
        try:
            await asyncio.wait(
                (acks, dropped), timeout=ACK_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not acks.done():
                acks.cancel()
                acks.add_done_callback(_retrieve)
        if acks.cancelled() or not acks.done():
            why = (
                "lost the connection"
                if dropped.done()
                else f"no acknowledgement in {ACK_TIMEOUT:.0f} s"
            )
            raise Unavailable(
                f"the log's NATS at {self.url}: {why} while appending; the events may be "
                "logged: retry with the same Idempotency-Key"
            )
        failed = [a for a in acks.result() if isinstance(a, BaseException)]
        if failed:
            if all(isinstance(e, nats.js.errors.NoStreamResponseError) for e in failed):
                raise _StreamGone
            raise self._unavailable(failed[0])
        return [a for a in acks.result() if not isinstance(a, BaseException)]

    async def _publish(self, items: list[tuple[Draft, str | None]]) -> list[asyncio.Future[Any]]:
        js = self._jetstream()
        futures: list[asyncio.Future[Any]] = []
        async with self._sending:  # nothing else of this node's goes out between these
            for draft, msg_id in items:
                headers = codec.headers(draft, msg_id)
                future = await js.publish_async(self._subject, draft.data, headers=headers)
                future.add_done_callback(_retrieve)
                futures.append(future)
        return futures

    async def _logged(self, epoch: str, seq: int) -> Event | None:
        """The stored event ``seq``; None when retention removed it."""
        try:
            msg = await self._jetstream().get_msg(self.stream, seq, direct=True)
        except nats.js.errors.NotFoundError:
            return None
        except nats.errors.Error as exc:
            raise self._unavailable(exc) from None
        return codec.decode(epoch, seq, msg.headers, msg.data or b"")

    # -- reading and following -----------------------------------------------------------------

    async def _engine_range(
        self, after: int, limit: int, *, headers_only: bool = False
    ) -> list[Event]:
        nc = self._connection()
        epoch = self._epoch
        config = codec.consumer_config(after + 1, headers_only=headers_only)
        received: list[Msg] = []
        done = asyncio.get_running_loop().create_future()
        wanted = 0

        async def arrived(msg: Msg) -> None:
            received.append(msg)
            if (len(received) >= wanted or codec.status(msg.headers)) and not done.done():
                done.set_result(None)

        try:
            info = await self._api(
                f"CONSUMER.CREATE.{self.stream}", {"stream_name": self.stream, "config": config}
            )
            name = info["name"]
            try:
                wanted = min(limit, int(info["num_pending"]))
                if wanted <= 0:
                    return []
                sub = await nc.subscribe(nc.new_inbox(), cb=arrived)
                try:
                    # no_wait: the server sends what it has, then a status if that is short.
                    await nc.publish(
                        f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{name}",
                        orjson.dumps({"batch": wanted, "no_wait": True}),
                        reply=sub.subject,
                    )
                    async with asyncio.timeout(API_TIMEOUT):
                        await done
                finally:
                    with contextlib.suppress(nats.errors.Error):
                        await sub.unsubscribe()
            finally:
                with contextlib.suppress(nats.errors.Error):  # nobody waits for the answer
                    await nc.publish(f"$JS.API.CONSUMER.DELETE.{self.stream}.{name}")
        except (TimeoutError, nats.errors.Error) as exc:
            raise self._unavailable(exc) from None
        return [
            codec.decode(epoch, codec.delivery_seqs(m.reply)[0], m.headers, m.data)
            for m in received
            if not codec.status(m.headers)
        ]

    async def _engine_follow(self, after: int) -> AsyncIterator[list[Event]]:
        epoch = await self._engine_epoch()
        if epoch != self._epoch:
            raise EpochChanged(epoch)
        nc = self._connection()
        loop = asyncio.get_running_loop()
        queue: deque[Msg] = deque()
        wake = asyncio.Event()

        async def arrived(msg: Msg) -> None:
            queue.append(msg)
            wake.set()

        # Like nats-py's ordered consumer, but restarted by the base class (from where this
        # node's delivery stands, and only after checking the epoch) instead of in the client.
        inbox = nc.new_inbox()
        config = codec.consumer_config(after + 1, deliver_to=inbox)
        self._follow_wake = wake
        sub: Subscription | None = None
        name = ""
        try:
            try:
                reconnects = nc.stats["reconnects"]
                sub = await nc.subscribe(inbox, cb=arrived)
                name = (
                    await self._api(
                        f"CONSUMER.CREATE.{self.stream}",
                        {"stream_name": self.stream, "config": config},
                    )
                )["name"]
            except nats.errors.Error as exc:
                raise self._unavailable(exc) from None
            heard = quiet_since = loop.time()
            delivered = 0  # the consumer's sequence number of the last event received
            while not self._closing:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, quiet_since + FOLLOW_IDLE - loop.time())):
                        await wake.wait()
                wake.clear()
                if self._closing:
                    return
                if not nc.is_connected or nc.stats["reconnects"] != reconnects:
                    raise self._unavailable(nats.errors.ConnectionReconnectingError())
                batch: list[Event] = []
                while queue and len(batch) < FOLLOW_BATCH:
                    msg = queue.popleft()
                    heard = loop.time()
                    status = codec.status(msg.headers)
                    if not status:
                        seq, delivered = codec.delivery_seqs(msg.reply)
                        batch.append(codec.decode(epoch, seq, msg.headers, msg.data))
                    else:
                        await self._control(msg, status, delivered)
                if queue:
                    wake.set()
                if batch:
                    yield batch
                    quiet_since = loop.time()
                elif loop.time() - quiet_since >= FOLLOW_IDLE:
                    if loop.time() - heard > SILENT:
                        raise Unavailable(f"the log's NATS at {self.url}: the follower went silent")
                    yield []
                    quiet_since = loop.time()
        finally:
            # May run late (an abandoned async generator is closed by the event loop), when
            # a newer follower already runs: leave its wake-up alone.
            if self._follow_wake is wake:
                self._follow_wake = None
            if sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
            if name:
                with contextlib.suppress(nats.errors.Error):
                    await nc.publish(f"$JS.API.CONSUMER.DELETE.{self.stream}.{name}")

    async def _control(self, msg: Msg, status: str, delivered: int) -> None:
        """A status message on the follower's consumer: flow control or a heartbeat."""
        headers = msg.headers or {}
        if status != "100":
            raise Unavailable(
                f"the log's NATS at {self.url}: the follower's consumer ended ({status} "
                f"{headers.get('Description', '')})"
            )
        # Flow control: the server waits for an answer before sending more; answered once
        # the messages before it were taken, so a slow node slows its own consumer only.
        for reply in (msg.reply, headers.get("Nats-Consumer-Stalled")):
            if reply:
                await self._connection().publish(reply)
        last = headers.get("Nats-Last-Consumer")
        if last is not None and int(last) > delivered:
            raise Unavailable(
                f"the log's NATS at {self.url}: the follower missed events {delivered + 1}.."
                f"{last} of its consumer"
            )

    async def _engine_interrupt(self) -> None:
        if self._follow_wake is not None:
            self._follow_wake.set()

    # -- retention, consumers, stats -----------------------------------------------------------

    async def trim(self, now: float | None = None) -> int:
        """Purge the events older than ``max_age`` by their time; the server's own limits
        (``max_events``, and ``max_age`` by its clock) remove events without telling."""
        if not self._max_age:
            return 0
        cutoff = (time.time() if now is None else now) - self._max_age
        after = await self.low()
        last_old = 0
        while True:  # events are in time order, as in the other logs: stop at the first kept
            page = await self._engine_range(after, TRIM_PAGE, headers_only=True)
            old = list(itertools.takewhile(lambda e: e.time < cutoff, page))
            if old:
                last_old = old[-1].seq
            if not page or len(old) < len(page):
                break
            after = page[-1].seq
        if not last_old:
            return 0
        try:
            # Removes every event below seq, which may include some the server just removed.
            reply = await self._api(f"STREAM.PURGE.{self.stream}", {"seq": last_old + 1})
        except nats.errors.Error as exc:
            raise self._unavailable(exc) from None
        await self.low()  # drops what went from this node's cache
        return int(reply.get("purged", 0))

    async def stats(self) -> LogStats:
        state = (await self._info())["state"]
        return LogStats(
            events=int(state["messages"]),
            head=int(state["last_seq"]),
            low=codec.low(state),
            bytes=int(state["bytes"]),
        )

    def _bucket(self) -> KeyValue:
        self._connection()
        assert self._kv is not None
        return self._kv

    async def get_consumer(self, name: str) -> int | None:
        try:
            entry = await self._bucket().get(codec.consumer_key(name))
        except nats.js.errors.KeyNotFoundError:
            return None
        except nats.errors.Error as exc:
            raise self._unavailable(exc) from None
        epoch, _, seq = (entry.value or b"").decode().partition(":")
        return int(seq) if epoch == self._epoch and seq else None

    async def set_consumer(self, name: str, seq: int) -> None:
        try:
            await self._bucket().put(codec.consumer_key(name), f"{self._epoch}:{seq}".encode())
        except nats.errors.Error as exc:
            raise self._unavailable(exc) from None

    async def delete_consumer(self, name: str) -> None:
        try:
            await self._bucket().delete(codec.consumer_key(name))
        except nats.errors.Error as exc:
            raise self._unavailable(exc) from None
