"""The seam between the workload and a transport: a ``Driver`` connects, drops and resumes
subscribers; ``DRIVERS`` names each transport's implementation by import string.

The workload (``workload.py``) is the same for every transport; only the driver differs.
"""

from __future__ import annotations

import asyncio
import importlib
from dataclasses import dataclass, field
from typing import ClassVar

from .stats import Meter
from .subscriber import Subscriber

# transport name -> "module:Class", imported only when that transport runs.
DRIVERS = {
    "ws": "tidings.bench.ws:WSDriver",
    "sse": "tidings.bench.sse:SSEDriver",
    "longpoll": "tidings.bench.polling:LongPollDriver",
    "poll": "tidings.bench.polling:ShortPollDriver",
    "grpc": "tidings.bench.grpc:GRPCDriver",
    "webhooks": "tidings.bench.webhooks:WebhookDriver",
    "mqtt": "tidings.bench.mqtt:MQTTDriver",
    "amqp": "tidings.bench.amqp:AMQPDriver",
}
TRANSPORTS = tuple(DRIVERS)


class Skip(Exception):
    """This transport cannot run against this hub; the message says why."""


@dataclass
class Target:
    """Where the hub under test listens, and what the run is called on it."""

    host: str
    port: int
    grpc_port: int = 0
    mqtt_url: str = ""
    mqtt_prefix: str = "tidings"
    amqp_url: str = ""
    amqp_exchange: str = "tidings"
    run_id: str = "run"  # channels are bench/<run_id>/…: several runs may share one hub
    poll_interval: float = 1.0
    options: dict[str, object] = field(default_factory=dict)


class Driver:
    """Connects subscribers over one transport.

    ``connect`` opens a subscriber's connection and returns once the server has confirmed the
    subscription; with ``sub.cursor`` set it resumes from there. ``drop`` cuts the connection
    the way a network would (no goodbye). ``window`` is how far the closed loop may publish
    ahead of the slowest subscriber without overflowing anything on the way.
    """

    name: ClassVar[str] = ""
    window: ClassVar[int] = 256
    # Where the subscribers' state lives: "hub" (a connection or subscription on the server)
    # or "broker" (MQTT/AMQP: the hub holds one relay however many subscribers there are).
    held_by: ClassVar[str] = "hub"
    # The longest a dropped subscriber may stay away (None: any time).
    max_outage: ClassVar[float | None] = None

    def __init__(self, target: Target, meter: Meter) -> None:
        self.target = target
        self.meter = meter

    async def setup(self) -> None:
        """Before the first subscriber (a receiver to start, a broker to reach)."""

    async def connect(self, sub: Subscriber) -> None:
        raise NotImplementedError

    def drop(self, sub: Subscriber) -> None:
        raise NotImplementedError

    async def release(self, subs: list[Subscriber]) -> None:
        """Close every subscriber for good (their server-side state too, where there is any)."""
        for sub in subs:
            if not sub.closed:
                self.drop(sub)

    async def teardown(self) -> None:
        """After the last subscriber."""

    async def connect_all(self, subs: list[Subscriber], parallel: int = 64) -> None:
        gate = asyncio.Semaphore(parallel)

        async def one(sub: Subscriber) -> None:
            async with gate:
                await self.connect(sub)

        await asyncio.gather(*(one(s) for s in subs))


def load_driver(name: str) -> type[Driver]:
    module, _, attr = DRIVERS[name].partition(":")
    cls: type[Driver] = getattr(importlib.import_module(module), attr)
    return cls
