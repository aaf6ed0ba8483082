"""Test helpers that talk to a real tidings server: an SSE reader and a raw HTTP/1.1 client.

Every read here is bounded (a socket timeout plus an overall deadline), so a test that expects
data which never comes fails instead of hanging.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from tidings.sse import Decoder, ServerEvent

DEADLINE = 10.0  # seconds any single wait in a test may take before it counts as a hang


class StreamEnded(AssertionError):
    """The server closed the SSE stream while the test was still waiting for events."""


class SSEClient:
    """An SSE stream read through httpx's raw byte iterator and ``tidings.sse.Decoder``.

    Use as a context manager. ``next()`` returns the next dispatched event (internal
    ``tidings.*`` events included); ``events(n)`` the next ``n`` application events.
    """

    def __init__(
        self,
        base_url: str,
        channels: list[str] | str,
        *,
        since: str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        timeout: float = DEADLINE,
    ) -> None:
        query: list[tuple[str, str | int | float | bool | None]] = [
            ("channel", c) for c in ([channels] if isinstance(channels, str) else channels)
        ]
        if since is not None:
            query.append(("since", since))
        query.extend((params or {}).items())
        self.timeout = timeout
        self._client = httpx.Client(base_url=base_url, timeout=httpx.Timeout(timeout))
        self._context = self._client.stream("GET", "/sse", params=query, headers=headers)
        self.response: httpx.Response = self._context.__enter__()
        self._chunks: Iterator[bytes] = self.response.iter_raw()
        self.decoder = Decoder()
        self.raw = bytearray()  # everything received, for tests of the exact bytes
        self.ended = False
        self._pending: deque[ServerEvent] = deque()

    def __enter__(self) -> SSEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._context.__exit__(None, None, None)
        finally:
            self._client.close()

    def _receive(self, deadline: float) -> bool:
        """Read one chunk into the decoder; False when the stream has ended."""
        if time.monotonic() > deadline:
            raise TimeoutError("no SSE event within the deadline")
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self.ended = True
            return False
        self.raw += chunk
        self._pending.extend(self.decoder.feed(chunk))
        return True

    def next(self, timeout: float | None = None) -> ServerEvent:
        """The next event of any type; raises StreamEnded if the stream ends first."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self._pending:
            if self.ended or not self._receive(deadline):
                raise StreamEnded(f"stream ended; received {bytes(self.raw[-500:])!r}")
        return self._pending.popleft()

    def expect(self, event: str, timeout: float | None = None) -> ServerEvent:
        """Skip nothing: the next event must be of type ``event``."""
        got = self.next(timeout)
        assert got.event == event, f"expected {event!r}, got {got}"
        return got

    def subscribed(self) -> dict[str, Any]:
        """Read the opening ``tidings.subscribed`` event and return its data."""
        opening = self.expect("tidings.subscribed")
        state: dict[str, Any] = orjson.loads(opening.data)
        assert opening.id == state["cursor"]
        return state

    def events(self, count: int, timeout: float | None = None) -> list[ServerEvent]:
        """The next ``count`` events that are not internal ``tidings.*`` notices."""
        out: list[ServerEvent] = []
        while len(out) < count:
            event = self.next(timeout)
            if not event.event.startswith("tidings."):
                out.append(event)
        return out

    def read_until(self, done: Callable[[], bool], timeout: float | None = None) -> None:
        """Keep reading raw chunks until ``done()`` holds (or the stream ends)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not done():
            if self.ended or not self._receive(deadline):
                return

    def rest(self, timeout: float | None = None) -> list[ServerEvent]:
        """Read until the server ends the stream; every event still to come, in order."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.ended:
            self._receive(deadline)
        out = list(self._pending)
        self._pending.clear()
        return out


def envelope(event: ServerEvent) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(event.data)
    return data


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return orjson.loads(self.body)


def _read_chunked(reader: Any) -> bytes:
    body = bytearray()
    while True:
        size_line = reader.readline()
        if not size_line:
            raise ConnectionError("connection closed inside a chunked body")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while reader.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(body)
        body += reader.read(size)
        reader.readline()


def raw_request(
    base_url: str,
    request: bytes,
    *,
    body_chunks: Iterable[bytes] = (),
    timeout: float = DEADLINE,
) -> RawResponse:
    """Send ``request`` (request line and headers, exactly as given) and then ``body_chunks``.

    Stops sending when the server answers early (e.g. a 413 mid-upload). Reads one response.
    """
    url = urlsplit(base_url)
    assert url.hostname is not None and url.port is not None
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        sock.sendall(request)
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        reader = sock.makefile("rb")
        status_line = reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection without answering")
        _version, status, *reason = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers: dict[str, str] = {}
        while True:
            line = reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = _read_chunked(reader)
        elif "content-length" in headers:
            body = reader.read(int(headers["content-length"]))
        else:
            body = b""
        return RawResponse(int(status), reason[0] if reason else "", headers, body)


def http_request(
    base_url: str,
    method: str,
    target: bytes | str,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
) -> RawResponse:
    """One request with a request target sent byte for byte (no normalisation, no encoding)."""
    url = urlsplit(base_url)
    if isinstance(target, str):
        target = target.encode("latin-1")
    lines = [method.encode() + b" " + target + b" HTTP/1.1", f"Host: {url.netloc}".encode()]
    all_headers = {"Connection": "close", **(headers or {})}
    if body is not None and "Content-Length" not in all_headers:
        all_headers["Content-Length"] = str(len(body))
    lines.extend(f"{k}: {v}".encode("latin-1") for k, v in all_headers.items())
    return raw_request(
        base_url, b"\r\n".join(lines) + b"\r\n\r\n", body_chunks=[body] if body else []
    )


def chunked(data: bytes, size: int = 16 * 1024) -> Iterator[bytes]:
    """``data`` as HTTP/1.1 chunked transfer coding (RFC 9112 §7.1)."""
    for i in range(0, len(data), size):
        piece = data[i : i + size]
        yield b"%x\r\n" % len(piece) + piece + b"\r\n"
    yield b"0\r\n\r\n"


def wait_for(predicate: Callable[[], bool], timeout: float = DEADLINE, what: str = "") -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


def publish(client: httpx.Client, channel: str, data: Any = 0, **kwargs: Any) -> str:
    """Publish one event (JSON ``data``, or raw ``content=``); returns its cursor."""
    if "content" not in kwargs:
        kwargs["json"] = data
    response = client.post(f"/channels/{channel}", **kwargs)
    assert response.status_code == 201, response.text
    cursor: str = response.json()["id"]
    return cursor


def publish_mixed(client: httpx.Client, count: int) -> list[tuple[str, str]]:
    """``count`` events over a few channels; returns (channel, cursor) in publish order."""
    out = []
    for i in range(count):
        channel = ["orders/1", "orders/2", "users/1", "orders/1/items"][i % 4]
        out.append((channel, publish(client, channel, {"i": i})))
    return out
