"""gRPC: the ``tidings.v1.Tidings`` service, with health checking and reflection (docs/grpc.md).

Rules:
- One ``grpc.aio`` server in the process's event loop, on its own port. Calls go through the
  same gate as HTTP requests (rate limits, credential, grants) and reach the hub and nothing
  else. Every refusal aborts the call with the status of docs/grpc.md, the detail for humans,
  and the machine-readable code in the trailing metadata ``tidings-error``.
- ``Subscribe`` streams pre-encoded messages: each event's ``SubscribeResponse`` is encoded once
  and shared by every gRPC subscriber. The handler writes what the client's flow control lets
  through; the hub's bounded queue holds the rest and ends a subscriber that falls behind
  (``RESOURCE_EXHAUSTED``, ``lagged``): the publish path never waits on a stream. A handler
  waiting on a client that reads nothing holds one message: the hub has already dropped the
  subscription, and the status follows what the client's flow-control window took.
- Shutdown: health turns ``NOT_SERVING`` first, then streams end with ``UNAVAILABLE`` as the hub
  drains, then the server stops.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..auth import Grant
from ..config import GrpcSettings
from ..events import Cursor, Draft, Event, Pattern, make_draft, parse_patterns
from ..exceptions import (
    BadRequest,
    ConfigError,
    InvalidEvent,
    InvalidParameter,
    PayloadTooLarge,
    TidingsError,
    TooManyRequests,
    Unavailable,
)
from ..hub import Subscription
from ..limits import Action, client_key
from ..v1 import tidings_pb2 as pb
from . import Context, bearer, gate

log = logging.getLogger("tidings.grpc")

SERVICE = "tidings.v1.Tidings"
BATCH = 256  # events taken from a subscription at a time

Request = TypeVar("Request")
Reply = TypeVar("Reply")

_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def status_of(exc: TidingsError) -> grpc.StatusCode:
    if exc.code == "too_many_connections":  # 503 when the whole server is full: still a limit
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return _STATUS.get(exc.status, grpc.StatusCode.INTERNAL)


def _event_message(event: Event) -> pb.Event:
    seconds, fraction = divmod(event.time, 1.0)
    return pb.Event(
        id=event.cursor,
        channel=event.channel,
        type=event.type,
        source=f"/channels/{event.channel}",
        time=Timestamp(seconds=int(seconds), nanos=int(fraction * 1e9)),
        datacontenttype=event.content_type,
        data=event.data,
        specversion="1.0",
    )


def _varint(n: int) -> bytes:
    # The protobuf package exposes no varint encoder; this is its base-128 rule, 7 bits a byte.
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _encode_subscribe_event(event: Event) -> bytes:
    # SubscribeResponse{event: ...}: field 2, length-delimited (tag 0x12), then the Event.
    body = _event_message(event).SerializeToString()
    return b"\x12" + _varint(len(body)) + body


def subscribe_event(event: Event) -> bytes:
    """The encoded ``SubscribeResponse`` carrying ``event``, shared by every gRPC subscriber."""
    return event.wire("grpc-subscribe", _encode_subscribe_event)


def _identity(message: bytes) -> bytes:
    return message


class Service:
    """The handlers of ``tidings.v1.Tidings``."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.delivered = ctx.hub.metrics.delivered.labels("grpc")

    # -- the gate ------------------------------------------------------------------------------

    def admit(self, context: grpc.aio.ServicerContext[Any, Any], action: Action) -> Grant:
        """``gate`` for a call: the peer's address, the ``authorization`` metadata."""

        def token() -> str | None:
            for key, value in context.invocation_metadata() or ():
                if key == "authorization":
                    return bearer(value if isinstance(value, str) else value.decode("latin-1"))
            return None

        return gate(self.ctx, action, peer_address(context.peer()), token)

    def _draft(self, request: pb.PublishRequest, where: str) -> Draft:
        limit = self.ctx.settings.http.max_event_bytes
        if len(request.data) > limit:
            raise PayloadTooLarge(
                f"{where}data is {len(request.data)} bytes; the limit is {limit} "
                "(http.max_event_bytes)"
            )
        try:
            return make_draft(
                request.channel,
                request.data,
                content_type=request.content_type or None,
                type=request.type or None,
                idempotency_key=request.idempotency_key or None,
            )
        except BadRequest as exc:
            raise type(exc)(f"{where}{exc.detail}") from None

    def _patterns(self, channels: Sequence[str]) -> tuple[Pattern, ...]:
        limit = self.ctx.settings.limits.max_channels
        if len(channels) > limit:
            raise InvalidParameter(
                f"at most {limit} channels (limits.max_channels), not {len(channels)}"
            )
        return parse_patterns(channels)

    # -- calls ---------------------------------------------------------------------------------

    async def publish(
        self, request: pb.PublishRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PublishResponse:
        grant = self.admit(context, "publish")
        draft = self._draft(request, "")
        grant.check_publish(draft.channel)
        [appended] = await self.ctx.hub.publish([draft])
        return pb.PublishResponse(
            event=_event_message(appended.event), replayed=not appended.created
        )

    async def publish_batch(
        self, request: pb.PublishBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PublishBatchResponse:
        grant = self.admit(context, "publish")
        most = self.ctx.settings.http.max_batch
        if not 1 <= len(request.events) <= most:
            raise InvalidEvent(f"a batch holds 1 to {most} events, not {len(request.events)}")
        drafts = [self._draft(item, f"events[{i}]: ") for i, item in enumerate(request.events)]
        for draft in drafts:
            grant.check_publish(draft.channel)
        appended = await self.ctx.hub.publish(drafts)
        return pb.PublishBatchResponse(events=[_event_message(a.event) for a in appended])

    async def history(
        self, request: pb.HistoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HistoryResponse:
        grant = self.admit(context, "subscribe")
        patterns = self._patterns(request.channels)
        grant.check_subscribe(patterns)
        http = self.ctx.settings.http
        if request.limit > http.max_limit:
            raise InvalidParameter(
                f"limit must be at most {http.max_limit} (http.max_limit), not {request.limit}"
            )
        limit = request.limit or http.default_limit
        since = Cursor.parse(request.since) if request.since else None
        page = await self.ctx.hub.history(patterns, since, limit, "grpc")
        return pb.HistoryResponse(
            events=[_event_message(e) for e in page.events],
            cursor=page.cursor,
            recovered=page.recovered,
            reason=page.reason or "",
            more=page.more,
        )

    async def subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        grant = self.admit(context, "subscribe")
        patterns = self._patterns(request.channels)
        grant.check_subscribe(patterns)
        since = Cursor.parse(request.since) if request.since else None
        slot = self.ctx.limits.streams.acquire(peer_address(context.peer()))
        try:
            sub = await self.ctx.hub.subscribe(patterns, since, "grpc")

            def finished(_: grpc.aio.ServicerContext[Any, Any]) -> None:
                # The call ended from outside (client gone, ping timeout, deadline): gRPC may
                # never resume this generator, so its ``finally`` cannot be relied on.
                sub.close()
                slot.release()

            # types-grpcio declares the callback as a class, not a Protocol: no function fits.
            context.add_done_callback(finished)  # type: ignore[arg-type]
            try:
                async for message in self._stream(sub):
                    yield message
            finally:
                sub.close()
        finally:
            slot.release()
        if sub.ended == "lagged":
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "lagged",
                f"subscriber fell behind ({sub.ended_why}): resume after the last event's id",
            )
        if sub.ended == "shutdown":
            await abort_with(context, Unavailable(SHUTDOWN))

    async def _stream(self, sub: Subscription) -> AsyncIterator[bytes]:
        opening = pb.Subscribed(cursor=sub.cursor, recovered=sub.recovered, reason=sub.reason or "")
        yield pb.SubscribeResponse(subscribed=opening).SerializeToString()
        delivered = self.delivered
        while True:
            batch = await sub.next_batch(BATCH)
            if not batch:
                return  # ended: lagged, shutdown or closed
            for event in batch:
                yield subscribe_event(event)
            delivered.inc(len(batch))


SHUTDOWN = "the server is shutting down: reconnect and resume after the last event's id"


def peer_address(peer: str) -> str:
    """The client address of a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return client_key(rest.rpartition(":")[0])
    if kind == "ipv6":
        return client_key(rest.rpartition(":")[0].strip("[]"))
    return peer  # unix sockets and the like: one key per peer string


async def abort(
    context: grpc.aio.ServicerContext[Any, Any],
    status: grpc.StatusCode,
    code: str,
    detail: str,
    extra: tuple[tuple[str, str], ...] = (),
) -> NoReturn:
    await context.abort(status, detail, trailing_metadata=(("tidings-error", code), *extra))
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: TidingsError) -> NoReturn:
    extra: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, TooManyRequests):
        extra = (("retry-after", exc.retry_after_header),)
    await abort(context, status_of(exc), exc.code, exc.detail, extra)


def unary(
    call: Callable[[Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Reply]],
) -> Callable[[Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Reply]]:
    """A unary handler whose TidingsErrors become the documented status codes."""

    async def handler(request: Request, context: grpc.aio.ServicerContext[Any, Any]) -> Reply:
        try:
            return await call(request, context)
        except TidingsError as exc:
            await abort_with(context, exc)

    return handler


def streaming(
    call: Callable[[Request, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]],
) -> Callable[[Request, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]]:
    async def handler(
        request: Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        try:
            async for message in call(request, context):
                yield message
        except TidingsError as exc:
            await abort_with(context, exc)

    return handler


def service_handler(service: Service) -> grpc.GenericRpcHandler:
    methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Publish": grpc.unary_unary_rpc_method_handler(
            unary(service.publish),
            request_deserializer=pb.PublishRequest.FromString,
            response_serializer=pb.PublishResponse.SerializeToString,
        ),
        "PublishBatch": grpc.unary_unary_rpc_method_handler(
            unary(service.publish_batch),
            request_deserializer=pb.PublishBatchRequest.FromString,
            response_serializer=pb.PublishBatchResponse.SerializeToString,
        ),
        "Subscribe": grpc.unary_stream_rpc_method_handler(
            streaming(service.subscribe),
            request_deserializer=pb.SubscribeRequest.FromString,
            response_serializer=_identity,  # messages come encoded (``subscribe_event``)
        ),
        "History": grpc.unary_unary_rpc_method_handler(
            unary(service.history),
            request_deserializer=pb.HistoryRequest.FromString,
            response_serializer=pb.HistoryResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)


class GrpcServer:
    """The gRPC server of one node: the service, health checking and reflection."""

    def __init__(self, ctx: Context, settings: GrpcSettings, host: str) -> None:
        self.ctx = ctx
        self.settings = settings
        self.host = settings.host or host
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        megabytes = int(settings.max_message)
        ms = int(settings.keepalive_interval * 1000)
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", megabytes),
                ("grpc.max_send_message_length", megabytes),
                ("grpc.keepalive_time_ms", ms),
                ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
                # grpcio waits this long for a ping's answer (keepalive_timeout_ms alone is
                # not applied: a silent peer would be dropped only after the 60 s default).
                ("grpc.http2.ping_timeout_ms", int(settings.keepalive_timeout * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                # Clients may ping every 10 s without being told off (GOAWAY).
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_ping_strikes", 0),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.server.add_generic_rpc_handlers((service_handler(Service(ctx)),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)  # fmt: skip
        reflection.enable_server_reflection(names, self.server)

    async def start(self) -> int:
        address = (
            f"[{self.host}]:{self.settings.port}"
            if ":" in self.host
            else (f"{self.host}:{self.settings.port}")
        )
        try:
            if self.settings.tls_cert_file:
                credentials = grpc.ssl_server_credentials(
                    [(_read(self.settings.tls_key_file), _read(self.settings.tls_cert_file))]
                )
                port = self.server.add_secure_port(address, credentials)
            else:
                port = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
            raise ConfigError(f"cannot listen for gRPC on {address} (grpc.port): {exc}") from None
        if port == 0:
            raise ConfigError(f"cannot listen for gRPC on {address} (grpc.host, grpc.port)")
        await self.server.start()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.port = port
        return port

    async def drain(self) -> None:
        """Report NOT_SERVING (load balancers stop sending calls); calls still run."""
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"gRPC TLS: cannot read {path}: {exc.strerror}") from None
