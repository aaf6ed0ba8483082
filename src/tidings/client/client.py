"""``Client``: publish over HTTP, WebSocket or gRPC, subscribe over any transport, resuming."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NotRequired, Self, TypedDict, overload
from urllib.parse import quote, urlsplit

import httpx

from .errors import ProtocolError, check, unreachable
from .model import batch_item, encode_data, parse_json
from .subscription import Subscription
from .transport import SubscribeOptions, Via, transport_factory

if TYPE_CHECKING:
    from .grpc import GrpcEndpoint
    from .ws import WebSocketPublisher

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_GRPC_PORT = 50051  # grpc.port's default (docs/grpc.md)

PublishVia = Literal["http", "ws", "grpc"]
BatchVia = Literal["http", "grpc"]


class BatchEvent(TypedDict):
    """One event for ``Client.publish_batch``; fields as the arguments of ``Client.publish``."""

    channel: str
    data: object
    type: NotRequired[str | None]
    content_type: NotRequired[str | None]
    idempotency_key: NotRequired[str | None]


class Published(TypedDict):
    """What ``Client.publish(..., via="ws")`` returns: the WebSocket acknowledgement.

    ``id`` is the event's cursor, as in the envelope an HTTP publish returns; ``replayed`` is
    true when the idempotency key matched an earlier event, whose cursor ``id`` then is.
    """

    id: str
    replayed: bool


def check_url(url: str) -> str:
    """``url`` without a trailing slash; ``ValueError`` unless it is an http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL of a tidings server")
    return url.rstrip("/")


def default_grpc_target(url: str) -> str:
    """The gRPC address of the server at ``url`` when not given: its host, port 50051."""
    host = urlsplit(url).hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    return f"{host}:{DEFAULT_GRPC_PORT}"


def _segment(segment: str) -> str:
    if segment in (".", ".."):
        return segment.replace(".", "%2E")  # else URL normalisation would remove the segment
    return quote(segment, safe=":")


def channel_path(channel: str) -> str:
    # Percent-encode each segment so the server sees the channel exactly as given, and rejects
    # it by name if it is invalid, rather than a path rewritten on the way.
    return "/channels/" + "/".join(_segment(s) for s in channel.split("/"))


class Client:
    """An async client for one tidings server::

        async with Client("http://127.0.0.1:8080") as client:
            event = await client.publish("orders/42", {"status": "paid"})
            async for item in client.subscribe(["orders/**"], since=event["id"]):
                ...

    ``timeout`` bounds connecting and each request, in seconds (long polls get ``wait`` more),
    and the wait for a WebSocket publish's acknowledgement; ``idle_timeout`` is how long an SSE
    stream may stay silent, without even a ping, before it is reconnected (a WebSocket pings
    the server every ``idle_timeout / 2`` and gives up when no pong comes within as long).
    ``headers`` go with every request and WebSocket handshake (e.g. ``Authorization``), and
    as metadata with every gRPC call. ``transport`` is an httpx transport, for tests and
    custom networking (HTTP only).

    ``grpc_target`` is the server's gRPC address, ``"host:port"`` (default: the host of
    ``url``, port 50051), used by ``via="grpc"``. The client opens one gRPC channel, at the
    first such call, with TLS when ``url`` is ``https``; on it a subscription's stream is
    kept alive by pings every ``idle_timeout / 2`` (at least 10 s apart), and a publish's
    deadline is ``timeout``.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float = 10.0,
        idle_timeout: float = 45.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        grpc_target: str | None = None,
    ) -> None:
        self.url = check_url(url)
        self.grpc_target = grpc_target or default_grpc_target(self.url)
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=timeout, headers=headers, transport=transport
        )
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._publisher: WebSocketPublisher | None = None  # opened by the first publish via ws
        self._grpc: GrpcEndpoint | None = None  # opened by the first call via grpc

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every subscription of this client and its connections."""
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        if self._publisher is not None:
            await self._publisher.aclose()
        if self._grpc is not None:
            await self._grpc.aclose()
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from exc
        await check(response)
        return parse_json(response.content, f"the answer to {method} {path}")

    @overload
    async def publish(
        self,
        channel: str,
        data: object,
        *,
        type: str | None = None,
        content_type: str | None = None,
        idempotency_key: str | None = None,
        via: Literal["http", "grpc"] = "http",
    ) -> dict[str, Any]: ...

    @overload
    async def publish(
        self,
        channel: str,
        data: object,
        *,
        type: str | None = None,
        content_type: str | None = None,
        idempotency_key: str | None = None,
        via: Literal["ws"],
    ) -> Published: ...

    @overload
    async def publish(
        self,
        channel: str,
        data: object,
        *,
        type: str | None = None,
        content_type: str | None = None,
        idempotency_key: str | None = None,
        via: PublishVia,
    ) -> dict[str, Any] | Published: ...

    async def publish(
        self,
        channel: str,
        data: object,
        *,
        type: str | None = None,
        content_type: str | None = None,
        idempotency_key: str | None = None,
        via: PublishVia = "http",
    ) -> dict[str, Any] | Published:
        """Publish one event; returns once the event is in history.

        ``data``: ``bytes`` are sent as they are (the server recognises JSON or UTF-8 text when
        ``content_type`` is not given, else they are ``application/octet-stream``); ``str`` is
        sent as ``text/plain``; anything else is serialised as JSON. Raises ``RequestRejected``
        (invalid channel, type or data, data over the size limit…) or ``ServerUnavailable``;
        publishing again after the latter is safe with an ``idempotency_key``.

        ``via="http"`` (the default) sends one request and returns the event's CloudEvents
        envelope. ``via="grpc"`` makes one ``Publish`` call on this client's gRPC channel and
        returns the same envelope, built from the stored event the server answers with.
        ``via="ws"`` sends a ``publish`` message on this client's one WebSocket
        (opened by the first such publish, reopened after a drop, shared by concurrent
        publishes) and returns the acknowledgement, ``{"id": cursor, "replayed": bool}``
        (``Published``): the server acknowledges with no more than that. ``["id"]`` is the
        cursor either way. A publish waiting when the WebSocket drops raises
        ``ServerUnavailable``; a refusal's ``RequestRejected`` has ``status`` None over
        WebSocket and gRPC (``code`` is the same as on HTTP).
        """
        if via == "grpc":
            from .grpc import envelope, publish_request

            request = publish_request(
                channel,
                data,
                type=type,
                content_type=content_type,
                idempotency_key=idempotency_key,
            )
            return envelope((await self._grpc_endpoint().publish(request)).event)
        if via == "ws":
            cursor, replayed = await self._websocket_publisher().publish(
                channel,
                data,
                type=type,
                content_type=content_type,
                idempotency_key=idempotency_key,
            )
            return Published(id=cursor, replayed=replayed)
        if via != "http":
            raise ValueError(f"via must be 'http', 'ws' or 'grpc', not {via!r}")
        body, declared = encode_data(data, content_type)
        headers = {}
        if declared is not None:
            headers["Content-Type"] = declared
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        params = {} if type is None else {"type": type}
        envelope = await self._request(
            "POST", channel_path(channel), content=body, headers=headers, params=params
        )
        if not isinstance(envelope, dict):
            raise ProtocolError("protocol", "the publish answer is not an event envelope")
        return envelope

    def _websocket_publisher(self) -> WebSocketPublisher:
        if self._publisher is None:
            from .ws import Endpoint, WebSocketPublisher  # only for those who publish via ws

            endpoint = Endpoint.of(self._http, self.timeout, self.idle_timeout)
            self._publisher = WebSocketPublisher(endpoint)
        return self._publisher

    def _grpc_endpoint(self) -> GrpcEndpoint:
        if self._grpc is None:
            from .grpc import GrpcEndpoint, call_metadata  # only for those who use gRPC

            self._grpc = GrpcEndpoint(
                self.grpc_target,
                call_metadata(self._http.headers),
                tls=urlsplit(self.url).scheme == "https",
                timeout=self.timeout,
                idle_timeout=self.idle_timeout,
            )
        return self._grpc

    async def publish_batch(
        self, events: Iterable[BatchEvent], *, via: BatchVia = "http"
    ) -> list[dict[str, Any]]:
        """Publish events atomically, in order; returns their envelopes in the same order.

        Each event's data is sent as ``publish`` sends it, except that ``bytes`` without a
        ``content_type`` are ``application/octet-stream``. ``via="grpc"`` makes one
        ``PublishBatch`` call on the client's gRPC channel instead of ``POST /publish``.
        """
        if via == "grpc":
            from .grpc import envelope, publish_request

            requests = [
                publish_request(
                    e["channel"],
                    e["data"],
                    type=e.get("type"),
                    content_type=e.get("content_type"),
                    idempotency_key=e.get("idempotency_key"),
                    batch=True,
                )
                for e in events
            ]
            answer = await self._grpc_endpoint().publish_batch(requests)
            return [envelope(event) for event in answer.events]
        if via != "http":
            raise ValueError(f"via must be 'http' or 'grpc', not {via!r}")
        items = [
            batch_item(
                e["channel"],
                e["data"],
                type=e.get("type"),
                content_type=e.get("content_type"),
                idempotency_key=e.get("idempotency_key"),
            )
            for e in events
        ]
        answer = await self._request("POST", "/publish", json={"events": items})
        if not isinstance(answer, dict) or not isinstance(answer.get("events"), list):
            raise ProtocolError("protocol", "the batch publish answer has no events list")
        envelopes: list[dict[str, Any]] = answer["events"]
        return envelopes

    def subscribe(
        self,
        patterns: str | Sequence[str],
        *,
        via: Via = "sse",
        since: str | None = None,
        poll_interval: float = 1.0,
        wait: float = 30.0,
        limit: int | None = None,
    ) -> Subscription:
        """Events on channels matching ``patterns``, after ``since`` (default: from now on).

        Returns a ``Subscription``: an async iterator of ``ReceivedEvent`` and
        ``ContinuityLost`` items that reconnects and resumes by itself (see its docstring).
        ``via`` picks the transport: ``"sse"`` (one long-lived stream), ``"ws"`` (one WebSocket;
        binary data arrives raw, not base64), ``"grpc"`` (one ``Subscribe`` call on the client's
        gRPC channel; ``data`` is the bytes as published), ``"longpoll"`` (requests the
        server holds up to ``wait`` seconds) or ``"poll"`` (a request every ``poll_interval``
        seconds once caught up). ``limit`` caps events per polling answer.
        """
        if isinstance(patterns, str):
            patterns = (patterns,)
        options = SubscribeOptions(
            patterns=tuple(patterns),
            timeout=self.timeout,
            idle_timeout=self.idle_timeout,
            poll_interval=poll_interval,
            wait=wait,
            limit=limit,
            grpc=self._grpc_endpoint,
        )
        transport = transport_factory(via)(self._http, options)
        subscription = Subscription(transport, since)
        self._subscriptions.add(subscription)
        return subscription
