"""WebSocket, ``GET /ws``: subscribe, unsubscribe, publish with acks (docs/websocket.md).

Structure:
- ``handshake``: the upgrade request. uvicorn parses it and hands the socket over through its
  ``ws`` protocol-class hook; what is wrong with the request is refused with an HTTP error.
- ``connection.Connection`` is the asyncio protocol of one upgraded connection. The websockets
  library's sans-I/O ``ServerProtocol`` does the frame parsing and unmasking, the message size
  limit, pings' pongs, the close handshake and compression; the rest is here, without ASGI in
  between, so events are written to the socket directly.
- ``server.WebSockets`` owns every connection's tasks in one TaskGroup, runs one ticker for all
  their deadlines (keep-alive, auth, close), and batches their writes: the hub's ``wakeup``
  callback only marks a subscription ready, and one loop callback per server then writes every
  connection that has events, each in one ``write``.
- No task per idle connection. Messages from the client run in a short-lived task per burst;
  publishes run concurrently, up to ``PUBLISH_WINDOW`` per connection; a subscription reads
  history in a task while it catches up.
- Bounded everywhere: each subscription's queue is the hub's; replies are only produced while
  the client takes them (the message task waits while the socket is full, and reading pauses
  once ``INBOX`` messages wait), so a client that stops reading holds a socket buffer and a
  queue per subscription, and then is closed as lagged or for not answering pings.
"""

from .handshake import upgrade_required
from .server import WebSockets

__all__ = ["WebSockets", "upgrade_required"]
