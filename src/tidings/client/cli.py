"""``tidings publish`` and ``tidings subscribe``: the client from the command line.

``tidings webhooks …`` is in ``webhooks_cli``; this module registers it.

Output is one JSON line per event (the CloudEvents envelope), flushed as it arrives, so the
commands compose with ``jq`` and scripts. Problems go to stderr as one ``tidings: …`` line;
exit codes are ``tidings.cli``'s: 1 for a refused request or an unreachable server, 2 for bad
usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Mapping
from typing import Any, get_args

import orjson

from ..exceptions import ConfigError
from .client import DEFAULT_URL, Client, PublishVia, check_url
from .errors import TidingsClientError
from .model import ContinuityLost
from .transport import TRANSPORTS


def _fail(message: str) -> int:
    print(f"tidings: {message}", file=sys.stderr, flush=True)
    return 1


def _printing(command: Coroutine[Any, Any, None]) -> int:
    """Run a command that prints as it goes; its exit code. A refusal or an unreachable server
    is one line on stderr (1); a reader that went away (``| head -n 3``) ends it quietly (0)."""
    try:
        asyncio.run(command)
    except TidingsClientError as exc:
        return _fail(exc.detail)
    except BrokenPipeError:
        # Point stdout at /dev/null so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _url(args: argparse.Namespace) -> str:
    try:
        return check_url(args.url)
    except ValueError as exc:
        raise ConfigError(f"--url or TIDINGS_URL: {exc}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return value


def cmd_publish(args: argparse.Namespace) -> int:
    url = _url(args)
    data: bytes = sys.stdin.buffer.read() if args.data in (None, "-") else args.data.encode()

    via: PublishVia = args.via

    async def publish() -> Mapping[str, Any]:
        async with Client(url, grpc_target=args.grpc_target) as client:
            # bytes: the server recognises JSON or text unless --content-type says otherwise.
            return await client.publish(
                args.channel,
                data,
                type=args.type,
                content_type=args.content_type,
                idempotency_key=args.idempotency_key,
                via=via,
            )

    try:
        envelope = asyncio.run(publish())
    except TidingsClientError as exc:
        return _fail(exc.detail)
    sys.stdout.buffer.write(orjson.dumps(envelope) + b"\n")
    sys.stdout.flush()
    return 0


def cmd_subscribe(args: argparse.Namespace) -> int:
    url = _url(args)

    async def subscribe() -> None:
        out = sys.stdout.buffer
        received = 0
        async with (
            Client(url, grpc_target=args.grpc_target) as client,
            client.subscribe(
                args.patterns,
                via=args.via,
                since=args.since,
                poll_interval=args.poll_interval,
                wait=args.wait,
            ) as subscription,
        ):
            async for item in subscription:
                if isinstance(item, ContinuityLost):
                    print(
                        f"tidings: continuity lost ({item.reason}); "
                        f"events may be missing; resuming at {item.resumed_at}",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                out.write(orjson.dumps(item.raw) + b"\n")
                out.flush()
                received += 1
                if args.count is not None and received >= args.count:
                    return

    return _printing(subscribe())


def add_commands(commands: Any) -> None:
    """Add ``publish``, ``subscribe`` and ``webhooks`` to the ``tidings`` command's subparsers."""
    from . import webhooks_cli  # imports this module's helpers

    url_help = f"server URL (default: $TIDINGS_URL or {DEFAULT_URL})"
    default_url = os.environ.get("TIDINGS_URL") or DEFAULT_URL
    grpc_help = (
        "--via grpc: the server's gRPC address (default: $TIDINGS_GRPC_TARGET, "
        "else the host of the URL, port 50051)"
    )
    default_grpc = os.environ.get("TIDINGS_GRPC_TARGET") or None

    publish = commands.add_parser(
        "publish",
        help="publish one event",
        description="Publish one event and print its envelope as one JSON line (with --via ws, "
        'the acknowledgement: {"id": CURSOR, "replayed": BOOL}). DATA is sent as given '
        "(JSON or text is recognised unless --content-type says otherwise); omitted or '-' "
        "reads it from standard input.",
    )
    publish.add_argument("channel", metavar="CHANNEL", help="channel, e.g. orders/42/status")
    publish.add_argument("data", metavar="DATA", nargs="?", help="event data, or - for stdin")
    publish.add_argument("--type", help="event type (default: message)")
    publish.add_argument("--content-type", help="media type of DATA, e.g. application/json")
    publish.add_argument("--idempotency-key", help="publish at most once per key and channel")
    publish.add_argument(
        "--via",
        choices=list(get_args(PublishVia)),
        default="http",
        help="http and grpc print the stored envelope, ws the acknowledgement (default: http)",
    )
    publish.add_argument("--url", default=default_url, help=url_help)
    publish.add_argument("--grpc-target", metavar="HOST:PORT", default=default_grpc, help=grpc_help)
    publish.set_defaults(handler=cmd_publish)

    subscribe = commands.add_parser(
        "subscribe",
        help="print events as they arrive",
        description="Print one JSON line (the event's envelope) per event on channels matching "
        "the patterns, resuming by itself after dropped connections. A notice on stderr says "
        "when the server could not continue from the cursor and events may be missing.",
    )
    subscribe.add_argument(
        "patterns", metavar="PATTERN", nargs="+", help="channel or pattern (* one segment, ** rest)"
    )
    subscribe.add_argument(
        "--via",
        choices=list(TRANSPORTS),
        default="sse",
        help="transport (default: sse; ws is WebSocket, grpc the gRPC API)",
    )
    subscribe.add_argument("--since", metavar="CURSOR", help="start after this event id")
    subscribe.add_argument(
        "--count", metavar="N", type=_positive, help="exit after N events (for scripts)"
    )
    subscribe.add_argument(
        "--poll-interval",
        metavar="SECONDS",
        type=_seconds,
        default=1.0,
        help="--via poll: pause between polls once caught up (default: 1)",
    )
    subscribe.add_argument(
        "--wait",
        metavar="SECONDS",
        type=_seconds,
        default=30.0,
        help="--via longpoll: how long the server holds each poll (default: 30)",
    )
    subscribe.add_argument("--url", default=default_url, help=url_help)
    subscribe.add_argument(
        "--grpc-target", metavar="HOST:PORT", default=default_grpc, help=grpc_help
    )
    subscribe.set_defaults(handler=cmd_subscribe)

    webhooks_cli.add_commands(commands)
