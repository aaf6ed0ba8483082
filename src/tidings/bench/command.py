"""``tidings bench``: its options and its handler (the CLI imports this module only when the
command runs)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .driver import TRANSPORTS


def transports(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TRANSPORTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown transport {', '.join(unknown) or text!r}; choose from {','.join(TRANSPORTS)}"
        )
    return names


def positive(kind: type[float] | type[int]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument(
        "--subscribers",
        type=positive(int),
        default=200,
        metavar="N",
        help="subscribers per phase (default 200)",
    )
    p.add_argument(
        "--rate",
        type=positive(float),
        default=10.0,
        metavar="EVENTS_PER_S",
        help="paced phase: events per second on the one channel (default 10)",
    )
    p.add_argument(
        "--payload",
        type=positive(int),
        default=256,
        metavar="BYTES",
        help="event data size, JSON (default 256)",
    )
    p.add_argument(
        "--duration",
        type=positive(float),
        default=4.0,
        metavar="SECONDS",
        help="paced phase length; each throughput phase lasts half of it (default 4)",
    )
    p.add_argument(
        "--transports",
        type=transports,
        default=[],
        metavar="LIST",
        help=f"comma-separated, from {','.join(TRANSPORTS)} (default: every one "
        "available; mqtt and amqp when their broker answers)",
    )
    p.add_argument(
        "--poll-interval",
        type=positive(float),
        default=1.0,
        metavar="SECONDS",
        help="short polling: seconds between polls (default 1)",
    )
    p.add_argument(
        "--out",
        default="tidings-bench",
        metavar="DIR",
        help="where bench.json, bench.md and bench.png go (default ./tidings-bench)",
    )
    p.add_argument(
        "--json", default="", metavar="PATH", help="the JSON file (default DIR/bench.json)"
    )
    p.add_argument("--png", default="", metavar="PATH", help="the chart (default DIR/bench.png)")
    p.add_argument("--url", default="", help="measure the hub running here instead of starting one")
    p.add_argument(
        "--pid",
        type=int,
        default=None,
        help="with --url: the hub's process id, to read its CPU time and memory",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=0,
        metavar="PORT",
        help="with --url: the hub's gRPC port (default 50051)",
    )
    p.add_argument(
        "--mqtt",
        default="",
        metavar="URL",
        help="MQTT broker for the relay (default mqtt://127.0.0.1:1883, if it answers)",
    )
    p.add_argument(
        "--amqp",
        default="",
        metavar="URL",
        help="AMQP broker for the relay (default amqp://guest:guest@127.0.0.1:5672/, "
        "if it answers)",
    )


def handle(args: argparse.Namespace) -> int:
    from .runner import Options, run
    from .wire import payload

    try:
        payload(args.payload)
    except ValueError as exc:
        print(f"tidings: {exc}", file=sys.stderr)
        return 2
    if args.pid is not None and not args.url:
        print("tidings: --pid needs --url (a hub bench starts is measured anyway)", file=sys.stderr)
        return 2
    options = Options(
        subscribers=args.subscribers,
        rate=args.rate,
        payload=args.payload,
        duration=args.duration,
        transports=args.transports,
        poll_interval=args.poll_interval,
        out=args.out,
        url=args.url,
        pid=args.pid,
        grpc_port=args.grpc_port,
        mqtt=args.mqtt,
        amqp=args.amqp,
        json=args.json,
        png=args.png,
    )
    argv = sys.argv[sys.argv.index("bench") + 1 :] if "bench" in sys.argv else []
    return run(options, argv)
