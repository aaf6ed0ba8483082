"""The in-process Broker: one node, so publishing is delivering. The default and the test fake."""

from __future__ import annotations

from collections.abc import Sequence

from ..events import Event
from . import Deliver


def _nowhere(events: Sequence[Event]) -> None:
    pass


class MemoryBroker:
    def __init__(self) -> None:
        self._deliver: Deliver = _nowhere

    def attach(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def publish(self, events: Sequence[Event]) -> None:
        self._deliver(events)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
