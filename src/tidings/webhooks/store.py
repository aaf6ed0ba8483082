"""Where webhook endpoints and their delivery state live: the ``Store`` interface, and its
SQLite implementation (``redis_store`` and ``nats_store`` hold the ones several nodes share).

Rules:
- Endpoints (their secrets included), stored retries, failed marks and the attempt log live in
  the log's SQLite file beside the events (one file to back up), or in a private in-memory
  database when the log is in memory. Consumer cursors stay in the log's own table.
- One connection, used from one thread: every statement is short, and writes from delivery are
  batched (the attempt log is flushed by ``run`` in one transaction per batch).
- Attempt rows are observability: those not yet flushed when the process is killed are lost
  (at most one batch). Retries and failed marks are written before the call returns, because
  the delivery cursor moves past an event only once its retry is stored.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import SplitResult, urlunsplit

import orjson

from ..exceptions import ConfigError, Unavailable
from .delivery import Attempt, Endpoint, Retry, Secret
from .policy import Health, HealthState

logger = logging.getLogger("tidings.webhooks")

T = TypeVar("T")
Id = TypeVar("Id")

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_endpoints (id TEXT PRIMARY KEY, spec BLOB NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhook_retries (
    endpoint TEXT NOT NULL, seq INTEGER NOT NULL, number INTEGER NOT NULL, due REAL NOT NULL,
    PRIMARY KEY (endpoint, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhook_failed (
    endpoint TEXT NOT NULL, seq INTEGER NOT NULL, time REAL NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (endpoint, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhook_attempts (
    id INTEGER PRIMARY KEY,
    endpoint TEXT NOT NULL,
    seq INTEGER NOT NULL,
    number INTEGER NOT NULL,
    time REAL NOT NULL,
    duration REAL NOT NULL,
    status INTEGER,
    error TEXT,
    response BLOB NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    trigger TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_attempts_endpoint ON webhook_attempts (endpoint, id);
CREATE INDEX IF NOT EXISTS webhook_attempts_event ON webhook_attempts (endpoint, seq, id);
CREATE INDEX IF NOT EXISTS webhook_attempts_time ON webhook_attempts (time);
"""

FLUSH_ROWS = 2000  # a writer that gets this far ahead of the flush waits for it
RETRY_PAUSE = 1.0  # seconds ``run`` waits after the store refused a flush (``Unavailable``)


@dataclass(frozen=True, slots=True)
class StoredAttempt:
    id: int
    seq: int
    number: int
    time: float
    duration: float
    status: int | None
    error: str | None
    response: bytes
    outcome: str
    reason: str
    trigger: str


@dataclass(frozen=True, slots=True)
class Failed:
    seq: int
    time: float
    reason: str


class Store(Protocol):
    """What the webhook service needs from a store, and what each implementation promises."""

    async def open(self) -> None:
        """Ready to use; ``ConfigError`` when the store cannot be opened or reached."""

    async def close(self) -> None:
        """Flush the attempt log, then release the store."""

    async def endpoints(self) -> list[Endpoint]:
        """Every stored endpoint, by id."""

    async def put(self, endpoint: Endpoint) -> None:
        """Store ``endpoint``, replacing the one with its id."""

    async def delete(self, id: str) -> None:
        """The endpoint and everything kept about it (retries, failed marks, attempts), at
        once."""

    async def retries(self, endpoint: str) -> list[Retry]:
        """The stored retries of ``endpoint``, by ``seq``."""

    async def set_retry(self, endpoint: str, retry: Retry) -> None:
        """Store ``retry``, replacing the one of its ``seq``; durable when this returns."""

    async def settle(self, endpoint: str, seq: int, failed: Failed | None) -> None:
        """Drop ``seq``'s stored retry; mark it failed (``failed``) or no longer failed, at
        once; durable when this returns."""

    async def failed(self, endpoint: str, after: int, until: int, limit: int) -> list[Failed]:
        """Failed marks of ``endpoint`` with ``after < seq <= until``, oldest first, at most
        ``limit`` (a negative ``limit``: all)."""

    async def record(self, attempt: Attempt) -> None:
        """Buffer ``attempt`` for the next flush; waits when the flush has fallen behind."""

    async def run(self, stopping: asyncio.Event) -> None:
        """Flush buffered attempts as they come, until ``stopping``."""

    async def flush(self) -> None:
        """Write the buffered attempts now."""

    async def attempts(
        self, endpoint: str, seq: int | None, before: int | None, limit: int
    ) -> list[StoredAttempt]:
        """Attempts of ``endpoint`` (of event ``seq`` only, when given), newest first (by id,
        which grows in the order attempts were recorded), with ids below ``before``, at most
        ``limit``; the buffered ones included."""

    async def trim(self, before: float, low: int = 0) -> int:
        """Remove attempts older than ``before`` (unix seconds), and failed marks of events
        retention removed (``seq <= low``); returns the attempts removed."""


class AttemptBuffer:
    """The attempt log's buffering, shared by the stores: ``record`` buffers, ``run`` flushes
    as attempts come, writers wait while the flush is ``FLUSH_ROWS`` behind. ``flush`` is the
    store's: it writes the buffer and then sets ``_flushed``."""

    def __init__(self) -> None:
        self._buffer: list[Attempt] = []
        self._dirty = asyncio.Event()
        self._flushed = asyncio.Event()

    def _waiting(self) -> int:
        """How many recorded attempts are not written yet."""
        return len(self._buffer)

    async def record(self, attempt: Attempt) -> None:
        """Buffer ``attempt`` for the next flush; waits when the flush has fallen behind."""
        self._buffer.append(attempt)
        self._dirty.set()
        while self._waiting() >= FLUSH_ROWS:
            self._flushed.clear()
            await self._flushed.wait()

    async def run(self, stopping: asyncio.Event) -> None:
        """Flush buffered attempts as they come, until ``stopping``; while the store refuses
        (``Unavailable``), log it and try again every ``RETRY_PAUSE`` seconds (the writers wait
        meanwhile)."""
        while not stopping.is_set():
            await _first(self._dirty.wait(), stopping.wait())
            try:
                await self.flush()
            except Unavailable as exc:
                logger.warning("%s; %d attempts wait to be written", exc.detail, self._waiting())
                self._dirty.set()
                await _first(asyncio.sleep(RETRY_PAUSE), stopping.wait())

    async def flush(self) -> None:
        """Write the buffered attempts now, then set ``_flushed``."""
        raise NotImplementedError


class ServerAttemptBuffer(AttemptBuffer, Generic[Id]):
    """The buffering of a store on a server, which gives each attempt an id (its attempt id, a
    message id) before writing it: attempts given ids but not written (the server refused them)
    stay in ``_unwritten``, with their ids, for the next flush, ahead of those recorded since.
    One flush at a time, so ids follow the record order.

    The store says how a batch gets its ids (``_with_ids``; when that fails, the batch goes
    back to the buffer) and how ``_unwritten`` is written (``_write_unwritten``; what it could
    not write stays there)."""

    def __init__(self) -> None:
        super().__init__()
        self._unwritten: list[tuple[Id, Attempt]] = []  # ids given, not written yet
        self._flushing = asyncio.Lock()

    def _waiting(self) -> int:
        return len(self._buffer) + len(self._unwritten)

    async def _with_ids(self, batch: list[Attempt]) -> Iterable[tuple[Id, Attempt]]:
        raise NotImplementedError

    async def _write_unwritten(self) -> None:
        raise NotImplementedError

    async def flush(self) -> None:
        async with self._flushing:
            self._dirty.clear()
            if self._buffer:
                batch, self._buffer = self._buffer, []
                try:
                    self._unwritten.extend(await self._with_ids(batch))
                except BaseException:
                    self._buffer[:0] = batch
                    raise
            if self._unwritten:
                await self._write_unwritten()
            self._flushed.set()

    async def _last_flush(self) -> None:
        """Flush before closing: attempts the store refuses now are logged as lost rather than
        raised, since shutting down must not wait for the server to come back."""
        try:
            await self.flush()
        except Unavailable as exc:
            lost = self._waiting()
            logger.warning("%s; %d attempts not written to the attempt log", exc.detail, lost)


async def _first(*waits: Awaitable[Any]) -> None:
    """Until the first of ``waits`` is done; the others are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def with_auth(parts: SplitResult, auth: str) -> str:
    """The URL of ``parts`` with ``auth`` (a masked ``user:***``) as its user part, for messages
    and logs; ValueError when its port is not a number."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{auth}@{host}{port}"))


def encode(endpoint: Endpoint) -> bytes:
    health = endpoint.health
    return orjson.dumps(
        {
            "url": endpoint.url,
            "channels": endpoint.channels,
            "secrets": [[s.value, s.created, s.expires] for s in endpoint.secrets],
            "types": endpoint.types,
            "headers": endpoint.headers,
            "description": endpoint.description,
            "rate_limit": float(endpoint.rate_limit),
            "concurrency": endpoint.concurrency,
            "strict_order": endpoint.strict_order,
            "timeout": float(endpoint.timeout),
            "health": [health.health.value, health.failing_since, health.reason],
            "created": endpoint.created,
            "updated": endpoint.updated,
        }
    )


def decode(id: str, spec: bytes) -> Endpoint:
    d = orjson.loads(spec)
    health, since, reason = d["health"]
    return Endpoint(
        id=id,
        url=d["url"],
        channels=tuple(d["channels"]),
        secrets=tuple(Secret(v, c, e) for v, c, e in d["secrets"]),
        types=tuple(d["types"]),
        headers=tuple((k, v) for k, v in d["headers"]),
        description=d["description"],
        rate_limit=d["rate_limit"],
        concurrency=d["concurrency"],
        strict_order=d["strict_order"],
        timeout=d["timeout"],
        health=HealthState(Health(health), since, reason),
        created=d["created"],
        updated=d["updated"],
    )


class WebhookStore(AttemptBuffer):
    """``path`` is the log's SQLite file, or ``:memory:``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tidings-webhook-store")
        self._conn: sqlite3.Connection | None = None

    async def _on(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None, "the webhook store is not open"
        return self._conn

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await self._on(self._open_sync)
        except sqlite3.Error as exc:
            raise ConfigError(
                f"log.path {self.path!r}: cannot open the webhook tables: {exc}"
            ) from None

    def _open_sync(self) -> None:
        conn = self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA busy_timeout = 5000")
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(SCHEMA)

    async def close(self) -> None:
        await self.flush()
        await self._on(self._close_sync)
        self._thread.shutdown(wait=True)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- endpoints -----------------------------------------------------------------------------

    async def endpoints(self) -> list[Endpoint]:
        rows = await self._on(
            lambda: self._db().execute("SELECT id, spec FROM webhook_endpoints").fetchall()
        )
        return [decode(id, spec) for id, spec in rows]

    async def put(self, endpoint: Endpoint) -> None:
        sql = "INSERT OR REPLACE INTO webhook_endpoints (id, spec) VALUES (?, ?)"
        spec = encode(endpoint)
        await self._on(lambda: self._db().execute(sql, (endpoint.id, spec)))

    async def delete(self, id: str) -> None:
        """The endpoint and everything kept about it."""
        await self.flush()
        await self._on(self._delete_sync, id)

    def _delete_sync(self, id: str) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            for table in ("webhook_retries", "webhook_failed", "webhook_attempts"):
                db.execute(f"DELETE FROM {table} WHERE endpoint = ?", (id,))
            db.execute("DELETE FROM webhook_endpoints WHERE id = ?", (id,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- retries and failed marks --------------------------------------------------------------

    async def retries(self, endpoint: str) -> list[Retry]:
        sql = "SELECT seq, number, due FROM webhook_retries WHERE endpoint = ? ORDER BY seq"
        rows = await self._on(lambda: self._db().execute(sql, (endpoint,)).fetchall())
        return [Retry(*row) for row in rows]

    async def set_retry(self, endpoint: str, retry: Retry) -> None:
        sql = "INSERT OR REPLACE INTO webhook_retries VALUES (?, ?, ?, ?)"
        row = (endpoint, retry.seq, retry.number, retry.due)
        await self._on(lambda: self._db().execute(sql, row))

    async def settle(self, endpoint: str, seq: int, failed: Failed | None) -> None:
        """Drop ``seq``'s stored retry; mark it failed (``failed``) or no longer failed."""
        await self._on(self._settle_sync, endpoint, seq, failed)

    def _settle_sync(self, endpoint: str, seq: int, failed: Failed | None) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "DELETE FROM webhook_retries WHERE endpoint = ? AND seq = ?", (endpoint, seq)
            )
            if failed is None:
                db.execute(
                    "DELETE FROM webhook_failed WHERE endpoint = ? AND seq = ?", (endpoint, seq)
                )
            else:
                db.execute(
                    "INSERT OR REPLACE INTO webhook_failed VALUES (?, ?, ?, ?)",
                    (endpoint, seq, failed.time, failed.reason),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def failed(self, endpoint: str, after: int, until: int, limit: int) -> list[Failed]:
        """Failed marks of ``endpoint`` with ``after < seq <= until``, oldest first."""
        sql = (
            "SELECT seq, time, reason FROM webhook_failed "
            "WHERE endpoint = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
        )
        args = (endpoint, after, until, limit)
        rows = await self._on(lambda: self._db().execute(sql, args).fetchall())
        return [Failed(*row) for row in rows]

    # -- the attempt log -----------------------------------------------------------------------

    async def flush(self) -> None:
        self._dirty.clear()
        if self._buffer:
            batch, self._buffer = self._buffer, []
            await self._on(self._flush_sync, batch)
        self._flushed.set()

    def _flush_sync(self, batch: Sequence[Attempt]) -> None:
        db = self._db()
        rows = [
            (a.endpoint, a.seq, a.number, a.time, a.duration, a.status, a.error, a.response,
             a.outcome.verdict.value, a.outcome.reason, a.trigger)
            for a in batch
        ]  # fmt: skip
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO webhook_attempts (endpoint, seq, number, time, duration, status, "
                "error, response, outcome, reason, trigger) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def attempts(
        self, endpoint: str, seq: int | None, before: int | None, limit: int
    ) -> list[StoredAttempt]:
        """Attempts of ``endpoint`` (of event ``seq`` only, when given), newest first, with
        ids below ``before``."""
        await self.flush()
        where = "endpoint = ?"
        args: list[Any] = [endpoint]
        if seq is not None:
            where += " AND seq = ?"
            args.append(seq)
        if before is not None:
            where += " AND id < ?"
            args.append(before)
        sql = (
            "SELECT id, seq, number, time, duration, status, error, response, outcome, reason, "
            f"trigger FROM webhook_attempts WHERE {where} ORDER BY id DESC LIMIT ?"
        )
        rows = await self._on(lambda: self._db().execute(sql, (*args, limit)).fetchall())
        return [StoredAttempt(*row) for row in rows]

    async def trim(self, before: float, low: int = 0) -> int:
        """Remove attempts older than ``before`` (unix seconds), and failed marks of events
        retention removed (``seq <= low``: nothing is left to replay); returns the attempts
        removed."""
        return await self._on(self._trim_sync, before, low)

    def _trim_sync(self, before: float, low: int) -> int:
        db = self._db()
        db.execute("DELETE FROM webhook_failed WHERE seq <= ?", (low,))
        removed: int = db.execute("DELETE FROM webhook_attempts WHERE time < ?", (before,)).rowcount
        return removed
