"""The Leases seam: run a durable consumer (webhook delivery, a relay, retention) on one node of
a cluster at a time, and move it to another node within seconds when its node dies.

Contract (checked by ``tests/test_leases.py`` against every implementation):
- ``run(name, work, stopping)`` waits until it holds lease ``name`` (trying every ``ttl / 3``),
  then runs ``work`` while renewing the lease every ``ttl / 3``. No other holder, on any node,
  acquires the lease until it is released or has gone unrenewed for ``ttl``.
- A holder whose renewal finds the lease taken, or that has not renewed it within ``ttl`` of
  sending its last successful renewal (the engine is unreachable), cancels ``work`` and waits
  again. When ``work`` returns or raises (logged), the lease is released and waited for again
  after a pause that backs off while ``work`` keeps failing quickly.
- ``run`` returns once ``stopping`` is set or ``close`` is called, having released the lease, so
  another node takes over at its next try rather than after ``ttl``. ``work`` that watches the
  same ``stopping`` gets ``ttl / 3`` to finish by itself (the lease is still valid meanwhile);
  then, or at once when the lease is lost, it is cancelled.
- Every acquisition has its own token (node id + random), and renewal and release compare it
  and set in one step: a holder never renews or releases a lease another holder took.

What a lease does NOT give: fencing. The engine cannot refuse a late write from a holder that
lost its lease, and a holder that stalls (a blocked event loop, a paused VM, work that ignores
cancellation) past its deadline may go on acting while another node already holds the lease.
The deadline is counted from when a renewal was *sent*, which is before the engine restarted
its expiry, so a healthy holder has stopped before anyone else can acquire; but nothing
guarantees that. Consumers run under a lease must therefore be at-least-once and idempotent
(deliveries carry ids, cursors only move forward), as tidings' are.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import re
import secrets
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit

from ..backoff import Backoff
from ..exceptions import ConfigError
from ..loading import load

logger = logging.getLogger("tidings.leases")

Work = Callable[[], Awaitable[None]]

# A name every engine stores as is: a NATS KV key, and a dotted word like a channel.
NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")

ENGINES = {
    "memory": "tidings.leases.memory:MemoryLeases",
    "redis": "tidings.leases.redis:RedisLeases",
    "nats": "tidings.leases.nats:NatsLeases",
}
SCHEMES = {"memory": "memory", "redis": "redis", "rediss": "redis", "unix": "redis",
           "nats": "nats", "tls": "nats"}  # fmt: skip


class Leases(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def run(self, name: str, work: Work, stopping: asyncio.Event) -> None: ...

    def holding(self, name: str) -> bool: ...

    def held(self) -> tuple[str, ...]:
        """The leases this node holds now, by name (for ``/healthz``)."""
        ...


def leases_for(
    url: str, prefix: str = "tidings", ttl: float = 10.0, node: str | None = None
) -> Leases:
    """The Leases for an engine URL (``memory://``, ``redis://…``, ``nats://…``), not yet open.

    A node makes one and shares it among its consumers, each running under its own name."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ConfigError(f"no leases for {url!r}; use a memory://, redis:// or nats:// URL")
    engine: Any = load(ENGINES, SCHEMES[scheme], "leases engine")
    leases: Leases = engine(url, prefix=prefix, ttl=ttl, node=node)
    return leases


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise ValueError(f"lease name {name!r}: use letters, digits, '_', '-' and inner dots")
    return name


S = TypeVar("S")  # what an engine keeps of a held lease (a Redis token, a NATS revision)


@dataclass(slots=True)
class Hold(Generic[S]):
    token: str
    state: S
    deadline: float  # time.monotonic() after which the engine may have let the lease expire


class Ended(enum.Enum):
    """How a turn holding a lease ended."""

    DONE = "work returned or raised"
    LOST = "lease lost"
    STOPPED = "stopping"


class LeaseRunner(ABC, Generic[S]):
    """The ``run`` loop shared by every engine, over three compare-and-set steps.

    ``_acquire`` returns the engine's state for a lease it took for ``token``, or None when
    another token holds it; ``_renew`` returns the new state, or None when the lease is no longer
    ``token``'s. Both may raise when the engine does not answer. ``ttl=None``: leases never
    expire, so they are never renewed (one process: nothing can take them)."""

    def __init__(self, ttl: float | None, node: str | None) -> None:
        if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
            raise ValueError("lease ttl must be a positive number of seconds")
        self.ttl = ttl
        self.interval = ttl / 3 if ttl is not None else 1.0
        self.node = node or f"{socket.gethostname()}:{os.getpid()}"
        self._held: dict[str, Hold[S]] = {}
        self._stops: set[asyncio.Event] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._troubled = False

    async def open(self) -> None:
        """Connect to the engine; raises when it cannot."""

    @abstractmethod
    async def _acquire(self, name: str, token: str) -> S | None: ...

    @abstractmethod
    async def _renew(self, name: str, token: str, state: S) -> S | None: ...

    @abstractmethod
    async def _release(self, name: str, token: str, state: S) -> None: ...

    async def _disconnect(self) -> None:
        """Close the engine's connection; called last by ``close``."""

    def holding(self, name: str) -> bool:
        """True while this node holds lease ``name`` and runs its work."""
        return name in self._held

    def held(self) -> tuple[str, ...]:
        return tuple(sorted(self._held))

    async def close(self) -> None:
        """Stop every ``run`` (as if its ``stopping`` were set), so each releases its lease; then
        release what a run did not within ``ttl / 3`` and disconnect."""
        self._closed = True
        for stop in self._stops:
            stop.set()
        try:
            async with asyncio.timeout(self.interval):
                await self._idle.wait()
        except TimeoutError:
            logger.warning("leases: runs still busy at close; releasing their leases")
        for name, hold in list(self._held.items()):
            await self._let_go(name, hold)
        await self._disconnect()

    async def run(self, name: str, work: Work, stopping: asyncio.Event) -> None:
        """Run ``work`` while holding lease ``name``, as the module docstring says, until
        ``stopping`` is set or the leases close."""
        check_name(name)
        if self._closed:
            raise RuntimeError("these leases are closed")
        stop = asyncio.Event()  # stopping, or close()
        self._stops.add(stop)
        self._idle.clear()
        try:
            async with asyncio.TaskGroup() as tg:
                relay = tg.create_task(_relay(stopping, stop))
                try:
                    await self._turns(name, work, stop)
                finally:
                    relay.cancel()
        finally:
            self._stops.discard(stop)
            if not self._stops:
                self._idle.set()

    async def _turns(self, name: str, work: Work, stop: asyncio.Event) -> None:
        # Work that fails at once is retried after 0.5 s, 1 s, 2 s… up to 30 s; after it ran
        # longer than that, from 0.5 s again.
        pause = Backoff(initial=0.5, cap=30.0)
        while True:
            hold = await self._acquire_when_free(name, stop)
            if hold is None:
                return
            logger.info("lease %s: acquired by %s", name, hold.token)
            started = time.monotonic()
            self._held[name] = hold
            ended = Ended.STOPPED  # also when cancelled: release on the way out
            try:
                ended = await self._hold(name, hold, work, stop)
            finally:
                self._held.pop(name, None)
                if ended is not Ended.LOST:
                    await self._let_go(name, hold)
            if ended is Ended.STOPPED:
                return
            if ended is Ended.DONE:
                if time.monotonic() - started > pause.cap:
                    pause.reset()
                if await _wait(stop, pause.next()):
                    return

    async def _acquire_when_free(self, name: str, stop: asyncio.Event) -> Hold[S] | None:
        # One token for the whole wait: when a reply was lost, the next try finds the lease
        # already ours and takes it on (each engine's _acquire allows that) instead of leaving
        # it to expire.
        token = f"{self.node}/{secrets.token_hex(8)}"
        while not stop.is_set():
            sent = time.monotonic()
            try:
                async with asyncio.timeout(self.interval):
                    state = await self._acquire(name, token)
            except Exception as exc:
                self._trouble(f"acquiring lease {name}", exc)
            else:
                self._fine()
                if state is not None:
                    deadline = sent + self.ttl if self.ttl is not None else math.inf
                    return Hold(token, state, deadline)
            if await _wait(stop, self.interval):
                break
        return None

    async def _hold(self, name: str, hold: Hold[S], work: Work, stop: asyncio.Event) -> Ended:
        async with asyncio.TaskGroup() as tg:
            doing = tg.create_task(self._do(name, work, stop), name=f"lease {name}")
            keeping = tg.create_task(self._keep(name, hold, stop))
            await asyncio.wait((doing, keeping), return_when=asyncio.FIRST_COMPLETED)
            if keeping.done() and not keeping.cancelled() and keeping.result() is Ended.STOPPED:
                # Stopping, with the lease still ours for a while: work that watches the same
                # ``stopping`` (a relay requeueing what it holds) may finish by itself first.
                await asyncio.wait((doing,), timeout=self.interval)
            doing.cancel()
            keeping.cancel()
        # The group waited for the work to end, so it never overlaps the next turn.
        return Ended.DONE if keeping.cancelled() else keeping.result()

    async def _do(self, name: str, work: Work, stop: asyncio.Event) -> None:
        try:
            await work()
        except Exception:
            logger.exception("lease %s: work failed; releasing the lease", name)
        else:
            if not stop.is_set():
                logger.warning("lease %s: work returned; releasing the lease", name)

    async def _keep(self, name: str, hold: Hold[S], stop: asyncio.Event) -> Ended:
        """Renew every ``ttl / 3`` until ``stop`` (STOPPED) or the lease is lost (LOST)."""
        if self.ttl is None:
            await stop.wait()
            return Ended.STOPPED
        delay = self.interval
        while True:
            if await _wait(stop, max(0.0, min(delay, hold.deadline - time.monotonic()))):
                return Ended.STOPPED
            sent = time.monotonic()
            if sent >= hold.deadline:
                logger.warning(
                    "lease %s: not renewed within %s s; cancelling its work", name, self.ttl
                )
                return Ended.LOST
            try:
                async with asyncio.timeout(hold.deadline - sent):
                    state = await self._renew(name, hold.token, hold.state)
            except Exception as exc:
                self._trouble(f"renewing lease {name}", exc)
                delay = self.interval / 3  # two or three more tries before the deadline
                continue
            self._fine()
            if state is None:
                logger.warning("lease %s: taken by another holder; cancelling its work", name)
                return Ended.LOST
            hold.state, hold.deadline, delay = state, sent + self.ttl, self.interval

    async def _let_go(self, name: str, hold: Hold[S]) -> None:
        try:
            async with asyncio.timeout(self.interval):
                await self._release(name, hold.token, hold.state)
        except Exception as exc:
            logger.warning(
                "lease %s: release failed (%r); it expires within %s s", name, exc, self.ttl
            )
        else:
            logger.info("lease %s: released by %s", name, hold.token)

    def _trouble(self, doing: str, exc: Exception) -> None:
        # Once per outage at warning: every ttl/3 per lease would flood the log.
        level = logging.DEBUG if self._troubled else logging.WARNING
        logger.log(level, "leases: %s failed (%r); retrying", doing, exc)
        self._troubled = True

    def _fine(self) -> None:
        if self._troubled:
            logger.info("leases: the engine answers again")
            self._troubled = False


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def _wait(stop: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds or until ``stop`` is set; whether it is."""
    try:
        async with asyncio.timeout(delay):
            await stop.wait()
    except TimeoutError:
        pass
    return stop.is_set()
