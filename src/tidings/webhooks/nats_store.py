"""The webhook store on NATS JetStream (server 2.9+), shared by several tidings nodes: endpoints,
retries, failed marks and the attempt log, with the semantics of the SQLite ``WebhookStore``.

The layout is ``natscodec``'s: a KV bucket for the endpoints and each event's state (its retry
and failed mark), a stream for the attempt log with a subject per endpoint, event and attempt.

Rules:
- JetStream 2.9 has no atomic batch, so what must change at once lives in one message: an
  event's retry and failed mark share one key, and ``settle`` is one write (a put, or a purge of
  the key). ``set_retry`` keeps the mark beside the retry with a write that expects the key's
  last revision (remembered from this node's own writes; read again when another writer moved
  it), so nothing written meanwhile is lost.
- Removals purge subjects (no delete markers pile up). ``delete`` purges the attempts, the
  event states, then the endpoint: three requests, the endpoint last, so a delete cut short
  leaves the endpoint listed, to be deleted again.
- A read of several keys or attempts is one short-lived pull consumer filtered by subject (a
  request to make it, one per 1000 messages), never a get per key. The bucket lists keys in the
  order they were written, not by seq, so ``retries`` and ``failed`` read every state of the
  endpoint (its retries, at most ``max_retrying``, and its failed marks) and sort them here.
- The attempt log is batched as in SQLite: ``record`` buffers, ``run`` publishes a batch in
  order (pipelined, then every acknowledgement awaited), writers wait while the flush is
  ``FLUSH_ROWS`` behind. An attempt NATS did not acknowledge stays buffered with its
  ``Nats-Msg-Id``, so the server drops a re-send of one it had stored after all.
- NATS errors surface as ``Unavailable`` naming NATS and the URL (passwords and tokens masked);
  ``open`` on an unreachable server raises a one-line ``ConfigError`` within
  ``jetstream.CONNECT_TIMEOUT``. A bucket or stream deleted under a running store is made again
  (empty) by the next request that misses it.
- "Durable when this returns" means acknowledged by the stream: stored by its leader, and by a
  majority of its replicas with ``replicas=3`` (see ``docs/cluster.md`` on ``sync_interval``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from ..exceptions import ConfigError, Unavailable
from .delivery import Attempt, Endpoint, Retry
from .jetstream import CONNECT_TIMEOUT, Dropped, JetStream, StreamMissing, seq_of
from .natscodec import Names, Search, State, event_seq, masked, row, stored, token
from .store import Failed, ServerAttemptBuffer, Store, StoredAttempt, decode, encode

logger = logging.getLogger("tidings.webhooks")

T = TypeVar("T")

DEDUPE_WINDOW = 120.0  # seconds the attempts' stream drops a re-sent Nats-Msg-Id
PURGES_AT_ONCE = 64  # purge requests ``trim`` has in flight
CAS_ROUNDS = 8  # conditional writes of one retry before giving up: something keeps racing it
REMEMBERED = 100_000  # revisions of this node's writes kept; past that they are forgotten
WRONG_LAST_SEQUENCE = 10071  # a write that expected another last revision of its subject
EXPECT = api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value

NATS_ERRORS = (TimeoutError, nats.errors.Error, OSError)


def _deleted(msg: Msg) -> bool:
    """A KV delete or purge marker (written by other tools: this store purges instead)."""
    return (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE")


class NatsWebhookStore(ServerAttemptBuffer[str], Store):
    """``url`` is a NATS URL (``nats://``, ``tls://``; several separated by commas); the names
    come from ``prefix`` (``natscodec.Names``); ``replicas`` is the replica count of the bucket
    and the stream when this store makes them (the log's ``replicas``)."""

    def __init__(self, url: str, prefix: str = "tidings", *, replicas: int = 1) -> None:
        super().__init__()  # the attempt log's buffer: by Nats-Msg-Id
        self.url = url
        self.prefix = prefix
        self.names = Names(prefix)
        self._replicas = max(1, replicas)
        self._js: JetStream | None = None
        # Unique across nodes: each attempt's Nats-Msg-Id and the last token of its subject.
        self._msg_ids = (f"{secrets.token_hex(6)}-{n}" for n in itertools.count(1))
        # Event state subject -> the revision and state of this node's last write there.
        self._written: dict[str, tuple[int, State]] = {}

    # -- errors --------------------------------------------------------------------------------

    def _jetstream(self) -> JetStream:
        assert self._js is not None, "the webhook store is not open"
        return self._js

    def _reason(self, exc: BaseException) -> str:
        if isinstance(exc, nats.js.errors.ServiceUnavailableError) and not exc.description:
            return "JetStream is not available (is it enabled?)"  # nats-py's no responders
        if isinstance(exc, nats.js.errors.APIError):
            return exc.description or f"error {exc.err_code}"
        if isinstance(exc, Dropped) or (self._js is not None and not self._js.connected):
            return "disconnected; reconnecting"
        if isinstance(exc, asyncio.TimeoutError):
            return "no answer in time"
        if isinstance(exc, nats.errors.NoRespondersError):
            return "no responders (is JetStream enabled?)"
        return " ".join(str(exc).split()) or type(exc).__name__

    def _unavailable(self, doing: str, exc: BaseException) -> Unavailable:
        if isinstance(exc, nats.js.errors.APIError):
            what = f"NATS at {masked(self.url)} answered with an error"
        else:
            what = f"cannot reach NATS at {masked(self.url)}"
        return Unavailable(f"webhook store, {doing}: {what}: {self._reason(exc)}")

    async def _run(self, doing: str, op: Callable[[], Awaitable[T]]) -> T:
        """``op()``, its NATS errors as ``Unavailable``; once more after making the bucket and
        stream again when one was missing."""
        try:
            try:
                return await op()
            except StreamMissing:
                await self._ensure()
                logger.warning("webhook store: a NATS stream of %s was gone: made again, empty",
                               self.prefix)  # fmt: skip
            return await op()
        except StreamMissing:
            raise Unavailable(
                f"webhook store, {doing}: NATS at {masked(self.url)}: its streams keep disappearing"
            ) from None
        except NATS_ERRORS as exc:
            raise self._unavailable(doing, exc) from None

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        servers = [s.strip() for s in self.url.split(",")]
        if not all(s.startswith(("nats://", "tls://")) for s in servers):
            raise ConfigError(
                f"webhook store: {masked(self.url)} is not a NATS URL (nats:// or tls://)"
            )
        js = self._js = JetStream(servers, f"tidings webhooks {self.prefix}")
        try:
            await js.connect()
            await self._ensure()
        except ConfigError:
            await self._disconnect()
            raise
        except (*NATS_ERRORS, StreamMissing) as exc:
            connected = js.connected
            await self._disconnect()
            if not connected:
                reason = f"no server answered within {CONNECT_TIMEOUT:.0f} s"
                reason += f" ({js.last_error})" if js.last_error else ""
            else:
                reason = self._reason(exc)
            raise ConfigError(
                f"webhook store: cannot use NATS at {masked(self.url)}: {reason}"
            ) from None

    async def _ensure(self) -> None:
        """The bucket and the attempts' stream, made when missing (by this node or another)."""
        js, names = self._jetstream(), self.names
        await js.bucket(names.bucket, self._replicas)
        config = names.attempts_config(self._replicas, DEDUPE_WINDOW)
        subjects = (await js.stream(config))["config"].get("subjects")
        if subjects != config["subjects"]:
            raise ConfigError(
                f"webhook store: the NATS stream {names.attempts_stream} takes {subjects}, not "
                f"{config['subjects']}: it belongs to something else; choose another prefix"
            )

    async def close(self) -> None:
        """Flush the attempt log, then disconnect. Attempts NATS refuses now are logged as lost
        rather than raised: shutting down must not wait for NATS to come back."""
        if self._js is None:
            return
        try:
            await self._last_flush()
        finally:
            await self._disconnect()

    async def _disconnect(self) -> None:
        js, self._js = self._js, None
        if js is not None:
            await js.close()

    # -- endpoints -----------------------------------------------------------------------------

    async def endpoints(self) -> list[Endpoint]:
        names = self.names

        async def read() -> list[Endpoint]:
            msgs = await self._jetstream().read(names.kv_stream, names.endpoints)
            found = [decode(names.endpoint_id(m.subject), m.data) for m in msgs if not _deleted(m)]
            return sorted(found, key=lambda e: e.id)  # by id, as SQLite's table scan

        return await self._run("reading the endpoints", read)

    async def put(self, endpoint: Endpoint) -> None:
        subject, spec = self.names.endpoint(endpoint.id), encode(endpoint)
        await self._run("storing an endpoint", lambda: self._jetstream().publish(subject, spec))

    async def delete(self, id: str) -> None:
        """The endpoint and everything kept about it: its attempts, its events' states, then
        the endpoint (a delete cut short leaves it listed, to be deleted again)."""
        await self.flush()
        js, names = self._jetstream(), self.names

        async def delete() -> None:
            await js.purge(names.attempts_stream, names.attempts_of(id))
            await js.purge(names.kv_stream, names.states(id))
            await js.purge(names.kv_stream, names.endpoint(id))

        await self._run(f"deleting endpoint {id}", delete)
        mine = f"{names.kv}ev.{token(id)}."
        for subject in [s for s in self._written if s.startswith(mine)]:
            del self._written[subject]

    # -- retries and failed marks --------------------------------------------------------------

    async def _states(self, id: str | None) -> list[tuple[str, int, State]]:
        """The stored event states of endpoint ``id`` (None: of every endpoint), in the order
        they were written: (subject, revision, state)."""
        msgs = await self._jetstream().read(self.names.kv_stream, self.names.states(id))
        return [(m.subject, seq_of(m), State.of(m.data)) for m in msgs if not _deleted(m)]

    async def retries(self, endpoint: str) -> list[Retry]:
        states = await self._run("reading retries", lambda: self._states(endpoint))
        found = [Retry(event_seq(s), *state.retry) for s, _, state in states if state.retry]
        return sorted(found, key=lambda r: r.seq)

    async def set_retry(self, endpoint: str, retry: Retry) -> None:
        """Store ``retry`` beside the event's failed mark, if it has one: a write that expects
        the revision this node last wrote there (none: no key); when another writer moved it,
        the state is read again and the write repeated."""
        js, subject = self._jetstream(), self.names.state(endpoint, retry.seq)

        async def write() -> None:
            revision, state = self._written.get(subject, (0, State()))
            for _ in range(CAS_ROUNDS):
                state = state.with_retry(retry)
                try:
                    written = await js.publish(subject, state.encode(), {EXPECT: str(revision)})
                except nats.js.errors.APIError as exc:
                    if exc.err_code != WRONG_LAST_SEQUENCE:
                        raise
                    revision, data = await js.last(self.names.kv_stream, subject)
                    state = State.of(data)
                    continue
                self._remember(subject, written, state)
                return
            raise nats.js.errors.APIError(description="the event's state kept changing")

        await self._run("storing a retry", write)

    def _remember(self, subject: str, revision: int, state: State) -> None:
        if len(self._written) >= REMEMBERED:
            self._written.clear()  # only a shortcut: a forgotten revision is read again
        self._written[subject] = (revision, state)

    async def settle(self, endpoint: str, seq: int, failed: Failed | None) -> None:
        """Drop ``seq``'s stored retry; mark it failed (``failed``) or no longer failed. The
        event's state after either is the same whatever it was before, so it is one write that
        expects nothing: a put of the mark alone, or a purge of the key."""
        js, subject = self._jetstream(), self.names.state(endpoint, seq)
        self._written.pop(subject, None)
        if failed is None:
            await self._run("settling an event", lambda: js.purge(self.names.kv_stream, subject))
        else:
            value = State.failed(failed).encode()
            await self._run("settling an event", lambda: js.publish(subject, value))

    async def failed(self, endpoint: str, after: int, until: int, limit: int) -> list[Failed]:
        """Failed marks of ``endpoint`` with ``after < seq <= until``, oldest first."""
        if limit == 0:
            return []
        states = await self._run("reading failed marks", lambda: self._states(endpoint))
        marks = [Failed(event_seq(s), *state.mark) for s, _, state in states if state.mark]
        chosen = sorted((m for m in marks if after < m.seq <= until), key=lambda m: m.seq)
        return chosen if limit < 0 else chosen[:limit]

    # -- the attempt log -----------------------------------------------------------------------

    # ``record``, ``run`` and ``flush`` are ``ServerAttemptBuffer``'s; these give ids and write.

    async def _with_ids(self, batch: list[Attempt]) -> Iterable[tuple[str, Attempt]]:
        return zip(self._msg_ids, batch, strict=False)

    async def _write_unwritten(self) -> None:
        await self._run("writing the attempt log", self._write)

    async def _write(self) -> None:
        """Publish the unwritten attempts in order; those the stream acknowledged leave
        ``_unwritten``, the others stay there, in order, for the next flush."""
        batch = self._unwritten
        results = await self._jetstream().publish_all(
            [(self.names.attempt(a.endpoint, a.seq, msg_id), row(a),
              {"t": repr(float(a.time)), api.Header.MSG_ID.value: msg_id})
             for msg_id, a in batch]
        )  # fmt: skip
        self._unwritten = [item for item, r in zip(batch, results, strict=True)
                           if isinstance(r, BaseException)]  # fmt: skip
        errors = [r for r in results if isinstance(r, BaseException)]
        if any(isinstance(e, nats.js.errors.NoStreamResponseError) for e in errors):
            raise StreamMissing
        if errors:
            raise errors[0]

    async def attempts(
        self, endpoint: str, seq: int | None, before: int | None, limit: int
    ) -> list[StoredAttempt]:
        """Attempts of ``endpoint`` (of event ``seq`` only, when given), newest first, with
        ids below ``before``."""
        self._jetstream()
        await self.flush()
        if limit == 0 or (before is not None and before <= 1):
            return []  # ids start at 1
        subject = self.names.attempts_of(endpoint, seq)

        async def read() -> list[StoredAttempt]:
            found = await self._newest(subject, before, limit, few=seq is not None)
            return [stored(seq_of(m), m.subject, m.data) for m in found]

        return await self._run("reading the attempt log", read)

    async def _newest(
        self, subject: str, before: int | None, limit: int, *, few: bool = False
    ) -> list[Msg]:
        """The newest ``limit`` (negative: all) attempts on ``subject`` below seq ``before``,
        newest first. JetStream reads forward only; a consumer made from a start says how many
        messages it has, so ``natscodec.Search`` finds a start with about ``limit`` below
        ``before`` (a consumer per guess, ~1.5 ms each; one guess when one endpoint has all the
        attempts), and the page is read from there."""
        js, stream = self._jetstream(), self.names.attempts_stream
        state = (await js.api(f"STREAM.INFO.{stream}"))["state"]
        first, last = int(state["first_seq"]), int(state["last_seq"])
        top = last + 1 if before is None else min(before, last + 1)
        if top <= first or not state["messages"]:
            return []
        above = 0 if top > last else await self._count(subject, top)
        search = Search(first, top, limit, few=few)
        while True:
            at = search.guess()
            name, count = await js.consumer(stream, subject, at)
            if search.counted(at, count - above):
                break
            await js.forget(stream, name)
        try:
            # Read on to the first one at or past ``top``, not just as many as counted: the
            # stream may have changed since STREAM.INFO.
            msgs = await js.fetch(stream, name, max(count - above, 0) + 1, until=top)
        finally:
            await js.forget(stream, name)
        found = [m for m in msgs if seq_of(m) < top]
        if limit >= 0:
            found = found[len(found) - limit :] if len(found) > limit else found
        found.reverse()
        if len(found) < limit and at > first:
            # Fewer than counted (appends after STREAM.INFO, a trim): the rest is below.
            return [*found, *await self._newest(subject, at, limit - len(found))]
        return found

    async def _count(self, subject: str, start: int) -> int:
        js, stream = self._jetstream(), self.names.attempts_stream
        name, count = await js.consumer(stream, subject, start)
        await js.forget(stream, name)
        return count

    async def trim(self, before: float, low: int = 0) -> int:
        """Remove attempts older than ``before`` (unix seconds), and failed marks of events
        retention removed (``seq <= low``: nothing is left to replay); returns the attempts
        removed.

        Attempts are in the order they were recorded, which is nearly their time order (an
        attempt is recorded when it ends, stamped when it began): the oldest are read (headers
        only) up to the first at or after ``before``, and all below it purged in one request.
        An older one recorded after that (a slower attempt) goes at a later trim, once the
        ones before it are old."""
        removed = await self._run("trimming the attempt log", lambda: self._trim_attempts(before))
        if low > 0:
            await self._run("trimming failed marks", lambda: self._trim_marks(low))
        return removed

    async def _trim_attempts(self, before: float) -> int:
        js, stream = self._jetstream(), self.names.attempts_stream
        below = 0  # purge the attempts below this seq
        young = False
        name, pending = await js.consumer(stream, f"{self.names.attempts}.>", 1, headers_only=True)
        try:
            while pending > 0 and not young:
                page = await js.fetch(stream, name, min(pending, 1000))
                if not page:
                    break
                pending -= len(page)
                for msg in page:
                    if float((msg.headers or {}).get("t", 0.0)) >= before:
                        young = True
                        break
                    below = seq_of(msg) + 1
        finally:
            await js.forget(stream, name)
        return await js.purge(stream, below=below) if below else 0

    async def _trim_marks(self, low: int) -> None:
        """Drop the failed marks with seq <= ``low``. A state holding only a mark is purged (a
        retry written since the read goes too: its event is gone, so resuming it would only
        mark it failed again); one with a retry keeps it, written only if the state did not
        change since (else the next trim does it)."""
        js, kv = self._jetstream(), self.names.kv_stream
        purge: list[str] = []
        for subject, revision, state in await self._states(None):
            if state.mark is None or event_seq(subject) > low:
                continue
            self._written.pop(subject, None)
            if state.retry is None:
                purge.append(subject)
                continue
            kept = State(state.retry, None).encode()
            try:
                await js.publish(subject, kept, {EXPECT: str(revision)})
            except nats.js.errors.APIError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
        for at in range(0, len(purge), PURGES_AT_ONCE):
            await asyncio.gather(*(js.purge(kv, s) for s in purge[at : at + PURGES_AT_ONCE]))
