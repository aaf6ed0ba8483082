"""Leases in Redis: one key per lease, ``{prefix}:lease:{name}``, holding the holder's token
and expiring ``ttl`` after its last renewal.

Every step is one atomic command or Lua script, so it compares the token and sets in one go
(the single-instance lock of https://redis.io/docs/latest/develop/use/patterns/distributed-locks/;
not Redlock: one Redis, or a primary with replicas, whose failover may lose a lease).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio

from . import LeaseRunner

# SET NX PX; or, when the key already holds our token (a try whose reply was lost), renew it.
ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class RedisLeases(LeaseRunner[str]):
    """Leases in the Redis at ``url`` (``redis://``, ``rediss://`` or ``unix://``)."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379",
        prefix: str = "tidings",
        ttl: float = 10.0,
        node: str | None = None,
    ) -> None:
        super().__init__(ttl, node)
        self.url = url
        self.prefix = prefix
        self._ttl_ms = max(1, round(ttl * 1000))
        self._client: redis.asyncio.Redis | None = None
        self._scripts: dict[str, Any] = {}

    async def open(self) -> None:
        # Without the timeouts a dead connection would hang until asyncio.timeout cuts it.
        client = redis.asyncio.Redis.from_url(
            self.url, socket_connect_timeout=self.interval, socket_timeout=self.interval
        )
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        for name, text in (("acquire", ACQUIRE), ("renew", RENEW), ("release", RELEASE)):
            self._scripts[name] = client.register_script(text)

    async def _disconnect(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def key(self, name: str) -> str:
        return f"{self.prefix}:lease:{name}"

    async def _call(self, script: str, name: str, token: str) -> bool:
        if self._client is None:
            raise RuntimeError("RedisLeases is not open")
        done = await self._scripts[script](keys=[self.key(name)], args=[token, self._ttl_ms])
        return bool(done)

    async def _acquire(self, name: str, token: str) -> str | None:
        return token if await self._call("acquire", name, token) else None

    async def _renew(self, name: str, token: str, state: str) -> str | None:
        return token if await self._call("renew", name, token) else None

    async def _release(self, name: str, token: str, state: str) -> None:
        await self._call("release", name, token)
