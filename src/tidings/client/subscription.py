"""A subscription that resumes by itself: cursor, reconnects and backoff over any transport.

Rules:
- The cursor is the id of the last event handed to the caller, or the position the server last
  reported (``tidings.subscribed``, a poll answer's ``cursor``). Every reconnect resumes from it,
  so a dropped connection or a server restart loses and repeats nothing the log still holds.
- Failed connections are retried after ``Backoff`` delays (exponential, jittered, capped at
  10 s); the schedule starts over once a connection succeeds.
- Lost continuity is never hidden: when the server cannot continue from the cursor, the iterator
  yields a ``ContinuityLost`` item before the events that follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Self

import httpx

from ..backoff import Backoff
from .errors import ServerUnavailable
from .model import ContinuityLost, Position, ReceivedEvent
from .transport import Closeable, Transport

log = logging.getLogger("tidings.client")

Received = ReceivedEvent | ContinuityLost

# Failures worth a reconnect; anything else (RequestRejected, ProtocolError, bugs) propagates.
RETRYABLE = (httpx.TransportError, ServerUnavailable)


class Subscription:
    """An async iterator of ``ReceivedEvent`` and ``ContinuityLost`` items that never ends.

    It reconnects after dropped connections and server restarts, resuming from ``cursor``.
    It raises ``RequestRejected`` when the server refuses the subscription (a bad pattern or
    cursor: retrying would not help) and ``ProtocolError`` on an answer it cannot read.

    ``ContinuityLost`` means events between its ``requested`` and ``resumed_at`` cursors may be
    missing (retention removed them, or the server's log was recreated). Handle it, e.g. by
    reloading state from the source of truth::

        async with client.subscribe(["orders/**"], since=saved) as sub:
            async for item in sub:
                match item:
                    case ReceivedEvent():
                        handle(item)
                        saved = item.id
                    case ContinuityLost():
                        resync()

    Leaving the ``async with`` (or calling ``aclose``) closes the connection at once; a
    subscription merely abandoned is closed with its ``Client``.
    """

    def __init__(
        self,
        transport: Transport,
        since: str | None = None,
        *,
        backoff: Backoff | None = None,
    ) -> None:
        self.cursor = since
        self.connected = False  # whether a connection is up, as far as the client knows
        self._transport = transport
        self._backoff = backoff or Backoff()
        self._closed = False
        self._stepping = False  # a task is inside __anext__
        self._closing = asyncio.Event()  # wakes a backoff pause when closed from another task
        self._items = self._run()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Received:
        self._stepping = True
        try:
            return await self._items.__anext__()
        finally:
            self._stepping = False

    async def aclose(self) -> None:
        """End the iteration and close the connection.

        Called while another task waits in this iterator, it ends that wait only at its next
        step (the next event, ping or poll answer), except over WebSocket and gRPC, where it
        closes the connection (cancels the call) and so ends the wait at once; cancel that task
        to stop it at once. Closing the ``Client`` closes its connections, which ends every
        such wait at once.
        """
        self._closed = True
        self._closing.set()
        if not self._stepping:  # else the generator is busy in another task; it sees _closed
            await self._items.aclose()
        elif isinstance(self._transport, Closeable):
            await self._transport.aclose()  # the stream in the other task ends now

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[Received, None]:
        while not self._closed:
            try:
                async with contextlib.aclosing(self._transport.stream(self.cursor)) as items:
                    async for item in items:
                        if self._closed:
                            return
                        self.connected = True
                        self._backoff.reset()
                        if isinstance(item, Position):
                            requested, self.cursor = self.cursor, item.cursor
                            if not item.recovered:
                                reason = item.reason or "the server could not continue"
                                yield ContinuityLost(requested, item.cursor, reason)
                        else:
                            self.cursor = item.id
                            yield item
                log.debug("connection ended by the server; resuming from %s", self.cursor)
            except RETRYABLE as exc:
                if self._closed:
                    return  # closed from another task: this is the connection being closed
                log.debug("connection failed (%r); resuming from %s", exc, self.cursor)
            except Exception:
                if self._closed:
                    return  # e.g. the closed httpx client refusing a new request
                raise
            finally:
                self.connected = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._backoff.next()):
                    await self._closing.wait()
