"""The composition root: builds the log, broker, hub and HTTP app from settings, and runs them.

Rules:
- Everything runs in one event loop under one TaskGroup; ``run`` returns only when all of it has
  stopped.
- Shutdown (SIGINT/SIGTERM or ``request_shutdown``): stop accepting, end every subscription as
  ``shutdown`` so streams close and clients reconnect elsewhere, let in-flight publishes commit,
  then close the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import signal
import socket
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from . import brokers, relays
from . import log as logs
from .auth import Authenticator, JWKSCache, JWTSettings, KeyStore
from .config import CLUSTER_SCHEMES, AuthSettings, Settings
from .exceptions import ConfigError
from .hub import Hub
from .leases import Leases, leases_for
from .limits import Limits
from .loading import load
from .log import Log
from .metrics import Metrics
from .openapi import openapi_document
from .periodic import every
from .relays import Relay
from .transports import Context, admin, http, origins, polling, sse, webhooks, websocket
from .transports.grpc import GrpcServer
from .webhooks.service import Webhooks
from .webhooks.store import Store, WebhookStore

logger = logging.getLogger("tidings")


def make_log(settings: Settings) -> Log:
    cfg = settings.log
    factory = load(logs.BACKENDS, cfg.backend, "log backend")
    common: dict[str, Any] = {
        "max_events": cfg.max_events,
        "max_age": cfg.max_age,
        "idempotency_window": cfg.idempotency_window,
    }
    if cfg.backend == "sqlite":
        common.update(path=cfg.path, durability=cfg.durability)
    elif clustered(settings):
        common.update(url=cfg.url, prefix=cfg.prefix, replicas=cfg.replicas)
    log: Log = factory(**common)
    return log


def clustered(settings: Settings) -> bool:
    """Whether this node shares its log with others (and so runs durable consumers once)."""
    return settings.log.backend in CLUSTER_SCHEMES


def make_leases(settings: Settings) -> Leases | None:
    """The leases that run each durable consumer on one node of a cluster; None on one node."""
    if not clustered(settings):
        return None
    return leases_for(settings.log.url, settings.log.prefix, settings.log.lease_ttl)


def make_hub(settings: Settings) -> Hub:
    broker = load(brokers.BACKENDS, settings.hub.broker, "broker")()
    return Hub(make_log(settings), broker, queue_size=settings.hub.queue_size, metrics=Metrics())


def read_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None


def make_key_store(cfg: AuthSettings) -> KeyStore | None:
    if not cfg.api_keys_file:
        return None
    store = KeyStore(cfg.api_keys_file)
    store.load()
    return store


def make_authenticator(cfg: AuthSettings) -> Authenticator:
    """JWT verification and API keys from ``[auth]``; files are read here, at start-up."""
    api_keys = make_key_store(cfg)
    if not cfg.jwt_algorithms:
        if cfg.jwt_secret or cfg.jwt_secret_file or cfg.jwt_public_key_files or cfg.jwks_url:
            raise ConfigError("auth keys are configured but auth.jwt_algorithms is empty")
        return Authenticator(None, api_keys=api_keys)
    secret = cfg.jwt_secret or None
    if cfg.jwt_secret_file:
        secret = read_file(cfg.jwt_secret_file, "auth.jwt_secret_file").strip()
    keys = tuple(read_file(path, "auth.jwt_public_key_files") for path in cfg.jwt_public_key_files)
    # The Authenticator checks the combination (a key for every algorithm, key strength, ...).
    settings = JWTSettings(
        algorithms=cfg.jwt_algorithms,
        secret=secret,
        public_keys=keys,
        audience=cfg.jwt_audience or None,
        issuer=cfg.jwt_issuer or None,
        leeway=cfg.jwt_leeway,
        claim=cfg.claim,
    )
    jwks = JWKSCache(cfg.jwks_url) if cfg.jwks_url else None
    try:
        return Authenticator(settings, jwks=jwks, api_keys=api_keys)
    except ConfigError as exc:
        raise ConfigError(f"[auth] settings: {exc.detail}") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(
    hub: Hub,
    settings: Settings,
    auth: Authenticator | None = None,
    leases: Leases | None = None,
) -> Starlette:
    async def openapi(request: Request) -> Response:
        return http.json_response(openapi_document())

    routes = [
        Route("/channels/{channel:path}", http.publish, methods=["POST"]),
        Route("/publish", http.publish_batch, methods=["POST"]),
        Route("/history", http.history, methods=["GET"]),
        Route("/poll", polling.poll, methods=["GET"]),
        Route("/sse", sse.stream, methods=["GET"]),
        Route("/ws", websocket.upgrade_required, methods=["GET"]),
        Route("/healthz", http.healthz, methods=["GET"]),
        Route("/metrics", http.metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/keys", admin.list_keys, methods=["GET"]),
        Route("/keys", admin.create_key, methods=["POST"]),
        Route("/keys/{key_id}", admin.revoke_key, methods=["DELETE"]),
        Route("/webhooks", webhooks.list_endpoints, methods=["GET"]),
        Route("/webhooks", webhooks.create_endpoint, methods=["POST"]),
        Route("/webhooks/{id}", webhooks.get_endpoint, methods=["GET"]),
        Route("/webhooks/{id}", webhooks.update_endpoint, methods=["PATCH"]),
        Route("/webhooks/{id}", webhooks.delete_endpoint, methods=["DELETE"]),
        Route("/webhooks/{id}/rotate", webhooks.rotate_secret, methods=["POST"]),
        Route("/webhooks/{id}/attempts", webhooks.list_attempts, methods=["GET"]),
        Route("/webhooks/{id}/failed", webhooks.list_failed, methods=["GET"]),
        Route("/webhooks/{id}/replay", webhooks.replay, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers=http.exception_handlers)
    app.router.redirect_slashes = False  # "/publish/" is a 404 with a JSON body, not a redirect
    if auth is None:
        auth = make_authenticator(settings.auth)
    app.state.tidings = Context(
        hub,
        settings,
        sse.Streams(settings.sse, hub.metrics, settings.limits.header_timeout),
        auth,
        Limits(settings.limits),
        make_webhooks(hub, settings, leases),
        make_relays(hub, settings),
        leases,
    )
    return app


def make_relays(hub: Hub, settings: Settings) -> tuple[Relay, ...]:
    """The MQTT and AMQP relays that have a broker URL configured."""
    made: list[Relay] = []
    for name in ("mqtt", "amqp"):
        section = getattr(settings, name)
        if not section.url:
            continue
        factory = load(relays.BACKENDS, name, "relay")  # ConfigError naming the extra
        made.append(factory(hub, section, settings.http.max_event_bytes))
    return tuple(made)


def make_webhooks(hub: Hub, settings: Settings, leases: Leases | None = None) -> Webhooks | None:
    """The webhook service, its tables beside the events: in the SQLite file, in memory with a
    memory log, in Redis with a Redis log, in NATS JetStream with a NATS log."""
    if not settings.webhooks.enabled:
        return None
    cfg = settings.log
    store: Store
    if cfg.backend == "redis":
        from .webhooks.redis_store import RedisWebhookStore  # the redis extra

        store = RedisWebhookStore(cfg.url, cfg.prefix)
    elif cfg.backend == "nats":
        from .webhooks.nats_store import NatsWebhookStore  # the nats extra

        # As many replicas as the log's stream: the endpoints and retries are as precious.
        store = NatsWebhookStore(cfg.url, cfg.prefix, replicas=cfg.replicas)
    else:
        store = WebhookStore(cfg.path if cfg.backend == "sqlite" else ":memory:")
    return Webhooks(hub, settings.webhooks, store, leases=leases)


def direct_routes(app: ASGIApp, ctx: Context) -> ASGIApp:
    """``app``, with the requests ``http.direct_publish`` picks (``POST /channels/{channel}``
    that needs no CORS and no query check) answered by ``http.publish_direct`` instead."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        headers = http.direct_publish(scope)
        if headers is None:
            await app(scope, receive, send)
        else:
            await http.publish_direct(ctx, headers, scope, receive, send)

    return asgi


class HeaderDeadline(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's line and headers.

    uvicorn's own ``timeout_keep_alive`` runs only from the end of a response to the first byte
    of the next request: nothing bounds a connection that never sends a request, or one that
    sends its headers a byte at a time (slowloris). This timer starts when the connection opens
    and when a request's first byte arrives, and stops when its headers are complete. When it
    fires, a request that had begun gets ``408`` (RFC 9110 §15.5.9), and the connection closes.

    It also offers ``GET /sse`` requests the hand-off below ASGI (``hand_over``): the stream's
    response head goes out through ASGI, its body from ``transports.sse.Stream``.
    """

    header_timeout: float = 10.0  # set per server by ``header_deadline``

    # One timer per connection, armed lazily: a request only notes when its head began
    # (``_head_since``), and the timer, when it fires, re-arms for what is left of a head still
    # pending (a call_later and a cancel per request cost ~2 us on uvloop, on the publish path).

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_begun = False
        super().connection_made(transport)
        self._head_since: float | None = self.loop.time()
        self._arm_head_timer(self._head_since)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        since = self._head_since = self.loop.time()
        if self._head_timer is None:  # a later request on a kept-alive connection
            self._arm_head_timer(since)

    def on_headers_complete(self) -> None:
        self._head_since = None
        self._head_begun = False
        super().on_headers_complete()
        if self.scope.get("path") == sse.PATH:  # not set for an upgrade: no cycle was made
            self.scope[sse.HANDOFF] = Handoff(self, self.cycle)  # type: ignore[literal-required]

    def handle_websocket_upgrade(self) -> None:
        # uvicorn hands the socket to the WebSocket protocol (transports.websocket); this
        # protocol object is done: no deadline left to keep, and the parser that refers back to
        # it is let go, so it is freed now rather than by the cyclic collector.
        self._stop_head_timer()
        super().handle_websocket_upgrade()
        self.parser = None  # type: ignore[assignment]

    def hand_over(self, cycle: RequestResponseCycle, stream: sse.Stream) -> bool:
        """Give the connection to ``stream`` below ASGI, once ``cycle``'s response head is
        written (``GET /sse``): uvicorn writes nothing more for it, and ``stream`` writes the
        body. False (and nothing changed) if the connection cannot leave: the client is gone,
        a pipelined request waits behind this one, or the body is not chunked."""
        transport = self.transport
        if (
            cycle is not self.cycle
            or self.pipeline
            or cycle.disconnected
            or not cycle.response_started
            or cycle.response_complete
            or not cycle.chunked_encoding
            or transport.is_closing()
        ):
            return False
        cycle.disconnected = True  # uvicorn's send is a no-op now, and run_asgi ends quietly
        self.connections.discard(self)
        self.flow.resume_reading()  # the stream reads, to notice the client leave
        writable = not self.flow.write_paused
        self.parser = None  # type: ignore[assignment]  # it refers back to this protocol
        self._stop_head_timer()
        transport.set_protocol(stream)
        stream.attach(transport, self.connections, writable)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _arm_head_timer(self, since: float) -> None:
        self._head_timer = self.loop.call_at(since + self.header_timeout, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        since = self._head_since
        if since is None or self.transport.is_closing():
            return  # no head pending: the next request's first byte arms the timer again
        if self.loop.time() < since + self.header_timeout:  # a later head, still in time
            self._arm_head_timer(since)
            return
        # Not while an earlier response is still being written (a stream, then a pipelined
        # request that stalls): the 408 would land inside that response.
        if self._head_begun and (self.cycle is None or self.cycle.response_complete):
            detail = (
                f"the request line and headers did not arrive within {self.header_timeout:g} s "
                "(limits.header_timeout)"
            )
            body = orjson.dumps({"error": "request_timeout", "detail": detail})
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
        self.transport.close()


class Handoff:
    """``sse.HANDOFF`` in a ``GET /sse`` request's scope: calls ``HeaderDeadline.hand_over``.
    Weak references, so the scope (held by the request's cycle) makes no reference cycle."""

    __slots__ = ("_cycle", "_protocol")

    def __init__(self, protocol: HeaderDeadline, cycle: RequestResponseCycle) -> None:
        self._protocol = weakref.ref(protocol)
        self._cycle = weakref.ref(cycle)

    def __call__(self, stream: sse.Stream) -> bool:
        protocol, cycle = self._protocol(), self._cycle()
        return protocol is not None and cycle is not None and protocol.hand_over(cycle, stream)


def header_deadline(seconds: float) -> type[HeaderDeadline]:
    """The protocol class for a server whose request heads must arrive within ``seconds``."""
    return type("HeaderDeadline", (HeaderDeadline,), {"header_timeout": seconds})


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handling: ``Tidings`` owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Tidings:
    """One tidings node: ``await Tidings(settings).run()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hub = make_hub(settings)
        self.leases = make_leases(settings)
        self.app = build_app(self.hub, settings, leases=self.leases)
        policy = origins.check(settings.http.origins)
        self.context: Context = self.app.state.tidings
        self.asgi = direct_routes(origins.guard(self.app, policy), self.context)
        self.websockets = websocket.WebSockets(self.context, policy)
        self.grpc: GrpcServer | None = None  # made in ``run``: grpc.aio binds to the loop
        self.socket: socket.socket | None = None
        self._server: _Server | None = None
        self._stopping = asyncio.Event()

    @property
    def port(self) -> int:
        assert self.socket is not None, "not bound yet"
        port: int = self.socket.getsockname()[1]
        return port

    @property
    def url(self) -> str:
        if self.settings.server.public_url:
            return self.settings.server.public_url.rstrip("/")
        host = self.settings.server.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown (call on the event loop's thread)."""
        if self._server is not None:
            if self._server.should_exit:
                self._server.force_exit = True
            self._server.should_exit = True
        self.hub.drain()
        self._stopping.set()

    async def run(self, on_ready: Callable[[Tidings], None] | None = None) -> None:
        server_cfg = self.settings.server
        auth = self.context.auth
        anonymous = not auth.enabled and not self.settings.auth.allow_anonymous
        hosts = [server_cfg.host]
        if self.settings.grpc.enabled:
            hosts.append(self.settings.grpc.host or server_cfg.host)
        public = next((h for h in hosts if not is_loopback(h)), None)
        if anonymous and public is not None:
            raise ConfigError(
                f"refusing to serve {public} without authentication: anyone who "
                "can reach it could publish and subscribe. Configure [auth] "
                "(docs/security.md), or allow anonymous access explicitly "
                "(auth.allow_anonymous = true, or --allow-anonymous)"
            )
        loop = asyncio.get_running_loop()
        signals = threading.current_thread() is threading.main_thread()
        await self.hub.start()
        try:
            if self.leases is not None:
                await self.leases.open()
            try:
                self.socket = bind(server_cfg.host, server_cfg.port)
            except OSError as exc:  # address in use, unknown host, …: the operator's to fix
                raise ConfigError(
                    f"cannot listen on {server_cfg.host}:{server_cfg.port} "
                    f"(server.host, server.port): {exc.strerror or exc}"
                ) from None
            if self.settings.grpc.enabled:
                self.grpc = GrpcServer(self.context, self.settings.grpc, server_cfg.host)
                await self.grpc.start()
            self._server = _Server(self._uvicorn_config())
            if signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, self.request_shutdown)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._once("trim", self._trim_loop))
                grace = self.settings.server.shutdown_grace
                tasks.create_task(self.context.streams.run(self._stopping, grace))
                tasks.create_task(self.websockets.run(self._stopping, grace))
                if self.grpc is not None:
                    tasks.create_task(self._drain_grpc(self.grpc))
                if self.context.webhooks is not None:
                    tasks.create_task(self.context.webhooks.run(self._stopping))
                    # Before serving, so the admin API works once the node says it is up (if
                    # the service fails, the TaskGroup cancels this wait and raises its error).
                    await self.context.webhooks.ready.wait()
                for relay in self.context.relays:
                    tasks.create_task(self._once(f"relay.{relay.name}", relay.run))
                if auth.api_keys is not None:
                    tasks.create_task(auth.api_keys.watch(self._stopping))
                if auth.jwks is not None:
                    await auth.jwks.refresh()
                    tasks.create_task(auth.jwks.run(self._stopping))
                serving = tasks.create_task(self._server.serve(sockets=[self.socket]))
                if on_ready is not None:
                    on_ready(self)  # the socket already listens: early connections queue
                await serving
                self._stopping.set()
        finally:
            if signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
            if self.grpc is not None:
                await self.grpc.stop(self.settings.server.shutdown_grace)
            if self.leases is not None:
                await self.leases.close()
            await self.hub.stop()
            if self.socket is not None:
                self.socket.close()

    async def _drain_grpc(self, grpc: GrpcServer) -> None:
        """At shutdown, health turns NOT_SERVING at once; the port closes after HTTP's."""
        await self._stopping.wait()
        await grpc.drain()

    @property
    def grpc_port(self) -> int:
        assert self.grpc is not None and self.grpc.port is not None, "gRPC is not serving"
        return self.grpc.port

    def _uvicorn_config(self) -> uvicorn.Config:
        server_cfg = self.settings.server
        config = uvicorn.Config(
            self.asgi,
            http=header_deadline(self.settings.limits.header_timeout),
            ws=self.websockets.protocol_class(),  # GET /ws runs below ASGI (transports/websocket)
            lifespan="off",
            access_log=server_cfg.access_log,
            log_level="warning",
            timeout_graceful_shutdown=max(1, int(server_cfg.shutdown_grace)),
            # X-Forwarded-For is read by limits.trusted_proxies alone; uvicorn's own reading
            # would trust it from 127.0.0.1 and rewrite the client address before we see it.
            proxy_headers=False,
            # uvicorn takes whole seconds; docs/security.md says what this deadline covers.
            timeout_keep_alive=max(1, math.ceil(self.settings.limits.idle_timeout)),
            server_header=False,
        )
        if server_cfg.access_log:
            # uvicorn sets its access logger to the (quiet) server level; access lines are INFO.
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        return config

    async def _once(self, name: str, work: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        """Run ``work(stopping)`` here on one node; in a cluster, on whichever node holds the
        lease ``name`` (another takes over within log.lease_ttl when that node dies)."""
        if self.leases is None:
            await work(self._stopping)
        else:
            await self.leases.run(name, lambda: work(self._stopping), self._stopping)

    async def _trim_loop(self, stopping: asyncio.Event) -> None:
        async for _ in every(self.settings.log.trim_interval, stopping):
            try:
                removed = await self.hub.log.trim()
            except Exception:  # a failed trim is retried next interval; the hub keeps serving
                logger.exception("trimming the log failed")
            else:
                if removed:
                    logger.debug("retention removed %d events", removed)
