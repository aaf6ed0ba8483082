"""The SQLite Log, the default: one file, WAL, group commit, a cache of recent events.

Rules:
- One writer thread owns the write connection. Appends queue up while a transaction runs and the
  next transaction takes them all (group commit); each append returns only once its transaction
  has committed. ``durability="normal"`` is ``synchronous=NORMAL`` (survives a killed process,
  may lose the last commits on power loss); ``"full"`` is ``synchronous=FULL`` (survives both).
- Reads near the head are served from ``Tail``, an in-memory window of recent committed events;
  older reads go to a small pool of reader threads (WAL lets them run beside the writer).
- Sequence numbers are contiguous: ``(low, head]`` is exactly what the file holds.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from ..events import Draft, Event, Pattern
from ..exceptions import ConfigError
from . import Appended, CommitListener, LogStats, notify
from .memory import Tail, new_epoch, select

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    type TEXT NOT NULL,
    content_type TEXT NOT NULL,
    data BLOB NOT NULL,
    time REAL NOT NULL,
    idem TEXT
);
CREATE INDEX IF NOT EXISTS events_idem ON events (channel, idem) WHERE idem IS NOT NULL;
CREATE TABLE IF NOT EXISTS consumers (name TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
"""

COLUMNS = "seq, channel, type, content_type, data, time, idem"
TRIM_CHUNK = 10_000  # rows deleted per transaction, so trimming never stalls appends for long

Request = tuple[Sequence[Draft], "asyncio.Future[list[Appended]]"]


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class SQLiteLog:
    def __init__(
        self,
        path: str = "tidings.db",
        *,
        durability: Literal["normal", "full"] = "normal",
        max_events: int = 1_000_000,
        max_age: float = 3 * 86_400,
        idempotency_window: float = 86_400,
        cache_events: int = 10_000,
        cache_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        if durability not in ("normal", "full"):
            raise ConfigError(f"log durability must be 'normal' or 'full', not {durability!r}")
        self.path = path
        self._synchronous = durability.upper()
        self._max_events = max_events
        self._max_age = max_age
        self._idempotency_window = idempotency_window
        self._cache_events = cache_events
        self._cache_bytes = cache_bytes
        self._epoch = ""
        self._head = 0
        self._low = 0
        self._tail = Tail()
        self._tail_bytes = 0
        self._listeners: list[CommitListener] = []
        self._pending: list[Request] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._writer_task: asyncio.Task[None] | None = None
        # Single-thread executor: the write connection is only ever used from that thread.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tidings-sqlite-writer")
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="tidings-sqlite-reader")
        self._wconn: sqlite3.Connection | None = None
        self._local = threading.local()
        self._rconns: list[sqlite3.Connection] = []
        self._rconns_lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            conn.execute("PRAGMA query_only = ON")
            with self._rconns_lock:
                self._rconns.append(conn)
        return conn

    async def _on(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    @property
    def epoch(self) -> str:
        return self._epoch

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            recent = await self._on(self._writer, self._open_sync)
        except (sqlite3.Error, OSError) as exc:
            self._close_sync()
            raise ConfigError(
                f"log.path {self.path!r}: cannot open the SQLite log: {exc}"
            ) from None
        self._cache(recent)
        self._writer_task = asyncio.create_task(self._write_loop(), name="tidings-sqlite-writer")

    def _open_sync(self) -> list[Event]:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        conn = self._wconn = self._connect()
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise ConfigError(f"SQLite log {self.path}: could not enable WAL (got {mode})")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.executescript(SCHEMA)
        conn.execute("BEGIN IMMEDIATE")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if "epoch" not in meta:
            meta = {"epoch": new_epoch(), "low": "0"}
            conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        conn.execute("COMMIT")
        self._epoch = meta["epoch"]
        self._low = int(meta["low"])
        top = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
        self._head = max(self._low, top or 0)
        rows = conn.execute(
            f"SELECT {COLUMNS} FROM events ORDER BY seq DESC LIMIT ?", (self._cache_events,)
        ).fetchall()
        return [self._event(row) for row in reversed(rows)]

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._writer_task is not None:
            await self._writer_task
            self._writer_task = None
        await self._on(self._writer, self._close_sync)
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._rconns_lock:
            for conn in self._rconns:
                conn.close()
            self._rconns.clear()

    def _close_sync(self) -> None:
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None

    def listen(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def on_discontinuity(self, listener: Callable[[str], None]) -> None:
        pass  # one process's log: its listeners see every event

    # -- appends (group commit) ----------------------------------------------------------------

    async def append(self, drafts: Sequence[Draft]) -> list[Appended]:
        if self._closing or self._writer_task is None:
            raise RuntimeError("the SQLite log is not open")
        future: asyncio.Future[list[Appended]] = asyncio.get_running_loop().create_future()
        self._pending.append((drafts, future))
        self._wakeup.set()
        # Shielded: a cancelled publisher must not leave a committed batch half-acknowledged.
        return await asyncio.shield(future)

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._on(self._writer, self._write_sync, batch)
                except Exception as exc:  # a failed transaction fails its publishes, not the hub
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                new = [a.event for result in results for a in result if a.created]
                if new:
                    self._head = new[-1].seq
                    self._cache(new)
                    notify(self._listeners, new)
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
            if self._closing:
                return

    def _write_sync(self, batch: list[Request]) -> list[list[Appended]]:
        conn = self._wconn
        assert conn is not None
        seq = self._head  # only this thread advances it, via the loop after commit
        rows: list[tuple[Any, ...]] = []
        seen: dict[tuple[str, str], Event] = {}
        results: list[list[Appended]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for drafts, _ in batch:
                result: list[Appended] = []
                for draft in drafts:
                    key = draft.idempotency_key
                    if key is not None:
                        earlier = seen.get((draft.channel, key)) or self._find_key(conn, draft)
                        if earlier is not None:
                            result.append(Appended(earlier, False))
                            continue
                    seq += 1
                    event = Event.from_draft(draft, self._epoch, seq)
                    if key is not None:
                        seen[(draft.channel, key)] = event
                    rows.append(
                        (seq, draft.channel, draft.type, draft.content_type, draft.data,
                         draft.time, key)
                    )  # fmt: skip
                    result.append(Appended(event, True))
                results.append(result)
            conn.executemany(f"INSERT INTO events ({COLUMNS}) VALUES (?,?,?,?,?,?,?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return results

    def _find_key(self, conn: sqlite3.Connection, draft: Draft) -> Event | None:
        row = conn.execute(
            f"SELECT {COLUMNS} FROM events WHERE channel = ? AND idem = ? "
            "ORDER BY seq DESC LIMIT 1",
            (draft.channel, draft.idempotency_key),
        ).fetchone()
        if row is None or draft.time - row[5] > self._idempotency_window:
            return None
        return self._event(row)

    def _event(self, row: tuple[Any, ...]) -> Event:
        seq, channel, type_, content_type, data, at, idem = row
        return Event(self._epoch, seq, channel, type_, bytes(data), content_type, at, idem)

    # -- the cache of recent events ------------------------------------------------------------

    def _cache(self, events: Sequence[Event]) -> None:
        tail = self._tail
        tail.extend(events)
        self._tail_bytes += sum(len(e.data) for e in events)
        excess = len(tail) - self._cache_events
        while excess > 0 or (self._tail_bytes > self._cache_bytes and len(tail) > 1):
            dropped = tail.drop_first(max(excess, 1))
            self._tail_bytes -= sum(len(e.data) for e in dropped)
            excess = len(tail) - self._cache_events

    def _uncache_through(self, seq: int) -> None:
        first = self._tail.first_seq
        if first is not None and first <= seq:
            dropped = self._tail.drop_first(seq - first + 1)
            self._tail_bytes -= sum(len(e.data) for e in dropped)

    # -- reads ---------------------------------------------------------------------------------

    async def read(
        self, after: int, patterns: tuple[Pattern, ...] | None, limit: int
    ) -> list[Event]:
        after = max(after, self._low)
        if after >= self._head:
            return []
        if self._tail.covers(after):
            return self._tail.read(after, patterns, limit)
        return await self._on(self._readers, self._read_sync, after, patterns, limit)

    def _read_sync(
        self, after: int, patterns: tuple[Pattern, ...] | None, limit: int
    ) -> list[Event]:
        conn = self._reader()
        where, params = "", []
        if patterns is not None:
            clauses = []
            for p in patterns:
                clauses.append("channel = ?" if p.is_exact else "channel GLOB ?")
                params.append(p.text if p.is_exact else p.glob())
            where = " AND (" + " OR ".join(clauses) + ")"
        out: list[Event] = []
        page = max(limit, 256)
        while len(out) < limit:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM events WHERE seq > ?{where} ORDER BY seq LIMIT ?",
                (after, *params, page),
            ).fetchall()
            if not rows:
                break
            after = rows[-1][0]
            # GLOB is a superset (its '*' crosses '/'); the exact match is re-checked here.
            out.extend(select((self._event(r) for r in rows), patterns, limit - len(out)))
            if len(rows) < page:
                break
        return out

    async def head(self) -> int:
        return self._head

    async def low(self) -> int:
        return self._low

    # -- retention -----------------------------------------------------------------------------

    async def trim(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        removed, low = await self._on(self._writer, self._trim_sync, now - self._max_age)
        if low > self._low:
            self._low = low
            self._uncache_through(low)
        return removed

    def _trim_sync(self, cutoff: float) -> tuple[int, int]:
        conn = self._wconn
        assert conn is not None
        head = self._head
        through = max(self._low, head - self._max_events)
        keep = conn.execute(
            "SELECT seq FROM events WHERE seq > ? AND time >= ? ORDER BY seq LIMIT 1",
            (through, cutoff),
        ).fetchone()
        through = max(through, (keep[0] - 1) if keep else head)
        removed, low = 0, self._low
        while low < through:
            step = min(through, low + TRIM_CHUNK)
            conn.execute("BEGIN IMMEDIATE")
            try:
                removed += conn.execute("DELETE FROM events WHERE seq <= ?", (step,)).rowcount
                conn.execute("UPDATE meta SET value = ? WHERE key = 'low'", (str(step),))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            low = step
        return removed, low

    async def stats(self) -> LogStats:
        size = sum(_file_size(self.path + suffix) for suffix in ("", "-wal"))
        return LogStats(events=self._head - self._low, head=self._head, low=self._low, bytes=size)

    # -- consumer cursors ----------------------------------------------------------------------

    async def get_consumer(self, name: str) -> int | None:
        return await self._on(self._readers, self._get_consumer_sync, name)

    def _get_consumer_sync(self, name: str) -> int | None:
        row = self._reader().execute("SELECT seq FROM consumers WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row[0])

    async def set_consumer(self, name: str, seq: int) -> None:
        await self._on(self._writer, self._set_consumer_sync, name, seq)

    def _set_consumer_sync(self, name: str, seq: int) -> None:
        assert self._wconn is not None
        self._wconn.execute(
            "INSERT INTO consumers (name, seq) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
            (name, seq),
        )

    async def delete_consumer(self, name: str) -> None:
        await self._on(self._writer, self._delete_consumer_sync, name)

    def _delete_consumer_sync(self, name: str) -> None:
        assert self._wconn is not None
        self._wconn.execute("DELETE FROM consumers WHERE name = ?", (name,))
