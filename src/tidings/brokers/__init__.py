"""The Broker seam: live fan-out of committed events between tidings nodes.

A broker carries events from the node that logged them to every node's hub (including its own),
in log order. It is live delivery only: a gap (a node that missed a message) is repaired from
the Log by cursor, never by the broker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from ..events import Event

Deliver = Callable[[Sequence[Event]], None]


class Broker(Protocol):
    def attach(self, deliver: Deliver) -> None:
        """Set the local hub's fan-out; called once before ``start``."""

    def publish(self, events: Sequence[Event]) -> None:
        """Hand committed events to every node. Never blocks; keeps log order."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


BACKENDS = {
    "memory": "tidings.brokers.memory:MemoryBroker",
}
