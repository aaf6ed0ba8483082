"""The ``tidings`` command: ``serve``, ``status``, ``token``, ``keys``, ``publish``,
``subscribe``, ``webhooks``, ``bench``.

Only this module decides exit codes: 0 success, 1 a failed request or lost connection,
2 bad usage or configuration, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from . import __version__, config
from .exceptions import ConfigError


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is not available on Windows
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _banner(node: object) -> None:
    from .server import Tidings

    assert isinstance(node, Tidings)
    url = node.url
    s = node.settings
    where = {
        "sqlite": f"sqlite {s.log.path}",
        "memory": "memory, lost on restart",
    }.get(s.log.backend, f"{s.log.backend} {_without_password(s.log.url)}, shared by the cluster")
    if node.context.auth.enabled:
        auth = f"JWT ({', '.join(s.auth.jwt_algorithms)}); send Authorization: Bearer <token>"
    else:
        auth = "OFF - anyone who can connect may publish and subscribe"
    ws_url = "ws" + url.removeprefix("http")  # https -> wss
    webhook_line = ""
    if node.context.webhooks is not None:
        webhook_line = f"  webhooks  {url}/webhooks   (admin API, docs/webhooks.md)\n"
    relay_lines = "".join(
        f"  relay     {relay.name} -> {_without_password(getattr(s, relay.name).url)}   "
        "(docs/relays.md)\n"
        for relay in node.context.relays
    )
    grpc_line = ""
    if node.grpc is not None and node.grpc.port is not None:
        grpc_line = f"  gRPC           {node.grpc.host}:{node.grpc.port}   (docs/grpc.md)\n"
    print(
        f"tidings {__version__} listening on {url}  (log: {where})\n"
        f"  auth      {auth}\n"
        f"  publish   POST {url}/channels/{{channel}}   batch: POST {url}/publish\n"
        f"  WebSocket      {ws_url}/ws   (docs/websocket.md)\n"
        f"{grpc_line}"
        f"  SSE       GET  {url}/sse?channel=PATTERN[&since=CURSOR]\n"
        f"  poll      GET  {url}/poll?channel=PATTERN[&since=CURSOR][&wait=SECONDS]\n"
        f"  history   GET  {url}/history?channel=PATTERN[&since=CURSOR]\n"
        f"{webhook_line}{relay_lines}"
        f"  health    GET  {url}/healthz   metrics: {url}/metrics   API: {url}/openapi.json\n"
        f"\n"
        f"Try it:\n"
        f"  curl -N '{url}/sse?channel=demo/**'\n"
        f'  curl -d \'{{"hello": "world"}}\' {url}/channels/demo/greetings\n',
        flush=True,
    )


def _without_password(url: str) -> str:
    """``url`` as safe to print: the user name kept, the password not."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _gc_freeze_then(on_ready: Callable[[Any], None]) -> Callable[[Any], None]:
    def ready(node: Any) -> None:
        # Everything alive at start-up lives as long as the server: keep it out of collections.
        gc.freeze()
        on_ready(node)

    return ready


def _log_option(value: str | None) -> tuple[str | None, str | None]:
    """``--log``/``--cluster``: a backend name, or an engine URL naming its backend."""
    if value is None or "://" not in value:
        return value, None
    scheme = value.split("://", 1)[0]
    for backend, schemes in config.CLUSTER_SCHEMES.items():
        if f"{scheme}://" in schemes:
            return backend, value
    raise ConfigError(
        f"--log/--cluster {value.split('@')[-1][:60]!r}: use sqlite, memory, a redis:// URL or "
        "a nats:// URL"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import Tidings

    settings = config.load(args.config, os.environ)
    backend, url = _log_option(args.cluster or args.log)
    overrides = {
        ("server", "host"): args.host,
        ("server", "port"): args.port,
        ("grpc", "port"): args.grpc_port,
        ("log", "backend"): backend,
        ("log", "url"): url,
        ("log", "path"): args.db,
        ("log", "durability"): args.durability,
        ("auth", "allow_anonymous"): args.allow_anonymous or None,
        ("mqtt", "url"): args.mqtt,
        ("amqp", "url"): args.amqp,
    }
    for (section, key), value in overrides.items():
        if value is not None:
            config._apply(settings, section, key, value, "command line")
    config._check(settings)
    node = Tidings(settings)
    # The process is ours, so tune its garbage collector: the default (700, 10, 10) collects
    # every few hundred allocations, 13% of server CPU under load. With this setting
    # benchmarks/run.py measured 7.2k -> 9.0k publishes/s and a lower latency tail.
    gc.set_threshold(50_000, 20, 1000)
    _run(node.run(on_ready=_gc_freeze_then(_banner)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """What a running node says about itself: its log position, subscribers and relays."""
    import httpx
    import orjson

    from .client.client import check_url

    try:
        url = check_url(args.url)
    except ValueError as exc:
        raise ConfigError(f"--url or TIDINGS_URL: {exc}") from None
    try:
        answer = httpx.get(f"{url}/healthz", timeout=10)
        body = orjson.loads(answer.content)
    except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
        print(f"tidings: cannot read {url}/healthz: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(body).decode())
        return 0
    print(f"{url}: {body.get('status')}  cursor {body.get('cursor')}  "
          f"subscribers {body.get('subscribers')}")  # fmt: skip
    for name, relay in (body.get("relays") or {}).items():
        state = "connected" if relay.get("connected") else "DISCONNECTED"
        print(f"  relay {name:<5} {state:<12} cursor {relay.get('cursor')}  "
              f"lag {relay.get('lag', 0):.3f} s")  # fmt: skip
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from .events import parse_patterns
    from .exceptions import BadRequest
    from .server import make_authenticator, read_file

    settings = config.load(args.config, os.environ)
    ttl = config._coerce("--ttl", config.Duration, args.ttl)
    authenticator = make_authenticator(settings.auth)
    if not authenticator.enabled:
        raise ConfigError("auth is off: set auth.jwt_algorithms and a key first")
    try:
        for patterns in (args.subscribe, args.publish):
            if patterns:
                parse_patterns(patterns)
    except BadRequest as exc:
        print(f"tidings: {exc.detail}", file=sys.stderr)
        return 2
    key = read_file(args.private_key, "--private-key") if args.private_key else None
    print(
        authenticator.mint(
            args.subject,
            subscribe=args.subscribe,
            publish=args.publish,
            admin=args.admin,
            ttl=ttl,
            private_key=key,
        )
    )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    import orjson

    from .exceptions import BadRequest, NotFound
    from .server import make_key_store

    settings = config.load(args.config, os.environ)
    store = make_key_store(settings.auth)
    if store is None:
        raise ConfigError("API keys are off: set auth.api_keys_file (TIDINGS_AUTH_API_KEYS_FILE)")
    try:
        if args.action == "create":
            key, record = store.create(
                args.subject,
                subscribe=args.subscribe,
                publish=args.publish,
                admin=args.admin,
                description=args.description,
            )
            print(key)
            print(
                f"tidings: API key {record.id} for {record.subject!r}; shown once", file=sys.stderr
            )
        elif args.action == "list":
            for record in store.list():
                print(orjson.dumps(record.public()).decode())
        else:
            record = store.revoke(args.id)
            print(orjson.dumps(record.public()).decode())
    except (BadRequest, NotFound) as exc:
        print(f"tidings: {exc.detail}", file=sys.stderr)
        return 1
    return 0


def _grant_arguments(parser: argparse.ArgumentParser) -> None:
    """The grant of a token or an API key: what it may subscribe and publish to, and admin."""
    parser.add_argument("--subscribe", action="append", default=[], metavar="PATTERN")
    parser.add_argument("--publish", action="append", default=[], metavar="PATTERN")
    parser.add_argument("--admin", action="store_true", help="may read metrics and manage keys")


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.command import handle

    return handle(args)


def _bench_parser(commands: Any) -> None:
    from .bench.command import add_arguments

    bench = commands.add_parser(
        "bench",
        help="measure every transport on this machine",
        description="Run the same workload over each transport (a fresh hub each, or --url) "
        "and print the seed's comparison table with measured latency, bytes per event, "
        "throughput, server CPU and memory; write JSON and a PNG chart. See docs/benchmarks.md.",
    )
    add_arguments(bench)
    bench.set_defaults(handler=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidings", description="A real-time notification hub.")
    parser.add_argument("--version", action="version", version=f"tidings {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the hub",
        description="Run the hub: HTTP publish, SSE, long and short polling, history. "
        "Settings come from defaults, then the TOML file (--config or TIDINGS_CONFIG), then "
        "TIDINGS_<SECTION>_<KEY> variables, then these options. See docs/configuration.md.",
    )
    serve.add_argument(
        "--config", default=os.environ.get("TIDINGS_CONFIG"), help="TOML settings file"
    )
    serve.add_argument("--host", help="address to listen on (server.host, default 127.0.0.1)")
    serve.add_argument(
        "--port", type=int, help="port to listen on (server.port, default 8080; 0 = any free)"
    )
    serve.add_argument(
        "--grpc-port", type=int, help="gRPC port (grpc.port, default 50051; 0 = any free)"
    )
    serve.add_argument(
        "--log", metavar="BACKEND|URL",
        help="history backend (log.backend, default sqlite): sqlite, memory, or an engine URL "
        "shared by several nodes, redis://HOST:6379 or nats://HOST:4222 (log.url)",
    )  # fmt: skip
    serve.add_argument(
        "--cluster", metavar="URL",
        help="run as one node of a cluster on Redis or NATS JetStream: the same as --log URL "
        "(docs/cluster.md)",
    )  # fmt: skip
    serve.add_argument("--db", help="SQLite file (log.path, default tidings.db)")
    serve.add_argument(
        "--durability", choices=["normal", "full"], help="SQLite sync level (log.durability)"
    )
    serve.add_argument(
        "--mqtt", metavar="URL", help="relay to and from an MQTT broker (mqtt.url), e.g. "
        "mqtt://127.0.0.1:1883",
    )  # fmt: skip
    serve.add_argument(
        "--amqp", metavar="URL", help="relay to and from an AMQP broker (amqp.url), e.g. "
        "amqp://guest:guest@127.0.0.1:5672/",
    )  # fmt: skip
    serve.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="serve a non-loopback address with auth off (auth.allow_anonymous)",
    )
    serve.set_defaults(handler=cmd_serve)

    token = commands.add_parser(
        "token",
        help="mint a JWT from the configured key",
        description="Mint a JWT for local use, signed with the configured auth.jwt_secret "
        "(HS*) or the private key given with --private-key. Prints the token.",
    )
    token.add_argument("subject", help="the token's sub claim")
    _grant_arguments(token)
    token.add_argument("--ttl", default="1h", help="lifetime, e.g. 15m, 1h, 7d (default 1h)")
    token.add_argument("--private-key", help="PEM private key file for RS/ES/EdDSA")
    token.add_argument("--config", default=os.environ.get("TIDINGS_CONFIG"), help="TOML file")
    token.set_defaults(handler=cmd_token)

    keys = commands.add_parser(
        "keys",
        help="create, list and revoke API keys",
        description="API keys for services, stored hashed in auth.api_keys_file. A running "
        "server picks up changes within seconds.",
    )
    keys.add_argument("--config", default=os.environ.get("TIDINGS_CONFIG"), help="TOML file")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a key; prints it, once")
    create.add_argument("subject", help="who the key is for")
    _grant_arguments(create)
    create.add_argument("--description", default="")
    actions.add_parser("list", help="one JSON line per key (never the key itself)")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id")
    keys.set_defaults(handler=cmd_keys)

    status = commands.add_parser(
        "status",
        help="show a running node's cursor, subscribers and relays",
        description="Read GET /healthz of a running node: its log cursor, live subscribers, "
        "and for each relay (MQTT, AMQP) whether it is connected and how far behind it is.",
    )
    status.add_argument(
        "--url",
        default=os.environ.get("TIDINGS_URL") or "http://127.0.0.1:8080",
        help="server URL (default: $TIDINGS_URL or http://127.0.0.1:8080)",
    )
    status.add_argument("--json", action="store_true", help="print the /healthz answer as is")
    status.set_defaults(handler=cmd_status)

    _bench_parser(commands)

    from .client import cli as client_cli

    client_cli.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        print(f"tidings: configuration error: {exc.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
