"""Webhook subscribers: each one an endpoint registered with ``POST /webhooks`` whose URL is a
path on a lean receiver in the generator's process.

The receiver is a raw asyncio HTTP/1.1 server (keep-alive, each request read by its head and
``content-length`` only, answered ``204 No Content`` at once). Its sockets are the
subscribers' side of the wire here: the hub connects to it, so their bytes are what the meter
counts. "Dropping" an endpoint makes the receiver answer its requests ``503`` (a receiver that
is down); resuming answers ``204`` again, and the hub's retries bring what failed: webhooks
are durable, at-least-once consumers (docs/webhooks.md). An outage is kept shorter than the
first retry delay (5 s), so the run does not wait for the second one (5 min).
"""

from __future__ import annotations

import asyncio

import orjson

from .driver import Driver, Skip, Target
from .hub import free_port
from .stats import Meter
from .subscriber import Subscriber
from .wire import HTTPConnection, messages, request

NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"


class Receiver:
    """The endpoints' paths and which of them are down."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.paths: dict[bytes, Subscriber] = {}
        self.down: set[bytes] = set()
        self.refused = 0  # requests answered 503
        self.strangers = 0  # requests for a path no endpoint has


class Hook(asyncio.Protocol):
    """One connection from the hub to the receiver."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.transport: asyncio.Transport | None = None
        self._buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        receiver = self.receiver
        receiver.meter.received += len(data)
        buf = self._buf + data if self._buf else data
        found, rest = messages(buf)
        self._buf = buf[rest:]
        out = []
        for start, end, total in found:
            path = buf[buf.find(b" ", start) + 1 : buf.find(b" HTTP/", start, end)]
            sub = receiver.paths.get(path)
            if sub is None:
                receiver.strangers += 1
                out.append(UNAVAILABLE)
            elif path in receiver.down:
                receiver.refused += 1
                out.append(UNAVAILABLE)
            else:
                sub.delivered(buf, 1, end + 4, total)
                out.append(NO_CONTENT)
        if out and self.transport is not None:
            reply = b"".join(out)
            receiver.meter.sent += len(reply)
            self.transport.write(reply)


class WebhookDriver(Driver):
    name = "webhooks"
    # Every endpoint holds its own queue of attempts: a small window keeps the drain short.
    window = 16
    max_outage = 4.0  # seconds: under the first retry delay (webhooks.schedule: 0, 5 s, …)

    def __init__(self, target: Target, meter: Meter) -> None:
        super().__init__(target, meter)
        self.receiver = Receiver(meter)
        self.port = free_port()
        self.server: asyncio.AbstractServer | None = None
        self.admin: HTTPConnection | None = None
        self.endpoints: dict[int, tuple[str, bytes]] = {}  # id(sub) -> (endpoint id, path)

    async def setup(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Hook(self.receiver), "127.0.0.1", self.port, backlog=4096
        )

    async def call(self, method: str, path: str, body: bytes = b"") -> dict[str, object]:
        if self.admin is None or self.admin.closed:  # idle past the hub's keep-alive timeout
            self.admin = await HTTPConnection.open(self.target.host, self.target.port)
        raw = request(method, path, body, self.target.host)
        status, answer = await asyncio.wait_for(self.admin.send(raw), 30)
        if status not in (200, 201):
            raise RuntimeError(f"{method} {path} answered {status}: {answer[:300]!r}")
        result: dict[str, object] = orjson.loads(answer)
        return result

    async def connect(self, sub: Subscriber) -> None:
        known = self.endpoints.get(id(sub))
        if known is None:
            path = f"/hook/{id(sub):x}".encode()
            self.receiver.paths[path] = sub
            url = f"http://127.0.0.1:{self.port}{path.decode()}"
            spec = {"url": url, "channels": [sub.channel], "description": "tidings bench"}
            try:
                answer = await self.call("POST", "/webhooks", orjson.dumps(spec))
            except RuntimeError as exc:
                if not self.endpoints and "invalid_endpoint" in str(exc):
                    raise Skip(
                        "the hub refuses http://127.0.0.1 endpoints (start it with "
                        "TIDINGS_WEBHOOKS_ALLOW_HTTP=true "
                        "TIDINGS_WEBHOOKS_ALLOWED_NETWORKS=127.0.0.1/32)"
                    ) from exc
                raise
            self.endpoints[id(sub)] = (str(answer["id"]), path)
        else:
            self.receiver.down.discard(known[1])
        sub.closed = False

    def fresh_admin(self) -> None:
        """Close the admin connection: the next call opens one (an idle one may be closing)."""
        if self.admin is not None:
            self.admin.close()
            self.admin = None

    async def connect_all(self, subs: list[Subscriber], parallel: int = 1) -> None:
        self.fresh_admin()
        for sub in subs:  # one admin connection: registrations one at a time
            await self.connect(sub)

    def drop(self, sub: Subscriber) -> None:
        known = self.endpoints.get(id(sub))
        if known is not None:
            self.receiver.down.add(known[1])
        sub.connection_closed()

    async def release(self, subs: list[Subscriber]) -> None:
        self.fresh_admin()
        for sub in subs:
            known = self.endpoints.pop(id(sub), None)
            if known is not None:
                await self.call("DELETE", f"/webhooks/{known[0]}")
                self.receiver.paths.pop(known[1], None)
            sub.connection_closed()

    async def teardown(self) -> None:
        if self.admin is not None:
            self.admin.close()
        if self.server is not None:
            self.server.close()
