"""Helpers for the tests against real brokers (RabbitMQ, Mosquitto) on this machine.

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
from typing import Any

import pytest


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
