"""Fixtures for the contract suites: one opened implementation per parameter.

A backend that cannot be imported fails its own parameters with a message saying so; it is
never skipped, so a missing or broken backend cannot pass unnoticed.
"""

from __future__ import annotations

import contextlib
import importlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from brokers import require_service
from tidings.log import Log
from tidings.log.memory import MemoryLog

# "sqlite-nocache" keeps no recent events in memory, so every read goes through SQL; the same
# for "redis-nocache" and "nats-nocache", whose reads all go to the engine.
LOG_KINDS = ["memory", "sqlite", "sqlite-nocache", "redis", "redis-nocache", "nats", "nats-nocache"]
SHARED_KINDS = ["redis", "nats"]  # the logs several nodes share
REDIS = ("127.0.0.1", 6379)
NATS = ("127.0.0.1", 4222)
REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"


def load_sqlite_log() -> Any:
    try:
        module = importlib.import_module("tidings.log.sqlite")
        return module.SQLiteLog
    except (ImportError, AttributeError) as exc:
        pytest.fail(
            f"the SQLite log cannot be loaded: tidings.log.sqlite.SQLiteLog ({exc!r}); "
            "it is not written yet or is broken",
            pytrace=False,
        )


def load_nats_log() -> Any:
    try:
        module = importlib.import_module("tidings.log.nats")
        return module.NatsLog
    except (ImportError, AttributeError) as exc:
        pytest.fail(
            f"the NATS log cannot be loaded: tidings.log.nats.NatsLog ({exc!r})", pytrace=False
        )


class Logs:
    """Opens logs of one kind and closes whatever is still open when the test ends."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.directory = directory
        self.durable = kind.startswith("sqlite")
        self._open: list[Log] = []
        self._prefixes: set[str] = set()
        self._nats_names: set[tuple[str, str]] = set()  # (stream, KV bucket) of each NATS log
        self._run = uuid.uuid4().hex[:8]
        if kind.startswith("redis"):
            require_service(*REDIS, "Redis")
        if kind.startswith("nats"):
            require_service(*NATS, "NATS")

    def prefix(self, name: str) -> str:
        """The engine prefix of the logs opened as ``name`` (the same for every such log, so
        they are nodes sharing one log)."""
        return f"test-{self._run}-{name}"

    async def open(
        self, name: str = "log.db", *, address: str | None = None, **options: Any
    ) -> Log:
        """A new opened log; for SQLite ``name`` is its file in the test's directory. For Redis
        and NATS, logs opened with the same ``name`` share one stream; ``address``
        (``host:port``) reaches the engine some other way than directly (a TCPProxy)."""
        log: Log
        if self.kind == "memory":
            log = MemoryLog(**options)
        elif self.kind.startswith("redis"):
            from tidings.log.redis import RedisLog

            if self.kind == "redis-nocache":
                options.setdefault("cache_events", 0)
            prefix = self.prefix(name)
            self._prefixes.add(prefix)
            url = f"redis://{address}/0" if address else REDIS_URL
            log = RedisLog(url, prefix=prefix, **options)
        elif self.kind.startswith("nats"):
            nats_log = load_nats_log()
            if self.kind == "nats-nocache":
                options.setdefault("cache_events", 0)
            log = nats_log(f"nats://{address}" if address else NATS_URL,
                           prefix=self.prefix(name), **options)  # fmt: skip
            self._nats_names.add((log.stream, log.bucket))
        else:
            sqlite_log = load_sqlite_log()
            if self.kind == "sqlite-nocache":
                options.setdefault("cache_events", 0)
            log = sqlite_log(str(self.directory / name), **options)
        await log.open()
        self._open.append(log)
        return log

    async def close(self, log: Log) -> None:
        self._open.remove(log)
        await log.close()

    async def close_all(self) -> None:
        while self._open:
            await self.close(self._open[-1])
        if self._prefixes:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(REDIS_URL)
            for prefix in self._prefixes:
                keys = [key async for key in client.scan_iter(f"{prefix}:*")]
                if keys:
                    await client.delete(*keys)
            await client.aclose()
        if self._nats_names:
            await drop_nats(self._nats_names)


async def drop_nats(names: set[tuple[str, str]]) -> None:
    """Delete the streams and KV buckets of the NATS logs ``names``."""
    import nats
    import nats.js.errors

    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        for stream, bucket in names:
            for name in (stream, f"KV_{bucket}"):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_stream(name)
    finally:
        await nc.close()


@pytest.fixture(params=LOG_KINDS)
async def logs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Logs]:
    opened = Logs(request.param, tmp_path)
    yield opened
    await opened.close_all()


@pytest.fixture(params=SHARED_KINDS)
async def shared_logs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Logs]:
    opened = Logs(request.param, tmp_path)
    yield opened
    await opened.close_all()


@pytest.fixture(params=["sqlite", "sqlite-nocache"])
async def sqlite_logs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Logs]:
    opened = Logs(request.param, tmp_path)
    yield opened
    await opened.close_all()
