"""Shared fixtures: a real tidings server (uvicorn on a free port) in a background thread."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tidings import config
from tidings.server import Tidings


class RunningServer:
    """A tidings node serving on 127.0.0.1:<free port> in its own thread and event loop."""

    def __init__(self, settings: config.Settings) -> None:
        self.node = Tidings(settings)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="tidings-test-server", daemon=True)

    def _main(self) -> None:
        import uvloop

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            await self.node.run(on_ready=lambda _node: self._ready.set())

        try:
            uvloop.run(main())
        except BaseException as exc:  # reported by start()/stop()
            self._error = exc
            self._ready.set()

    @property
    def url(self) -> str:
        return self.node.url

    @property
    def hub(self) -> Any:
        return self.node.hub

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the server's loop thread."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn)

    def run_coroutine(self, coro: Any, timeout: float = 10) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> RunningServer:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("tidings test server did not start within 15 s")
        if self._error is not None:
            raise RuntimeError("tidings test server failed to start") from self._error
        return self

    def stop(self) -> None:
        if self._thread.is_alive() and self._loop is not None:
            self._loop.call_soon_threadsafe(self.node.request_shutdown)
            self._thread.join(20)
        if self._thread.is_alive():
            raise RuntimeError("tidings test server did not stop within 20 s")


def make_settings(tmp_path: Any, **overrides: Any) -> config.Settings:
    """Settings for a test server: free port, SQLite in tmp_path; overrides as section_key=value."""
    settings = config.load(None, environ={})
    settings.server.port = 0
    settings.grpc.port = 0
    settings.log.path = os.path.join(str(tmp_path), "tidings.db")
    for name, value in overrides.items():
        section, _, key = name.partition("_")
        config._apply(settings, section, key, value, "test")
    return settings


@pytest.fixture
def make_server(tmp_path: Any) -> Iterator[Callable[..., RunningServer]]:
    """Start servers with setting overrides, e.g. ``make_server(hub_queue_size=8)``."""
    started: list[RunningServer] = []

    def start(**overrides: Any) -> RunningServer:
        server = RunningServer(make_settings(tmp_path, **overrides)).start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., RunningServer]) -> RunningServer:
    """A default server (SQLite log) on a free port."""
    return make_server()
