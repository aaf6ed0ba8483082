"""The client over WebSocket (``GET /ws``, docs/websocket.md): a transport and a publisher.

Rules:
- A subscription holds one connection with one ``subscribe`` (id ``"s"``, ``"binary": true``):
  ``subscribed`` becomes a ``Position``, each ``event`` a ``ReceivedEvent``. Binary data arrives
  raw in binary frames; ``ReceivedEvent.raw`` gets its ``data_base64`` back, so the envelope is
  the same on every transport.
- Failures map onto the client's errors as on HTTP: a refused handshake by its status
  (``errors.error_for``), a close by the ``CLOSE_CODES`` table, an ``error`` reply by its code
  (``rate_limited`` and ``unavailable`` may work later, the rest will not).
- Liveness is websockets' keepalive: a ping every ``idle_timeout / 2`` seconds, and a pong due
  within ``idle_timeout / 2``, so a dead connection is noticed within about ``idle_timeout``
  (plus up to ``timeout`` for the closing handshake it cannot finish) even when no event flows.
  Server pings never reach ``recv``, so a read timeout could not tell quiet from dead.
- Publishing sends the bytes ``POST /channels/…`` would send, in a binary frame, unless the
  data is a JSON value or text, which goes in the ``publish`` message itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
)

from ..events import sniff_content_type
from .errors import (
    ProtocolError,
    RequestRejected,
    ServerUnavailable,
    TidingsClientError,
    error_for,
)
from .model import (
    TEXT,
    Position,
    ReceivedEvent,
    decode_event,
    encode_data,
    is_json_type,
    parse_json,
)
from .transport import Item, SubscribeOptions

log = logging.getLogger("tidings.client")

SUB = "s"  # the id of the one subscription a transport's connection holds

# docs/websocket.md "Close codes": the error each close code means for the client. A code not
# listed is retried with backoff; 1000 (normal closure) is no error at all.
CLOSE_CODES: dict[int, tuple[type[TidingsClientError], str]] = {
    1001: (ServerUnavailable, "going_away"),
    1011: (ServerUnavailable, "internal_error"),
    1012: (ServerUnavailable, "service_restart"),  # RFC 6455 registry, sent by proxies
    1013: (ServerUnavailable, "try_again_later"),
    4001: (ServerUnavailable, "lagged"),
    1002: (ProtocolError, "protocol_error"),
    1007: (ProtocolError, "invalid_data"),
    1009: (RequestRejected, "message_too_big"),
    4401: (RequestRejected, "unauthorized"),
    4403: (RequestRejected, "forbidden"),
}

# ``error`` codes that may succeed later (HTTP's 429 and 503); every other code will not.
RETRY_LATER = frozenset({"rate_limited", "unavailable", "too_many_connections"})

# Headers of the Client's HTTP requests that describe HTTP itself, not the caller: the
# WebSocket handshake sets its own (RFC 6455 §4.1).
_NOT_FORWARDED = frozenset(
    {
        "accept",
        "accept-encoding",
        "connection",
        "content-length",
        "host",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
    }
)


# -- pure codecs -----------------------------------------------------------------------------


def websocket_url(base: str) -> str:
    """``GET /ws`` of the server at ``base``: ``http`` becomes ``ws``, ``https`` ``wss``."""
    parts = urlsplit(base)
    scheme = {"http": "ws", "https": "wss"}[parts.scheme]
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws", "", ""))


def handshake_headers(headers: httpx.Headers) -> list[tuple[str, str]]:
    """The caller's headers (``Authorization``, …) among the Client's, for the handshake."""
    return [
        (name, value)
        for name, value in headers.multi_items()
        if name.lower() not in _NOT_FORWARDED and not name.lower().startswith("sec-websocket-")
    ]


def subscribe_message(patterns: Sequence[str], since: str | None) -> bytes:
    message: dict[str, Any] = {"op": "subscribe", "id": SUB, "channels": list(patterns)}
    if since is not None:
        message["since"] = since
    message["binary"] = True
    return orjson.dumps(message)


def publish_frame(
    message_id: int,
    channel: str,
    data: object,
    *,
    type: str | None = None,
    content_type: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[bytes, bool]:
    """The frame publishing ``data`` as ``Client.publish`` over HTTP would, and whether it is text.

    A JSON value goes as ``data`` (what HTTP sends as JSON), and so does a ``str`` that is not
    declared JSON (text). Everything else is sent as its exact bytes in a binary frame, with
    the content type the server would give them on HTTP: declared, else recognised from the
    bytes (``tidings.events.sniff_content_type``). Bytes that are JSON are not parsed and
    re-encoded, so the event holds them exactly as given, as on HTTP.
    """
    head: dict[str, Any] = {"op": "publish", "id": message_id, "channel": channel}
    if type is not None:
        head["type"] = type
    if idempotency_key is not None:
        head["idempotency_key"] = idempotency_key
    declared_json = content_type is not None and is_json_type(content_type)
    if isinstance(data, str) and not declared_json:
        head["datacontenttype"] = content_type or TEXT
        head["data"] = data
        return orjson.dumps(head), True
    if not isinstance(data, str | bytes | bytearray | memoryview) and (
        content_type is None or declared_json
    ):
        if content_type is not None:
            head["datacontenttype"] = content_type
        head["data"] = data
        return orjson.dumps(head), True
    body, declared = encode_data(data, content_type)
    head["datacontenttype"] = declared or sniff_content_type(body)
    # docs/websocket.md "Binary frames": the JSON never holds a raw newline (orjson escapes it).
    return orjson.dumps(head) + b"\n" + body, False


def decode_message(frame: str | bytes) -> tuple[dict[str, Any], bytes | None]:
    """A server message, and the raw data that followed it when it came in a binary frame."""
    data: bytes | None = None
    if isinstance(frame, str):
        message = parse_json(frame, "a WebSocket message")
    else:
        head, newline, data = frame.partition(b"\n")
        if not newline:
            raise ProtocolError("protocol", "a binary WebSocket frame without a JSON header line")
        message = parse_json(head, "a binary WebSocket frame's header")
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ProtocolError("protocol", f"a WebSocket message without an op: {str(frame)[:200]}")
    return message, data


def received_event(message: dict[str, Any], data: bytes | None) -> ReceivedEvent:
    """The event in an ``event`` message; ``data``: what followed it in a binary frame."""
    envelope = message.get("event")
    if data is None:
        return decode_event(envelope)
    if not isinstance(envelope, dict) or "data" in envelope or "data_base64" in envelope:
        raise ProtocolError("protocol", f"malformed binary event message: {str(message)[:200]}")
    raw = {**envelope, "data_base64": base64.b64encode(data).decode("ascii")}
    return dataclasses.replace(decode_event(envelope), data=data, raw=raw)


def subscribed_position(message: dict[str, Any]) -> Position:
    cursor, reason = message.get("cursor"), message.get("reason")
    if not isinstance(cursor, str):
        raise ProtocolError("protocol", f"malformed subscribed message: {str(message)[:200]}")
    return Position(
        cursor, bool(message.get("recovered", True)), None if reason is None else str(reason)
    )


def reply_error(message: dict[str, Any]) -> TidingsClientError:
    """The error an ``error`` message reports. ``status`` is None: there is no HTTP status."""
    code = str(message.get("error", "error"))
    detail = str(message.get("detail", code))
    kind = ServerUnavailable if code in RETRY_LATER else RequestRejected
    return kind(code, detail)


def close_error(closed: ConnectionClosed) -> TidingsClientError | None:
    """The error a closed connection means, by the server's close code; None for 1000."""
    if closed.rcvd is None:  # 1006: no close frame, or this side failed the connection
        reason = closed.sent.reason if closed.sent is not None else ""
        return ServerUnavailable("connection_lost", f"WebSocket connection lost {reason}".strip())
    code, reason = closed.rcvd.code, closed.rcvd.reason
    if code == 1000:
        return None
    kind, name = CLOSE_CODES.get(code, (ServerUnavailable, "closed"))
    return kind(name, reason or f"WebSocket closed with code {code}")


# -- connections -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to open a connection to ``GET /ws``."""

    url: str
    headers: list[tuple[str, str]]
    timeout: float  # opening and closing handshakes; publish acknowledgements
    idle_timeout: float

    @classmethod
    def of(cls, http: httpx.AsyncClient, timeout: float, idle_timeout: float) -> Endpoint:
        return cls(
            websocket_url(str(http.base_url)),
            handshake_headers(http.headers),
            timeout,
            idle_timeout,
        )

    async def open(self) -> ClientConnection:
        """A new connection; the client's errors for a refused or failed handshake."""
        try:
            return await connect(
                self.url,
                additional_headers=self.headers,
                open_timeout=self.timeout,
                close_timeout=self.timeout,
                ping_interval=self.idle_timeout / 2,
                ping_timeout=self.idle_timeout / 2,
                # The server bounds events (http.max_event_bytes); a client has no better limit.
                max_size=None,
            )
        except InvalidStatus as exc:
            raise error_for(exc.response.status_code, bytes(exc.response.body or b"")) from exc
        except (OSError, InvalidMessage) as exc:  # includes TimeoutError; InvalidMessage: EOF
            reason = str(exc) or type(exc).__name__
            raise ServerUnavailable("unreachable", f"cannot reach {self.url}: {reason}") from exc
        except InvalidHandshake as exc:
            raise ProtocolError("protocol", f"{self.url} refused the WebSocket: {exc}") from exc

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[ClientConnection]:
        websocket = await self.open()
        try:
            yield websocket
        finally:
            await websocket.close()


class WebSocketTransport:
    """Subscribes over one WebSocket per ``stream``; ``aclose`` closes it from any task."""

    def __init__(self, http: httpx.AsyncClient, options: SubscribeOptions) -> None:
        self.endpoint = Endpoint.of(http, options.timeout, options.idle_timeout)
        self.patterns = options.patterns
        self._websocket: ClientConnection | None = None

    async def stream(self, cursor: str | None) -> AsyncGenerator[Item, None]:
        async with self.endpoint.connection() as websocket:
            self._websocket = websocket
            try:
                await websocket.send(subscribe_message(self.patterns, cursor), text=True)
                while True:
                    message, data = decode_message(await websocket.recv())
                    op = message["op"]
                    if op == "event" and message.get("sub") == SUB:
                        yield received_event(message, data)
                    elif op == "subscribed" and message.get("id") == SUB:
                        yield subscribed_position(message)
                    elif op == "error":  # it can only be about the subscribe: nothing else is sent
                        raise reply_error(message)
                    else:
                        log.debug("ignoring WebSocket message %s", op)
            except ConnectionClosed as exc:
                error = close_error(exc)
                if error is not None:
                    raise error from exc
            finally:
                self._websocket = None

    async def aclose(self) -> None:
        """Close the open connection, if any: its ``stream`` ends without an error."""
        if self._websocket is not None:
            await self._websocket.close()


class WebSocketPublisher:
    """Publishes with acknowledgements over one WebSocket, opened on first use and after a drop.

    Publishes are sent as they come, many at once, each with a new id; the server acknowledges
    them in any order, and each caller waits for the ``published`` or ``error`` with its id.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._websocket: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._opening = asyncio.Lock()
        self._closed = False

    async def publish(
        self,
        channel: str,
        data: object,
        *,
        type: str | None = None,
        content_type: str | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[str, bool]:
        """Publish one event; its cursor, and whether its idempotency key replayed an earlier one.

        Raises ``RequestRejected`` for a refusal (an ``error`` reply, a ``4401``/``4403``
        close), ``ServerUnavailable`` when no acknowledgement came: the connection could not
        be opened or dropped, or ``timeout`` passed. The event may then be in history or not:
        publish again with the same ``idempotency_key`` to be sure it is there once.
        """
        message_id = next(self._ids)
        frame, text = publish_frame(
            message_id,
            channel,
            data,
            type=type,
            content_type=content_type,
            idempotency_key=idempotency_key,
        )
        websocket = await self._open()
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = reply
        try:
            async with asyncio.timeout(self.endpoint.timeout):
                try:
                    await websocket.send(frame, text=text)
                except ConnectionClosed as exc:
                    raise (close_error(exc) or _dropped()) from exc
                message = await reply
        except TimeoutError:
            raise ServerUnavailable(
                "timeout",
                f"no acknowledgement from {self.endpoint.url} within {self.endpoint.timeout:g} s",
            ) from None
        finally:
            del self._pending[message_id]
        cursor, replayed = message.get("cursor"), message.get("replayed")
        if not isinstance(cursor, str) or not isinstance(replayed, bool):
            raise ProtocolError("protocol", f"malformed published message: {str(message)[:200]}")
        return cursor, replayed

    async def _open(self) -> ClientConnection:
        async with self._opening:
            if self._closed:
                raise ServerUnavailable("closed", "the client is closed")
            if self._websocket is None:
                if self._reader is not None:
                    await self._reader  # finished: it let go of the last connection
                self._websocket = await self.endpoint.open()
                self._reader = asyncio.create_task(self._read(self._websocket))
            return self._websocket

    async def _read(self, websocket: ClientConnection) -> None:
        """Hand each reply to the publish waiting for its id, until the connection ends."""
        error: TidingsClientError
        try:
            while True:
                message, _ = decode_message(await websocket.recv())
                message_id = message.get("id")
                waiting = self._pending.get(message_id) if isinstance(message_id, int) else None
                if waiting is None or waiting.done():
                    log.debug("ignoring WebSocket message %s", str(message)[:200])
                elif message["op"] == "published":
                    waiting.set_result(message)
                elif message["op"] == "error":
                    waiting.set_exception(reply_error(message))
        except ConnectionClosed as exc:
            error = close_error(exc) or _dropped()
        except ProtocolError as exc:
            error = exc
            await websocket.close(1002, "unreadable message")  # RFC 6455 §7.4.1
        finally:
            if self._websocket is websocket:
                self._websocket = None  # the next publish opens a new connection
        for waiting in self._pending.values():
            if not waiting.done():
                waiting.set_exception(type(error)(error.code, error.detail, error.status))

    async def aclose(self) -> None:
        """Close the connection; publishes still waiting raise ``ServerUnavailable``."""
        async with self._opening:
            self._closed = True
            if self._websocket is not None:
                await self._websocket.close()
            if self._reader is not None:
                await self._reader


def _dropped() -> ServerUnavailable:
    return ServerUnavailable("connection_lost", "the WebSocket closed before the acknowledgement")
