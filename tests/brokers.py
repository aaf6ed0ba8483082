"""Helpers for the tests against real brokers (RabbitMQ, Mosquitto) on this machine, and for
reading a relaying node's state over HTTP (``/healthz``, ``/history``, ``/metrics``).

Rules:
- A broker that is not listening skips its tests with the reason, except under ``CI=true``,
  where it fails them: CI must never skip them silently (``require_service``).
- Faults are made by a test-owned TCP proxy between tidings and the broker (``TCPProxy``),
  which the test cuts and heals; the broker itself is never touched.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving import Serve

DEADLINE = 30.0  # seconds for anything to arrive; reconnect backoff stays well under it


def service_listening(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(host: str, port: int, name: str) -> None:
    """Skip the calling test (module, at import) unless ``name`` listens on ``host:port``;
    under ``CI=true`` fail instead."""
    if service_listening(host, port):
        return
    reason = f"{name} is not listening on {host}:{port}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the {name} tests", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


class TCPProxy:
    """Forwards 127.0.0.1:<free port> to ``target`` on its own thread and event loop.

    ``cut()`` closes every open connection and refuses new ones (accepted, then closed at
    once) until ``heal()``; the listening port stays the same throughout."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.cuts = 0
        self._open = True
        self._pairs: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy",
                                        daemon=True)  # fmt: skip

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TCPProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            self._drop_all()
            if self._server is not None:
                self._server.close()

        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def cut(self) -> None:
        async def cut() -> None:
            self._open = False
            self.cuts += 1
            self._drop_all()

        self._call(cut())

    def heal(self) -> None:
        async def heal() -> None:
            self._open = True

        self._call(heal())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _drop_all(self) -> None:
        for writer in list(self._pairs):
            writer.transport.abort()
        self._pairs.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._open:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._pairs.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._pairs.discard(writer)
            writer.transport.abort()


# -- a relaying node over HTTP -------------------------------------------------------------------


async def until(check: Callable[[], Awaitable[Any]], what: str | Callable[[], str]) -> Any:
    """Await ``check()`` every 50 ms until it is true, and return it; fail after ``DEADLINE``
    seconds, naming ``what`` (called then, when it is a function)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, (
            f"{what if isinstance(what, str) else what()}: still {value!r} after {DEADLINE} s"
        )
        await asyncio.sleep(0.05)


async def relay_status(client: httpx.AsyncClient, relay: str) -> dict[str, Any]:
    """``relay``'s entry (``"mqtt"``, ``"amqp"``) in ``/healthz``."""
    response = await client.get("/healthz")
    assert response.status_code == 200, response.text
    status: dict[str, Any] = response.json()["relays"][relay]
    return status


async def until_connected(client: httpx.AsyncClient, relay: str) -> dict[str, Any]:
    status: dict[str, Any] = {}

    async def connected() -> dict[str, Any] | None:
        nonlocal status
        status = await relay_status(client, relay)
        return status if status["connected"] else None

    connected_status: dict[str, Any] = await until(
        connected, lambda: f"the {relay} relay connected ({status})"
    )
    return connected_status


async def until_serving(process: Serve, relay: str) -> None:
    """Until ``process`` answers with ``relay`` connected; its log if it exits first."""
    async with httpx.AsyncClient(base_url=process.url, timeout=2) as client:

        async def connected() -> bool:
            assert process.proc.poll() is None, process.log()
            try:
                return bool((await relay_status(client, relay))["connected"])
            except (httpx.TransportError, KeyError):
                return False

        await until(connected, lambda: f"tidings serve connected to the broker: {process.log()}")


async def publish(client: httpx.AsyncClient, channel: str, data: Any, **kwargs: Any) -> str:
    """POST ``data`` as JSON (unless ``content`` or ``json`` is given) to ``channel``; the
    cursor. ``kwargs`` go to ``client.post``."""
    if not any(k in kwargs for k in ("content", "json")):
        kwargs["json"] = data
    response = await client.post(f"/channels/{channel}", **kwargs)
    assert response.status_code == 201, response.text
    cursor: str = response.json()["id"]
    return cursor


async def history(client: httpx.AsyncClient, pattern: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    params: dict[str, Any] = {"channel": pattern, "limit": 1000}
    while True:
        response = await client.get("/history", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        events.extend(page["events"])
        if not page["more"]:
            return events
        params["since"] = page["cursor"]


async def history_until(
    client: httpx.AsyncClient, pattern: str, count: int
) -> list[dict[str, Any]]:
    """The history of ``pattern`` once it holds at least ``count`` events."""
    events: list[dict[str, Any]] = []

    async def enough() -> list[dict[str, Any]] | None:
        nonlocal events
        events = await history(client, pattern)
        return events if len(events) >= count else None

    arrived: list[dict[str, Any]] = await until(
        enough, lambda: f"{pattern}: {len(events)} of {count} events arrived: {events[-3:]}"
    )
    return arrived


async def counter(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    """The sample ``name`` with ``labels`` in ``/metrics``; 0 when there is none."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
