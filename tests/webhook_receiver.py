"""A real HTTP receiver for end-to-end webhook tests, and the helpers that check what it got.

The receiver is a threaded HTTP/1.1 server on 127.0.0.1:<free port>. It records every request
(arrival time, method, path, headers, body) before it answers, so a request counts as received
even when the sender gives up on the answer (a timeout, a kill). Answers are scripted: a queue
of ``Answer`` consumed in order, then ``respond(request)`` if set, then ``default``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import standardwebhooks
import svix

T = TypeVar("T")

WAIT = 10.0  # seconds a poll waits before failing the test


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float | None = None  # seconds before answering; None: the receiver's delay
    body: bytes = b"ok"


@dataclass(frozen=True)
class Received:
    time: float  # time.time() on arrival, before the answer
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased (a repeated name: its last value)
    body: bytes
    fields: tuple[tuple[str, str], ...] = ()  # every header line as sent, repeats included

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    """Use as a context manager; ``url`` is where to point an endpoint."""

    def __init__(self, default: Answer | None = None, delay: float = 0.0) -> None:
        self.default = default or Answer()
        self.delay = delay
        self.answers: list[Answer] = []
        self.respond: Callable[[Received], Answer | None] | None = None
        self._requests: list[Received] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                fields = tuple(self.headers.items())
                request = Received(time.time(), self.command, self.path, headers, body, fields)
                answer = receiver._record(request)
                delay = receiver.delay if answer.delay is None else answer.delay
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)
                    self.wfile.flush()
                except OSError:  # the sender gave up waiting (timeout) or was killed
                    self.close_connection = True

            do_POST = do_GET = do_PUT = do_HEAD = do_DELETE = _handle

        return Handler

    def _record(self, request: Received) -> Answer:
        with self._lock:
            self._requests.append(request)
            if self.answers:
                return self.answers.pop(0)
        if self.respond is not None:
            chosen = self.respond(request)
            if chosen is not None:
                return chosen
        return self.default

    def script(self, *answers: Answer | int) -> None:
        """Answer the next requests with these, in order (an int is a bare status)."""
        with self._lock:
            self.answers.extend(a if isinstance(a, Answer) else Answer(a) for a in answers)

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def requests(self) -> list[Received]:
        with self._lock:
            return list(self._requests)

    def ids(self) -> list[str]:
        return [r.id for r in self.requests]

    def wait_for(self, count: int, timeout: float = WAIT) -> list[Received]:
        """The requests once there are at least ``count`` of them."""

        def enough() -> list[Received] | None:
            requests = self.requests
            return requests if len(requests) >= count else None

        return poll(enough, timeout, lambda: f"{count} requests (got {len(self.requests)})")

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def poll(
    check: Callable[[], T | bool | None],
    timeout: float = WAIT,
    what: Callable[[], str] | str = "the condition",
    interval: float = 0.02,
) -> T:
    """``check()``'s first truthy value, polled until ``timeout``; fails the test after."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            shown = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {shown}")
        time.sleep(interval)


def verify(secret: str, request: Received) -> None:
    """Verify ``request`` with both reference verifiers (raises if either refuses it)."""
    standardwebhooks.Webhook(secret).verify(request.body, request.headers)
    svix.Webhook(secret).verify(request.body, request.headers)


def refused(secret: str, request: Received) -> bool:
    """Whether both reference verifiers refuse ``request`` under ``secret``."""
    outcomes = []
    for verifier in (standardwebhooks.Webhook(secret), svix.Webhook(secret)):
        try:
            verifier.verify(request.body, request.headers)
        except standardwebhooks.WebhookVerificationError:
            outcomes.append(True)
        else:
            outcomes.append(False)
    return all(outcomes)
