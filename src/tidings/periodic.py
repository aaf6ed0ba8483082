"""Periodic background work that stops promptly when the server does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


async def every(interval: float, stopping: asyncio.Event) -> AsyncIterator[None]:
    """Yield once per ``interval`` seconds until ``stopping`` is set (checked before each yield).

    The wait is on ``stopping`` itself, so shutdown never waits out an interval.
    """
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stopping.wait()
        if stopping.is_set():
            return
        yield
