"""The client over gRPC (``tidings.v1.Tidings``, docs/grpc.md): a transport and publishing.

Rules:
- A ``Client`` has one ``grpc.aio`` channel (``GrpcEndpoint``), opened on first use and closed
  with the client; its subscriptions and publishes share it, each as its own call.
- A subscription is one ``Subscribe`` call: ``subscribed`` becomes a ``Position``, each
  ``event`` a ``ReceivedEvent`` whose ``raw`` is the CloudEvents envelope the JSON transports
  carry (JSON data embedded, text as a string, anything else as ``data_base64``), and whose
  ``data`` is the bytes exactly as published.
- Failures map by status code (``STATUS``): shutdowns, lost connections, deadlines and the
  ``RESOURCE_EXHAUSTED`` of a lagged stream, a rate limit or a stream limit may work later
  (``ServerUnavailable``: a subscription reconnects); the others will not (``RequestRejected``).
  The code is the trailing metadata ``tidings-error``, the detail the status details.
- Liveness is gRPC's keepalive: during a call the channel pings every ``idle_timeout / 2``
  seconds (never more often than every 10 s, the server's limit) and gives up when no answer
  comes within ``idle_timeout / 2``, so a dead server is noticed within about ``idle_timeout``
  even on a quiet stream.
- Messages are decoded here rather than by gRPC, so an unreadable one is a ``ProtocolError``
  instead of a status that looks like the server's fault.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncGenerator, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
import httpx
import orjson
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from ..events import is_text_type
from ..v1 import tidings_pb2 as pb
from .errors import ProtocolError, RequestRejected, ServerUnavailable, TidingsClientError
from .model import Position, ReceivedEvent, encode_data, is_json_type
from .transport import Item, SubscribeOptions

log = logging.getLogger("tidings.client")

SERVICE = "/tidings.v1.Tidings/"
ERROR_KEY = "tidings-error"  # docs/grpc.md "Errors": the machine-readable code
MIN_PING_INTERVAL = 10.0  # docs/grpc.md: clients may ping at most every 10 s

Code = grpc.StatusCode

# docs/grpc.md "Errors": what each status means to the client. Not listed: ServerUnavailable
# (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, INTERNAL, UNKNOWN…: may work later).
REJECTED = frozenset(
    {
        Code.INVALID_ARGUMENT,
        Code.UNAUTHENTICATED,
        Code.PERMISSION_DENIED,
        Code.NOT_FOUND,
        Code.ALREADY_EXISTS,
        Code.FAILED_PRECONDITION,
        Code.OUT_OF_RANGE,
        Code.UNIMPLEMENTED,  # not a tidings server, or one without this call
    }
)
# RESOURCE_EXHAUSTED with these codes passes (a lagged stream resumes, limits refill); without
# one it is gRPC's own message size limit, which the same message would hit again.
RETRY_LATER = frozenset({"lagged", "rate_limited", "too_many_connections"})

# Headers of the Client's HTTP requests that describe HTTP itself, not the caller: gRPC sets
# its own or reserves them (gRPC over HTTP/2, "Requests").
_NOT_FORWARDED = frozenset(
    {
        "accept",
        "accept-encoding",
        "connection",
        "content-length",
        "content-type",
        "host",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
    }
)

M = TypeVar("M", bound=Message)


# -- pure codecs -----------------------------------------------------------------------------


def call_metadata(headers: httpx.Headers) -> tuple[tuple[str, str], ...]:
    """The caller's headers (``Authorization``, …) among the Client's, as call metadata."""
    return tuple(
        (name.lower(), value)
        for name, value in headers.multi_items()
        if name.lower() not in _NOT_FORWARDED and not name.lower().startswith("grpc-")
    )


def channel_options(idle_timeout: float) -> list[tuple[str, int]]:
    """Channel arguments: keepalive within ``idle_timeout``, reconnects as quick as ours."""
    half = max(1, round(idle_timeout * 500))  # ms
    return [
        ("grpc.keepalive_time_ms", max(half, round(MIN_PING_INTERVAL * 1000))),
        ("grpc.keepalive_timeout_ms", half),
        # What grpcio 1.85 actually waits for a ping's answer (default 60 s): without it a
        # silent peer is noticed only after a minute, whatever keepalive_timeout_ms says.
        ("grpc.http2.ping_timeout_ms", half),
        # Ping only while a call is open, and keep pinging on a stream that carries no data.
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC's own reconnect schedule (1 s, growing to 120 s by default) would keep a
        # subscription's call failing at once long after the server is back; ``Backoff``'s caps.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 10_000),
        # The server bounds messages (grpc.max_message); a client has no better limit.
        ("grpc.max_receive_message_length", -1),
    ]


def format_time(time: Timestamp) -> str:
    """RFC 3339 UTC with milliseconds, as the JSON envelope's ``time``.

    The server's time is a float of seconds that its JSON envelope rounds to microseconds and
    then truncates to milliseconds; rounding the nanoseconds the same way keeps an event's
    ``time`` the same string on every transport.
    """
    micros = round(time.nanos / 1000)
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=time.seconds, microseconds=micros)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def envelope(event: pb.Event) -> dict[str, Any]:
    """The CloudEvents JSON envelope of ``event``, as HTTP, SSE and polling carry it."""
    content_type = event.datacontenttype
    raw: dict[str, Any] = {
        "specversion": event.specversion,
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "channel": event.channel,
        "time": format_time(event.time),
        "datacontenttype": content_type,
    }
    try:
        if is_json_type(content_type):
            raw["data"] = orjson.loads(event.data)
        elif is_text_type(content_type):
            raw["data"] = event.data.decode("utf-8")
        else:
            raw["data_base64"] = base64.b64encode(event.data).decode("ascii")
    except (orjson.JSONDecodeError, UnicodeDecodeError):
        raise ProtocolError(
            "protocol", f"event {event.id}'s data is not the {content_type} it is declared"
        ) from None
    return raw


def received_event(event: pb.Event) -> ReceivedEvent:
    raw = envelope(event)
    try:
        time = datetime.fromisoformat(raw["time"])
    except ValueError:
        raise ProtocolError("protocol", f"event {event.id} has no valid time") from None
    if not event.id or not event.channel:
        raise ProtocolError("protocol", f"an event without id or channel: {str(event)[:200]}")
    return ReceivedEvent(
        id=event.id,
        channel=event.channel,
        type=event.type,
        time=time,
        content_type=event.datacontenttype,
        data=event.data,
        raw=raw,
    )


def position(subscribed: pb.Subscribed) -> Position:
    if not subscribed.cursor:
        raise ProtocolError("protocol", "a subscribed message without a cursor")
    return Position(subscribed.cursor, subscribed.recovered, subscribed.reason or None)


def stream_item(message: bytes) -> Item | None:
    """What one ``SubscribeResponse`` says; None for a kind this client does not know."""
    response = decode(pb.SubscribeResponse, message)
    kind = response.WhichOneof("kind")
    if kind == "event":
        return received_event(response.event)
    if kind == "subscribed":
        return position(response.subscribed)
    return None


def publish_request(
    channel: str,
    data: object,
    *,
    type: str | None = None,
    content_type: str | None = None,
    idempotency_key: str | None = None,
    batch: bool = False,
) -> pb.PublishRequest:
    """``data`` encoded as ``Client.publish`` sends it over HTTP (``encode_data``).

    An empty ``content_type`` lets the server recognise JSON or text, as on HTTP; ``batch``:
    ``bytes`` without a content type are ``application/octet-stream``, as in ``POST /publish``.
    """
    body, declared = encode_data(data, content_type)
    if batch and declared is None:
        declared = "application/octet-stream"
    return pb.PublishRequest(
        channel=channel,
        type=type or "",
        data=body,
        content_type=declared or "",
        idempotency_key=idempotency_key or "",
    )


def decode(kind: type[M], message: bytes) -> M:
    try:
        return kind.FromString(message)
    except DecodeError as exc:
        name = kind.DESCRIPTOR.name
        raise ProtocolError("protocol", f"an unreadable {name} from the server: {exc}") from None


def rpc_error(
    status: grpc.StatusCode, details: str | None, code: str | None, target: str
) -> TidingsClientError:
    """The error a call that ended with ``status`` means; ``code``: its ``tidings-error``.

    ``status`` of the ``TidingsClientError`` is None: there is no HTTP status.
    """
    detail = details or status.name
    if status in REJECTED:
        return RequestRejected(code or status.name.lower(), detail)
    if status is Code.RESOURCE_EXHAUSTED:
        if code in RETRY_LATER:
            return ServerUnavailable(code, detail)
        return RequestRejected(code or "resource_exhausted", detail)
    if code is not None:
        return ServerUnavailable(code, detail)
    if status is Code.UNAVAILABLE:  # no answer from tidings: the connection failed
        return ServerUnavailable("unreachable", f"cannot reach {target}: {detail}")
    if status is Code.DEADLINE_EXCEEDED:
        return ServerUnavailable("timeout", f"no answer from {target} in time: {detail}")
    return ServerUnavailable(status.name.lower(), detail)


def error_code(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == ERROR_KEY:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


# -- the channel -----------------------------------------------------------------------------


def _raw(message: bytes) -> bytes:
    return message


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


class GrpcEndpoint:
    """A Client's one gRPC channel to ``target``, opened on first use, and the calls on it.

    ``metadata`` goes with every call (the credential); ``timeout`` is the deadline of a
    publish; ``tls`` picks a TLS channel with the system's root certificates.
    """

    def __init__(
        self,
        target: str,
        metadata: tuple[tuple[str, str], ...],
        *,
        tls: bool,
        timeout: float,
        idle_timeout: float,
    ) -> None:
        self.target = target
        self.metadata = metadata
        self.tls = tls
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self._channel: grpc.aio.Channel | None = None
        self._closed = False

    def channel(self) -> grpc.aio.Channel:
        if self._closed:
            raise RuntimeError("this Client is closed: its gRPC channel cannot be used again")
        if self._channel is None:
            options = channel_options(self.idle_timeout)
            if self.tls:
                credentials = grpc.ssl_channel_credentials()
                self._channel = grpc.aio.secure_channel(self.target, credentials, options)
            else:
                self._channel = grpc.aio.insecure_channel(self.target, options)
        return self._channel

    def error(self, exc: grpc.aio.AioRpcError) -> TidingsClientError:
        code = error_code(exc.trailing_metadata())
        return rpc_error(exc.code(), exc.details(), code, self.target)

    async def _unary(self, method: str, request: Message, kind: type[M]) -> M:
        call = self.channel().unary_unary(
            SERVICE + method,
            request_serializer=_serialize,
            response_deserializer=_raw,
        )
        try:
            answer = await call(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from exc
        return decode(kind, answer)

    async def publish(self, request: pb.PublishRequest) -> pb.PublishResponse:
        return await self._unary("Publish", request, pb.PublishResponse)

    async def publish_batch(self, requests: Sequence[pb.PublishRequest]) -> pb.PublishBatchResponse:
        request = pb.PublishBatchRequest(events=requests)
        return await self._unary("PublishBatch", request, pb.PublishBatchResponse)

    def subscribe(self, request: pb.SubscribeRequest) -> grpc.aio.UnaryStreamCall[Any, bytes]:
        """A new ``Subscribe`` call, without a deadline: it lasts as long as it is read."""
        method = self.channel().unary_stream(
            SERVICE + "Subscribe",
            request_serializer=_serialize,
            response_deserializer=_raw,
        )
        return method(request, metadata=self.metadata)

    async def aclose(self) -> None:
        """Close the channel: its open calls end (subscriptions should be closed first)."""
        self._closed = True
        if self._channel is not None:
            await self._channel.close()


class GrpcTransport:
    """Subscribes with one ``Subscribe`` call per ``stream``; ``aclose`` ends it from any task."""

    def __init__(self, http: httpx.AsyncClient, options: SubscribeOptions) -> None:
        if options.grpc is None:
            raise ValueError("the gRPC transport needs a Client's channel: use Client.subscribe")
        self.endpoint: GrpcEndpoint = options.grpc()
        self.patterns = options.patterns
        self._call: grpc.aio.UnaryStreamCall[Any, bytes] | None = None

    async def stream(self, cursor: str | None) -> AsyncGenerator[Item, None]:
        request = pb.SubscribeRequest(channels=self.patterns, since=cursor or "")
        call = self.endpoint.subscribe(request)
        self._call = call
        try:
            while True:
                try:
                    message = await call.read()
                except grpc.aio.AioRpcError as exc:
                    raise self.endpoint.error(exc) from exc
                except asyncio.CancelledError:
                    # grpc.aio raises CancelledError from a call cancelled on this side: by
                    # ``aclose`` or by closing the channel. Only this task's cancellation goes on.
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                    return
                if not isinstance(message, bytes):
                    return  # EOF: the server ended the stream normally
                item = stream_item(message)
                if item is None:
                    log.debug("ignoring a Subscribe message of a kind this client does not know")
                else:
                    yield item
        finally:
            if self._call is call:
                self._call = None
            call.cancel()

    async def aclose(self) -> None:
        """Cancel the open call, if any: its ``stream`` ends without an error."""
        if self._call is not None:
            self._call.cancel()
