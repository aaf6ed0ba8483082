"""Leases in NATS JetStream (server 2.9 or later): a key per lease in the KV bucket
``{prefix}_leases``, holding the holder's token.

The bucket keeps one revision per key and expires every entry ``ttl`` after it was written
(its stream's max_age), so a renewal is a write and an unrenewed lease disappears. Each step is
a write that expects the key's last revision, which the server checks atomically:
- acquire: ``kv.create``, which expects no revision. After a release the key's last message is
  a delete marker; nats-py's ``create`` sees that (KeyDeletedError) and expects the marker's
  revision instead, so a released lease can be taken at once (an expired one has no message).
- renew: ``kv.update(key, token, last=revision)``, which fails once anyone else wrote the key.
- release: ``kv.delete(key, last=revision)``, which leaves the key alone in that case.
Per-message TTLs would need server 2.11, hence the bucket-wide max_age: every node must use the
same ``ttl``, and ``open`` refuses a bucket made with another one.
"""

from __future__ import annotations

import asyncio
import logging
import math

import nats.js.errors
from nats.aio.client import Client
from nats.js.kv import KeyValue

from ..exceptions import ConfigError
from . import LeaseRunner

logger = logging.getLogger("tidings.leases")

CONNECT = 10.0  # seconds for ``open`` to reach a server

# JetStream's "stream name already in use with a different configuration"
STREAM_CONFIG_DIFFERS = 10058


class NatsLeases(LeaseRunner[int]):
    """Leases in the NATS JetStream at ``url`` (``nats://`` or ``tls://``; several separated by
    commas); the state of a held lease is its revision."""

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        prefix: str = "tidings",
        ttl: float = 10.0,
        node: str | None = None,
    ) -> None:
        super().__init__(ttl, node)
        self.url = url
        self.bucket = f"{prefix}_leases"
        self._max_age = ttl  # the bucket's: an entry expires ttl after it was written
        self._nc: Client | None = None
        self._kv: KeyValue | None = None

    async def open(self) -> None:
        """Connect and make (or find) the bucket; TimeoutError when no server answers within
        ``CONNECT`` seconds, ConfigError when the bucket expires entries after another ttl."""
        nc = Client()
        try:
            # Never give up reconnecting: a client that did would leave the node unable to
            # lead for good. That applies to the first connection too, hence the timeout.
            async with asyncio.timeout(CONNECT):
                await nc.connect(
                    self.url.split(","),  # a cluster: nats://a:4222,nats://b:4222
                    name=f"tidings leases {self.node}",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    error_cb=_error,
                    disconnected_cb=self._disconnected,
                    reconnected_cb=_reconnected,
                )
            self._kv = await self._bucket(nc)
        except BaseException:
            await nc.close()
            raise
        self._nc = nc

    async def _bucket(self, nc: Client) -> KeyValue:
        js = nc.jetstream()
        try:
            return await js.create_key_value(bucket=self.bucket, history=1, ttl=self._max_age)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_CONFIG_DIFFERS:
                raise
        # Made by another client or version: usable as long as entries expire after our ttl.
        info = await js.stream_info(f"KV_{self.bucket}")
        if not math.isclose(info.config.max_age or 0.0, self._max_age):
            raise ConfigError(
                f"the NATS KV bucket {self.bucket!r} expires entries after "
                f"{info.config.max_age} s, but this node's lease ttl is {self.ttl} s: give every "
                f"node the same ttl, or delete the bucket while no node runs"
            )
        return await js.key_value(self.bucket)

    async def _disconnected(self) -> None:
        if self._nc is not None and not self._closed:  # not a failed open or close()
            logger.warning("leases: disconnected from NATS; reconnecting")

    async def _disconnect(self) -> None:
        if self._nc is not None:
            await self._nc.close()
            self._nc = self._kv = None

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("NatsLeases is not open")
        return self._kv

    async def _acquire(self, name: str, token: str) -> int | None:
        try:
            return await self.kv.create(name, token.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        # Held; by us when the reply to an earlier try was lost. (KeyNotFoundError: it expired
        # or was released just now, and the next try takes it.)
        try:
            entry = await self.kv.get(name)
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value != token.encode() or entry.revision is None:
            return None
        return await self._renew(name, token, entry.revision)

    async def _renew(self, name: str, token: str, state: int) -> int | None:
        try:
            return await self.kv.update(name, token.encode(), last=state)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def _release(self, name: str, token: str, state: int) -> None:
        try:
            await self.kv.delete(name, last=state)
        except nats.js.errors.BadRequestError as exc:
            # Wrong last revision: someone else holds the lease now, so leave it.
            logger.debug("lease %s: not ours to release (%s)", name, exc)


async def _error(exc: Exception) -> None:
    logger.debug("leases: NATS: %r", exc)


async def _reconnected() -> None:
    logger.info("leases: reconnected to NATS")
