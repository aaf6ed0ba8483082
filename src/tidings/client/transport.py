"""The seam between the resuming subscription and the wire: one small class per transport.

A transport turns one connection into a stream of ``Position`` and ``ReceivedEvent`` items:

- ``stream(cursor)`` connects, resuming after ``cursor`` (``None``: start at the live edge),
  and yields a ``Position`` as soon as the server has said where it starts (with ``recovered``
  false when it could not continue from ``cursor``), then events in order, and more
  ``Position`` items whenever the cursor moves without an event (polling past other channels).
- It returns when the server ends the connection normally, and raises ``httpx.TransportError``
  or ``ServerUnavailable`` when the connection fails: in all these cases the subscription
  reconnects. ``RequestRejected`` and ``ProtocolError`` end the subscription.
- It keeps no state across ``stream`` calls: the subscription owns the cursor and the backoff.
- A transport whose connection is not the Client's httpx client's (WebSocket, gRPC) also has
  ``aclose()``, which closes the open connection (or call) from any task: ``stream`` then
  returns. The subscription calls it when closed while another task waits in ``stream``;
  closing the httpx client does that for the others.

Transports are registered by name as import strings, so one that needs an optional package
(WebSocket, gRPC) is imported only when chosen.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import httpx

from ..loading import load
from .model import Position, ReceivedEvent

if TYPE_CHECKING:
    from .grpc import GrpcEndpoint

Via = Literal["sse", "longpoll", "poll", "ws", "grpc"]
Item = Position | ReceivedEvent


@dataclass(frozen=True, slots=True)
class SubscribeOptions:
    patterns: tuple[str, ...]
    timeout: float = 10.0  # connect and write, seconds
    # A stream silent this long (no event, no ping) is reconnected; WebSocket pings every half.
    idle_timeout: float = 45.0
    poll_interval: float = 1.0  # short polling: pause between polls once caught up
    wait: float = 30.0  # long polling: how long the server holds a request
    limit: int | None = None  # events per page (polling); None: the server's default
    # The Client's gRPC channel, opened when first called (only the gRPC transport calls it).
    grpc: Callable[[], GrpcEndpoint] | None = None


class Transport(Protocol):
    def stream(self, cursor: str | None) -> AsyncGenerator[Item, None]: ...


@runtime_checkable
class Closeable(Protocol):
    async def aclose(self) -> None: ...


TransportFactory = Callable[[httpx.AsyncClient, SubscribeOptions], Transport]

TRANSPORTS = {
    "sse": "tidings.client.sse:SSETransport",
    "longpoll": "tidings.client.polling:LongPollTransport",
    "poll": "tidings.client.polling:PollTransport",
    "ws": "tidings.client.ws:WebSocketTransport",
    "grpc": "tidings.client.grpc:GrpcTransport",
}


def transport_factory(via: str) -> TransportFactory:
    """The transport class registered as ``via``; ``ConfigError`` naming the choices if none."""
    factory: TransportFactory = load(TRANSPORTS, via, "client transport")
    return factory
