"""Baseline for the WebSocket benchmarks: the websockets library's own ``broadcast()`` server.

    python benchmarks/baseline_websockets.py PORT [uvloop|asyncio]

Started by ``run.py`` pinned to the server core like tidings. The library's documented fan-out
idiom and nothing else: no history, no durability, no envelope, no per-subscriber queue.

- ``/sub``: a subscriber. It is added to the set, then sent one welcome message so the load
  generator knows it is in the set before anything is published.
- ``/pub``: a publisher. Every message it sends is broadcast as received (the same bytes, text
  frames) to every subscriber with ``websockets.asyncio.server.broadcast``.
- ``GET /healthz``: ``{"status": "ok", "subscribers": N}`` for the runner.

Uses uvloop when installed (as ``tidings serve`` does; ``asyncio`` as second argument for the
standard loop) and no compression (as tidings by default).
"""

from __future__ import annotations

import asyncio
import sys

import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

WELCOME = b'{"op":"subscribed"}'
subscribers: set[ServerConnection] = set()


async def handler(connection: ServerConnection) -> None:
    assert connection.request is not None
    if connection.request.path == "/pub":
        while True:
            try:
                message = await connection.recv(decode=False)
            except ConnectionClosed:
                return
            # The payload is UTF-8 JSON already: text=True sends the bytes as a text frame.
            broadcast(subscribers, message, text=True)
    subscribers.add(connection)
    try:
        await connection.send(WELCOME, text=True)
        await connection.wait_closed()
    finally:
        subscribers.discard(connection)


def health(connection: ServerConnection, request: Request) -> Response | None:
    if request.path == "/healthz":
        body = orjson.dumps({"status": "ok", "subscribers": len(subscribers)})
        return connection.respond(200, body.decode())
    return None  # go on with the WebSocket handshake


async def main(port: int) -> None:
    async with serve(
        handler, "127.0.0.1", port, compression=None, process_request=health, backlog=1024
    ) as server:
        await server.serve_forever()


if __name__ == "__main__":
    port = int(sys.argv[1])
    loop = sys.argv[2] if len(sys.argv) > 2 else "uvloop"  # or "asyncio": the default loop
    try:
        import uvloop
    except ImportError:
        loop = "asyncio"
    if loop == "uvloop":
        uvloop.run(main(port))
    else:
        asyncio.run(main(port))
