"""The tidings Python client: publish, and subscribe over SSE or polling with automatic resume.

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
see ``Subscription`` for the rules and ``errors`` for what it raises.
"""

from __future__ import annotations

from .backoff import Backoff
from .client import DEFAULT_URL, BatchEvent, Client
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
    "Received",
    "ReceivedEvent",
    "RequestRejected",
    "ServerUnavailable",
    "Subscription",
    "TidingsClientError",
    "Via",
]
