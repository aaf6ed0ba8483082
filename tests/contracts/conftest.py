"""Fixtures for the contract suites: one opened implementation per parameter.

A backend that cannot be imported fails its own parameters with a message saying so; it is
never skipped, so a missing or broken backend cannot pass unnoticed.
"""

from __future__ import annotations

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
# for "redis-nocache", whose reads all go to Redis.
LOG_KINDS = ["memory", "sqlite", "sqlite-nocache", "redis", "redis-nocache"]
REDIS_URL = "redis://127.0.0.1:6379/0"


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


class Logs:
    """Opens logs of one kind and closes whatever is still open when the test ends."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.directory = directory
        self.durable = kind.startswith("sqlite")
        self._open: list[Log] = []
        self._prefixes: set[str] = set()
        self._run = uuid.uuid4().hex[:8]
        if kind.startswith("redis"):
            require_service("127.0.0.1", 6379, "Redis")

    async def open(self, name: str = "log.db", **options: Any) -> Log:
        """A new opened log; for SQLite ``name`` is its file in the test's directory."""
        log: Log
        if self.kind == "memory":
            log = MemoryLog(**options)
        elif self.kind.startswith("redis"):
            from tidings.log.redis import RedisLog

            if self.kind == "redis-nocache":
                options.setdefault("cache_events", 0)
            prefix = f"test-{self._run}-{name}"
            self._prefixes.add(prefix)
            log = RedisLog(REDIS_URL, prefix=prefix, **options)
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


@pytest.fixture(params=LOG_KINDS)
async def logs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Logs]:
    opened = Logs(request.param, tmp_path)
    yield opened
    await opened.close_all()


@pytest.fixture(params=["sqlite", "sqlite-nocache"])
async def sqlite_logs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Logs]:
    opened = Logs(request.param, tmp_path)
    yield opened
    await opened.close_all()
