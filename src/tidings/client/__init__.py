"""The tidings Python client: publish, and subscribe over SSE, WebSocket, gRPC or polling.

::

    from tidings.client import Client, ContinuityLost, ReceivedEvent

    async with Client("http://127.0.0.1:8080") as client:
        await client.publish("orders/42/status", {"status": "paid"})
        async for item in client.subscribe(["orders/**"], via="sse"):
            if isinstance(item, ContinuityLost):
                ...  # events may be missing between item.requested and item.resumed_at
            else:
                print(item.channel, item.json())

A subscription resumes from its last cursor after any dropped connection or server restart;
see ``Subscription`` for the rules and ``errors`` for what it raises. ``publish(..., via="ws")``
publishes over one WebSocket and returns the acknowledgement (``Published``), not the envelope;
``publish(..., via="grpc")`` makes a gRPC call and returns the envelope, as HTTP does.
"""

from __future__ import annotations

from ..backoff import Backoff
from .client import DEFAULT_URL, BatchEvent, Client, Published, PublishVia
from .errors import ProtocolError, RequestRejected, ServerUnavailable, TidingsClientError
from .model import ContinuityLost, ReceivedEvent
from .subscription import Received, Subscription
from .transport import TRANSPORTS, Via

__all__ = [
    "DEFAULT_URL",
    "TRANSPORTS",
    "Backoff",
    "BatchEvent",
    "Client",
    "ContinuityLost",
    "ProtocolError",
    "PublishVia",
    "Published",
    "Received",
    "ReceivedEvent",
    "RequestRejected",
    "ServerUnavailable",
    "Subscription",
    "TidingsClientError",
    "Via",
]
