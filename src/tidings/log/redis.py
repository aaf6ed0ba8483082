"""The Redis Log: one Redis stream shared by every tidings node of a deployment.

Layout, under ``{prefix}:log:`` (default prefix ``tidings``):
- ``stream``: the events, with stream ids ``0-<seq>``, so ids are our sequence numbers and
  ``XRANGE``/``XREAD`` address events by cursor directly;
- ``meta``: a hash with the ``epoch``, the last ``seq`` given out and ``low``;
- ``consumers``: a hash of durable consumer positions;
- ``idem:<channel>:<key>``: idempotency keys, ``"<epoch> <seq> <time>"``, expiring with the
  window.

Appends run as one Lua script, which Redis executes atomically (one script for all the appends
waiting on a node: group commit): it checks idempotency keys,
numbers the events, adds them to the stream and trims it by count, so concurrent publishers on
any node get one global order and a batch stays contiguous. A stream that is gone (deleted,
flushed, or a Redis restarted without persistence) is recreated by the next script with a new
epoch and an empty consumer table: cursors from before are then reported as "continuity lost".

Durability is Redis's: an acknowledged append is in the primary's memory, and on disk as the
server's ``appendonly``/``appendfsync`` settings say; ``replicas`` > 0 adds ``WAIT`` so the
acknowledgement also means that many replicas have it (see ``docs/cluster.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..events import Draft, Event
from ..exceptions import ConfigError, Unavailable
from . import Appended, LogStats
from .shared import EpochChanged, SharedLog

FOLLOW_BLOCK_MS = 1000  # an idle follower returns this often to check the epoch
FOLLOW_COUNT = 1000
MAX_CONNECTIONS = 32  # per node, besides the follower's own
GROUP = 1000  # drafts per append script at most (one request's batch may be larger)

# KEYS: stream, meta, consumers. ARGV: candidate epoch. Returns the epoch.
_ENSURE = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if epoch and redis.call('EXISTS', KEYS[1]) == 1 then
  return epoch
end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('HSET', KEYS[2], 'epoch', ARGV[1], 'seq', 0, 'low', 0)
redis.call('XGROUP', 'CREATE', KEYS[1], 'tidings', '$', 'MKSTREAM')
redis.call('XGROUP', 'DESTROY', KEYS[1], 'tidings')
return ARGV[1]
"""

# KEYS: stream, meta, consumers, then one idempotency key per draft ('' fields when none).
# ARGV: candidate epoch, window ms, max events, then 6 fields per draft:
#       channel, type, content type, data, time, idempotency key ('' for none).
# Returns {epoch, {created, seq, [fields of the logged event when a replay]}...}.
_APPEND = """
local stream, meta = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch or redis.call('EXISTS', stream) == 0 then
  epoch = ARGV[1]
  redis.call('DEL', stream, KEYS[3])
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'low', 0)
end
local window, max_events = tonumber(ARGV[2]), tonumber(ARGV[3])
local seq = tonumber(redis.call('HGET', meta, 'seq'))
local out = {epoch}
local n = (#ARGV - 3) / 6
for i = 0, n - 1 do
  local a = 4 + i * 6
  local key = ARGV[a + 5]
  local replay = nil
  if key ~= '' then
    local seen = redis.call('GET', KEYS[4 + i])
    if seen then
      local e, logged, at = string.match(seen, '^(%S+) (%d+) (%S+)$')
      if e == epoch and tonumber(ARGV[a + 4]) - tonumber(at) <= window / 1000 then
        local id = '0-' .. logged
        local found = redis.call('XRANGE', stream, id, id)
        if #found == 1 then replay = found[1] end
      end
    end
  end
  if replay then
    table.insert(out, {0, replay[1], replay[2]})
  else
    seq = seq + 1
    redis.call('XADD', stream, '0-' .. seq, 'c', ARGV[a], 't', ARGV[a + 1], 'ct', ARGV[a + 2],
               'd', ARGV[a + 3], 'at', ARGV[a + 4], 'k', key)
    if key ~= '' then
      redis.call('SET', KEYS[4 + i], epoch .. ' ' .. seq .. ' ' .. ARGV[a + 4], 'PX', window)
    end
    table.insert(out, {1, seq})
  end
end
redis.call('HSET', meta, 'seq', seq)
if max_events > 0 and seq > max_events then
  local low = seq - max_events
  if low > tonumber(redis.call('HGET', meta, 'low')) then
    redis.call('XTRIM', stream, 'MINID', '0-' .. (low + 1))
    redis.call('HSET', meta, 'low', low)
  end
end
return out
"""

# KEYS: stream, meta. ARGV: epoch, cutoff time. Removes events older than the cutoff.
_TRIM_AGE = """
if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[1] then return 0 end
local cutoff = tonumber(ARGV[2])
local removed, last = 0, nil
while true do
  local page = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 500)
  local stop = #page == 0
  for _, entry in ipairs(page) do
    local fields = entry[2]
    local at = nil
    for j = 1, #fields, 2 do
      if fields[j] == 'at' then at = tonumber(fields[j + 1]) end
    end
    if at >= cutoff then stop = true break end
    last = entry[1]
    removed = removed + 1
  end
  if last then
    local low = tonumber(string.sub(last, 3))
    redis.call('XTRIM', KEYS[1], 'MINID', '0-' .. (low + 1))
    if low > tonumber(redis.call('HGET', KEYS[2], 'low')) then
      redis.call('HSET', KEYS[2], 'low', low)
    end
  end
  if stop then break end
end
return removed
"""


def _text(value: bytes) -> str:
    return value.decode()


class RedisLog(SharedLog):
    engine_name = "Redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "tidings",
        max_events: int = 1_000_000,
        max_age: float = 3 * 86_400,
        idempotency_window: float = 86_400,
        replicas: int = 0,
        replica_timeout: float = 1.0,
        cache_events: int = 10_000,
    ) -> None:
        super().__init__(cache_events=cache_events)
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"the Redis log needs a redis:// or rediss:// URL, not {url!r}")
        self.url = url
        base = f"{prefix}:log:"
        self._stream = base + "stream"
        self._meta = base + "meta"
        self._consumers = base + "consumers"
        self._idem = base + "idem:"
        self._max_events = max_events
        self._max_age = max_age
        self._window_ms = max(1, round(idempotency_window * 1000))
        self._replicas = replicas
        self._replica_timeout_ms = round(replica_timeout * 1000)
        self._redis: aioredis.Redis | None = None
        self._follow_connection: Any = None
        self._queue: deque[tuple[Sequence[Draft], asyncio.Future[list[Appended]]]] = deque()
        self._queued = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._scripts: dict[str, Any] = {}

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise Unavailable("the Redis log is not open")
        return self._redis

    def _unavailable(self, exc: Exception) -> Unavailable:
        return Unavailable(f"the log's Redis at {self.url} is unavailable: {exc}")

    # -- engine --------------------------------------------------------------------------------

    async def _engine_open(self) -> tuple[str, int]:
        # A blocking pool: a burst of concurrent appends waits for a connection instead of
        # failing; health_check_interval checks a connection idle in the pool before reuse.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=MAX_CONNECTIONS, timeout=5,
            health_check_interval=10, socket_connect_timeout=5,
        )  # fmt: skip
        self._redis = aioredis.Redis(connection_pool=pool)
        for name, source in (("ensure", _ENSURE), ("append", _APPEND), ("trim", _TRIM_AGE)):
            self._scripts[name] = self._redis.register_script(source)
        try:
            epoch = _text(await self._ensure())
            head = await self._engine_head()
        except RedisError as exc:
            await self._engine_close()
            raise ConfigError(f"log: cannot use Redis at {self.url}: {exc}") from None
        self._writer = asyncio.create_task(self._write_loop(), name="tidings-redis-writer")
        return epoch, head

    async def _ensure(self) -> bytes:
        keys = [self._stream, self._meta, self._consumers]
        result: bytes = await self._scripts["ensure"](keys, [secrets.token_hex(4)])
        return result

    async def _engine_close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        while self._queue:
            _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(Unavailable("the Redis log is closed"))
        if self._redis is not None:
            redis, self._redis = self._redis, None
            await redis.aclose()
            await redis.connection_pool.disconnect()

    async def _engine_append(self, drafts: Sequence[Draft]) -> list[Appended]:
        # Group commit: requests queue here and the writer sends all that are waiting as one
        # script call, so a busy node pays one round trip and one script run for many publishes
        # (one call per request measured 276-340 us of node CPU per publish).
        future: asyncio.Future[list[Appended]] = asyncio.get_running_loop().create_future()
        self._queue.append((drafts, future))
        self._queued.set()
        return await future

    async def _write_loop(self) -> None:
        """The writer: one script call at a time, for every append waiting when it starts."""
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self._queue:
                batch: list[tuple[Sequence[Draft], asyncio.Future[list[Appended]]]] = []
                count = 0
                while self._queue and (not batch or count + len(self._queue[0][0]) <= GROUP):
                    request = self._queue.popleft()
                    if not request[1].done():  # a cancelled publish is not sent
                        batch.append(request)
                        count += len(request[0])
                if not batch:
                    continue
                try:
                    results = await self._append_all([d for drafts, _ in batch for d in drafts])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for drafts, future in batch:
                    if not future.done():
                        future.set_result(results[start : start + len(drafts)])
                    start += len(drafts)

    async def _append_all(self, drafts: Sequence[Draft]) -> list[Appended]:
        keys = [self._stream, self._meta, self._consumers]
        args: list[Any] = [secrets.token_hex(4), self._window_ms, self._max_events]
        for draft in drafts:
            key = draft.idempotency_key or ""
            keys.append(f"{self._idem}{draft.channel}:{key}" if key else self._idem)
            args += [draft.channel, draft.type, draft.content_type, draft.data, repr(draft.time),
                     key]  # fmt: skip
        try:
            result = await self._scripts["append"](keys, args)
            if self._replicas:
                await self._wait_replicas()
        except RedisError as exc:
            raise self._unavailable(exc) from None
        epoch = _text(result[0])
        out: list[Appended] = []
        for draft, (created, *rest) in zip(drafts, result[1:], strict=True):
            if created:
                out.append(Appended(Event.from_draft(draft, epoch, int(rest[0])), True))
            else:
                out.append(Appended(self._decode(epoch, rest[0], rest[1]), False))
        last = max((a.event.seq for a in out if a.created), default=0)
        if self._max_events and last > self._max_events:
            self._trimmed(last - self._max_events)
        return out

    async def _wait_replicas(self) -> None:
        acked = await self._client().execute_command(  # type: ignore[no-untyped-call]
            "WAIT", self._replicas, self._replica_timeout_ms
        )
        if int(acked) < self._replicas:
            raise Unavailable(
                f"the log's Redis at {self.url}: only {acked} of {self._replicas} replicas "
                "confirmed the append in time; it is on the primary, retry with the same "
                "Idempotency-Key"
            )

    def _decode(self, epoch: str, id: bytes, fields: Sequence[bytes] | dict[bytes, bytes]) -> Event:
        if not isinstance(fields, dict):
            fields = dict(zip(fields[::2], fields[1::2], strict=True))
        key = fields[b"k"]
        return Event(
            epoch,
            int(id[2:]),
            fields[b"c"].decode(),
            fields[b"t"].decode(),
            fields[b"d"],
            fields[b"ct"].decode(),
            float(fields[b"at"]),
            key.decode() if key else None,
        )

    async def _engine_range(self, after: int, limit: int) -> list[Event]:
        try:
            entries: Any = await self._client().xrange(self._stream, f"0-{after + 1}", "+", limit)
        except RedisError as exc:
            raise self._unavailable(exc) from None
        epoch = self._epoch
        return [self._decode(epoch, id, fields) for id, fields in entries]

    async def _engine_head(self) -> int:
        try:
            seq = await self._client().hget(self._meta, "seq")
        except RedisError as exc:
            raise self._unavailable(exc) from None
        return int(seq or 0)

    async def low(self) -> int:
        try:
            low = int(await self._client().hget(self._meta, "low") or 0)
        except RedisError as exc:
            raise self._unavailable(exc) from None
        self._trimmed(low)
        return low

    async def _engine_epoch(self) -> str:
        try:
            return _text(await self._ensure())
        except RedisError as exc:
            raise self._unavailable(exc) from None

    async def _engine_follow(self, after: int) -> AsyncIterator[list[Event]]:
        # A bare connection of its own (XREAD BLOCK holds it), closed by ``_engine_interrupt``.
        connection = self._follow_connection = aioredis.ConnectionPool.from_url(
            self.url, socket_connect_timeout=5
        ).make_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.connect()
            epoch = self._epoch
            while not self._closing:
                await connection.send_command(
                    "XREAD", "COUNT", FOLLOW_COUNT, "BLOCK", FOLLOW_BLOCK_MS,
                    "STREAMS", self._stream, f"0-{after}",
                )  # fmt: skip
                reply: Any = await connection.read_response()
                if not reply:
                    yield []
                    if self._epoch != epoch:
                        raise EpochChanged(self._epoch)
                    continue
                # RESP3 answers a map of stream to entries, RESP2 a list of pairs.
                [entries] = reply.values() if isinstance(reply, dict) else [reply[0][1]]
                batch = [self._decode(epoch, id, fields) for id, fields in entries]
                after = batch[-1].seq
                yield batch
        finally:
            # May run late: a generator the follower left by an exception (EpochChanged) is
            # closed by the event loop, when the next one already follows on its own
            # connection, which ``_engine_interrupt`` must still find.
            if self._follow_connection is connection:
                self._follow_connection = None
            await connection.disconnect(nowait=True)

    async def _engine_interrupt(self) -> None:
        if self._follow_connection is not None:
            await self._follow_connection.disconnect(nowait=True)

    # -- retention, consumers, stats -----------------------------------------------------------

    async def trim(self, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - self._max_age
        try:
            removed = await self._scripts["trim"]([self._stream, self._meta], [self._epoch, cutoff])
        except RedisError as exc:
            raise self._unavailable(exc) from None
        await self.low()  # drops what went from this node's cache
        return int(removed)

    async def stats(self) -> LogStats:
        try:
            async with self._client().pipeline(transaction=False) as pipe:
                pipe.xlen(self._stream)
                pipe.hmget(self._meta, ["seq", "low"])
                count, (head, low) = await pipe.execute()
        except RedisError as exc:
            raise self._unavailable(exc) from None
        return LogStats(events=int(count), head=int(head or 0), low=int(low or 0))

    async def get_consumer(self, name: str) -> int | None:
        try:
            value = await self._client().hget(self._consumers, name)
        except RedisError as exc:
            raise self._unavailable(exc) from None
        return None if value is None else int(value)

    async def set_consumer(self, name: str, seq: int) -> None:
        try:
            await self._client().hset(self._consumers, name, seq)
        except RedisError as exc:
            raise self._unavailable(exc) from None

    async def delete_consumer(self, name: str) -> None:
        try:
            await self._client().hdel(self._consumers, name)
        except RedisError as exc:
            raise self._unavailable(exc) from None
