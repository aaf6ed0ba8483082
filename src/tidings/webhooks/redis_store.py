"""The webhook store on Redis, shared by several tidings nodes: endpoints, retries, failed
marks and the attempt log, with the semantics of the SQLite ``WebhookStore``.

Keys, under ``<prefix>:wh``::

    endpoints                hash    endpoint id -> spec (``store.encode``)
    attempt-id               string  the last attempt id handed out (ids grow across nodes)
    tracked                  set     ids of endpoints with failed marks or attempts (for trim)
    ep:<id>:retries          hash    seq -> [number, due]
    ep:<id>:failed           zset    [seq, time, reason], scored by seq (one member per seq)
    ep:<id>:attempts         hash    member -> the attempt (``_row``)
    ep:<id>:by-id            zset    member, scored by attempt id     (newest first)
    ep:<id>:by-time          zset    member, scored by attempt time   (trim)
    ep:<id>:by-event         zset    member, all scored 0             (one event's, by lex)

An attempt's member is ``<seq:020d>:<id:020d>``: the same string in the hash and the three
indexes, so ``by-event`` orders one event's attempts by id and a lex range takes those below
an id. Per-endpoint key names end in one colon-free word, so no endpoint id can reach
another's keys.

Rules:
- A write that touches several keys is one MULTI/EXEC transaction; a read that needs an index
  and the rows it points to is one Lua script, so readers never see half of a write.
- Every write is idempotent (attempt ids are allocated before their rows are written), so
  redis-py's retry of a command whose reply was lost does no harm.
- The attempt log is batched as in SQLite: ``record`` buffers, ``run`` flushes one transaction
  per batch, writers wait while the flush is ``FLUSH_ROWS`` behind. A batch Redis refused stays
  buffered, with its ids, for the next flush; ``run`` logs the outage and keeps trying.
- Redis errors surface as ``Unavailable`` naming Redis and the URL (its password masked);
  ``open`` on an unreachable Redis raises ``ConfigError``.
- "Durable when this returns" means accepted by Redis: as durable as its persistence is
  configured (``appendonly yes`` for retries to survive a Redis restart).
- One Redis (primary, with replicas or Sentinel), not Redis Cluster: a transaction spans an
  endpoint's keys and the shared ``endpoints``/``tracked`` keys, which Cluster would put in
  different slots.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis.asyncio as redis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..exceptions import ConfigError, Unavailable
from .delivery import Attempt, Endpoint, Retry
from .store import Failed, ServerAttemptBuffer, Store, StoredAttempt, decode, encode, with_auth

TRIM_BATCH = 1000  # attempts one trim script removes (a script blocks Redis while it runs)

# KEYS: index zset, rows hash. ARGV: BYSCORE or BYLEX, max, min, limit.
# The members of the page, newest first, and their rows (HMGET in chunks: Lua's unpack has
# a stack limit).
PAGE = """
local members = redis.call('ZRANGE', KEYS[1], ARGV[2], ARGV[3], ARGV[1], 'REV',
                           'LIMIT', 0, ARGV[4])
local rows = {}
for i = 1, #members, 1000 do
    local chunk = redis.call('HMGET', KEYS[2], unpack(members, i, math.min(i + 999, #members)))
    for _, row in ipairs(chunk) do rows[#rows + 1] = row end
end
return {members, rows}
"""

# KEYS: failed, attempts, by-id, by-time, by-event, tracked. ARGV: low, max time (exclusive),
# batch, endpoint id. Removes the failed marks with seq <= low and up to a batch of attempts
# older than the time; forgets the endpoint in ``tracked`` once nothing is left to trim.
TRIM = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local members = redis.call('ZRANGE', KEYS[4], '-inf', ARGV[2], 'BYSCORE', 'LIMIT', 0, ARGV[3])
if #members > 0 then
    redis.call('HDEL', KEYS[2], unpack(members))
    redis.call('ZREM', KEYS[3], unpack(members))
    redis.call('ZREM', KEYS[4], unpack(members))
    redis.call('ZREM', KEYS[5], unpack(members))
end
if redis.call('EXISTS', KEYS[1], KEYS[3]) == 0 then
    redis.call('SREM', KEYS[6], ARGV[4])
end
return #members
"""


def masked(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        return with_auth(parts, f"{parts.username or ''}:***")
    except ValueError:
        return "<a Redis URL that cannot be parsed>"


def member(seq: int, id: int) -> str:
    return f"{seq:020d}:{id:020d}"


def _row(attempt: Attempt) -> bytes:
    """An attempt as stored: its fields as JSON, a newline (JSON from orjson has none), then
    the response head as raw bytes."""
    a = attempt
    head = [a.seq, a.number, float(a.time), float(a.duration), a.status, a.error,
            a.outcome.verdict.value, a.outcome.reason, a.trigger]  # fmt: skip
    return orjson.dumps(head) + b"\n" + a.response


def _stored(key: bytes, row: bytes) -> StoredAttempt:
    head, response = row.split(b"\n", 1)
    seq, number, time, duration, status, error, outcome, reason, trigger = orjson.loads(head)
    id = int(key[21:])  # after "<seq:020d>:"
    return StoredAttempt(id, seq, number, time, duration, status, error, response, outcome,
                         reason, trigger)  # fmt: skip


def _mark(seq: int, failed: Failed) -> bytes:
    return orjson.dumps([seq, float(failed.time), failed.reason])


class RedisWebhookStore(ServerAttemptBuffer[int], Store):
    """``url`` is a Redis URL (``redis://``, ``rediss://``, ``unix://``); every key starts with
    ``<prefix>:wh:``."""

    def __init__(self, url: str, prefix: str = "tidings") -> None:
        super().__init__()  # the attempt log's buffer: by attempt id
        self.url = url
        self.prefix = prefix
        self._key = f"{prefix}:wh"
        self._redis: redis.Redis | None = None

    # -- keys and errors -----------------------------------------------------------------------

    def _ep(self, id: str, what: str) -> str:
        return f"{self._key}:ep:{id}:{what}"

    def _attempt_keys(self, id: str) -> tuple[str, str, str, str]:
        """The attempts hash, and its by-id, by-time and by-event indexes."""
        return (self._ep(id, "attempts"), self._ep(id, "by-id"), self._ep(id, "by-time"),
                self._ep(id, "by-event"))  # fmt: skip

    def _keys_of(self, id: str) -> list[str]:
        return [self._ep(id, "retries"), self._ep(id, "failed"), *self._attempt_keys(id)]

    def _db(self) -> redis.Redis:
        assert self._redis is not None, "the webhook store is not open"
        return self._redis

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except RedisError as exc:
            if isinstance(exc, RedisConnectionError | RedisTimeoutError):
                what = f"cannot reach Redis at {masked(self.url)}"
            else:
                what = f"Redis at {masked(self.url)} answered with an error"
            raise Unavailable(f"webhook store, {doing}: {what}: {_one_line(exc)}") from exc

    async def _call(self, doing: str, awaitable: Awaitable[Any]) -> Any:
        with self._errors(doing):
            return await awaitable

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            client = redis.Redis.from_url(
                self.url,
                socket_connect_timeout=5.0,
                socket_timeout=10.0,
                # A few quick retries ride out a dropped connection without holding a shutdown.
                retry=RedisRetry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
            )
        except ValueError as exc:
            raise ConfigError(
                f"webhook store: {masked(self.url)} is not a Redis URL: {_one_line(exc)}"
            ) from None
        try:
            await client.ping()
        except RedisError as exc:
            await client.aclose()
            raise ConfigError(
                f"webhook store: cannot reach Redis at {masked(self.url)}: {_one_line(exc)}"
            ) from None
        self._page = client.register_script(PAGE)
        self._trim = client.register_script(TRIM)
        self._redis = client

    async def close(self) -> None:
        """Flush the attempt log, then disconnect. Attempts Redis refuses now are logged as
        lost rather than raised: shutting down must not wait for Redis to come back."""
        if self._redis is None:
            return
        try:
            await self._last_flush()
        finally:
            await self._redis.aclose()
            self._redis = None

    # -- endpoints -----------------------------------------------------------------------------

    async def endpoints(self) -> list[Endpoint]:
        specs: dict[bytes, bytes] = await self._call(
            "reading the endpoints", self._db().hgetall(f"{self._key}:endpoints")
        )
        # By id, as SQLite's table scan returns them.
        return [decode(id.decode(), spec) for id, spec in sorted(specs.items())]

    async def put(self, endpoint: Endpoint) -> None:
        key = f"{self._key}:endpoints"
        await self._call("storing an endpoint", self._db().hset(key, endpoint.id, encode(endpoint)))

    async def delete(self, id: str) -> None:
        """The endpoint and everything kept about it, in one transaction."""
        await self.flush()
        pipe = self._db().pipeline(transaction=True)
        pipe.delete(*self._keys_of(id))
        pipe.hdel(f"{self._key}:endpoints", id)
        pipe.srem(f"{self._key}:tracked", id)
        await self._call(f"deleting endpoint {id}", pipe.execute())

    # -- retries and failed marks --------------------------------------------------------------

    async def retries(self, endpoint: str) -> list[Retry]:
        stored: dict[bytes, bytes] = await self._call(
            "reading retries", self._db().hgetall(self._ep(endpoint, "retries"))
        )
        found = [Retry(int(seq), *orjson.loads(value)) for seq, value in stored.items()]
        return sorted(found, key=lambda r: r.seq)

    async def set_retry(self, endpoint: str, retry: Retry) -> None:
        value = orjson.dumps([retry.number, float(retry.due)])
        write = self._db().hset(self._ep(endpoint, "retries"), str(retry.seq), value)
        await self._call("storing a retry", write)

    async def settle(self, endpoint: str, seq: int, failed: Failed | None) -> None:
        """Drop ``seq``'s stored retry; mark it failed (``failed``) or no longer failed."""
        marks = self._ep(endpoint, "failed")
        pipe = self._db().pipeline(transaction=True)
        pipe.hdel(self._ep(endpoint, "retries"), str(seq))
        pipe.zremrangebyscore(marks, seq, seq)
        if failed is not None:
            pipe.zadd(marks, {_mark(seq, failed): seq})
            pipe.sadd(f"{self._key}:tracked", endpoint)
        await self._call("settling an event", pipe.execute())

    async def failed(self, endpoint: str, after: int, until: int, limit: int) -> list[Failed]:
        """Failed marks of ``endpoint`` with ``after < seq <= until``, oldest first."""
        read = self._db().zrange(
            self._ep(endpoint, "failed"), f"({after}", until, byscore=True, offset=0, num=limit
        )
        marks: list[bytes] = await self._call("reading failed marks", read)
        return [Failed(*orjson.loads(mark)) for mark in marks]

    # -- the attempt log -----------------------------------------------------------------------

    # ``record``, ``run`` and ``flush`` are ``ServerAttemptBuffer``'s; these give ids and write.

    async def _with_ids(self, batch: list[Attempt]) -> Iterable[tuple[int, Attempt]]:
        """Attempt ids for ``batch``: a range allocated at once, so ids grow across nodes."""
        last = await self._call(
            "allocating attempt ids", self._db().incrby(f"{self._key}:attempt-id", len(batch))
        )
        first = last - len(batch) + 1
        return zip(range(first, last + 1), batch, strict=True)

    async def _write_unwritten(self) -> None:
        await self._write(self._unwritten)
        self._unwritten = []

    async def _write(self, batch: Sequence[tuple[int, Attempt]]) -> None:
        by_endpoint: dict[str, list[tuple[int, Attempt]]] = {}
        for id, attempt in batch:
            by_endpoint.setdefault(attempt.endpoint, []).append((id, attempt))
        pipe = self._db().pipeline(transaction=True)
        for endpoint, attempts in by_endpoint.items():
            rows, by_id, by_time, by_event = self._attempt_keys(endpoint)
            members = [(member(a.seq, id), id, a) for id, a in attempts]
            pipe.hset(rows, mapping={m: _row(a) for m, _, a in members})
            pipe.zadd(by_id, {m: id for m, id, _ in members})
            pipe.zadd(by_time, {m: a.time for m, _, a in members})
            pipe.zadd(by_event, dict.fromkeys((m for m, _, _ in members), 0))
            pipe.sadd(f"{self._key}:tracked", endpoint)
        await self._call("writing the attempt log", pipe.execute())

    async def attempts(
        self, endpoint: str, seq: int | None, before: int | None, limit: int
    ) -> list[StoredAttempt]:
        """Attempts of ``endpoint`` (of event ``seq`` only, when given), newest first, with
        ids below ``before``."""
        self._db()
        await self.flush()
        if before is not None and before <= 1:
            return []  # ids start at 1
        rows, by_id, _, by_event = self._attempt_keys(endpoint)
        if seq is None:
            index = by_id
            args: list[Any] = ["BYSCORE", "+inf" if before is None else f"({before}", "-inf"]
        else:
            # One event's members share the prefix "<seq>:"; ";" sorts right after ":".
            top = f"({seq:020d};" if before is None else f"({member(seq, before)}"
            index, args = by_event, ["BYLEX", top, f"[{seq:020d}:"]
        page: list[list[bytes]] = await self._call(
            "reading the attempt log", self._page(keys=[index, rows], args=[*args, limit])
        )
        members, found = page
        return [_stored(m, row) for m, row in zip(members, found, strict=True) if row is not None]

    async def trim(self, before: float, low: int = 0) -> int:
        """Remove attempts older than ``before`` (unix seconds), and failed marks of events
        retention removed (``seq <= low``: nothing is left to replay); returns the attempts
        removed. Endpoint by endpoint, a batch at a time: other commands run in between."""
        db = self._db()
        tracked = f"{self._key}:tracked"
        with self._errors("trimming the attempt log"):
            ids = await db.smembers(tracked)
            removed = 0
            for raw in ids:
                id = raw.decode() if isinstance(raw, bytes) else raw
                rows, by_id, by_time, by_event = self._attempt_keys(id)
                keys = [self._ep(id, "failed"), rows, by_id, by_time, by_event, tracked]
                while True:
                    count: int = await self._trim(
                        keys=keys, args=[low, f"({float(before)!r}", TRIM_BATCH, id]
                    )
                    removed += count
                    if count < TRIM_BATCH:
                        break
        return removed


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
