"""What the relay benchmarks (amqpbench.py, mqttbench.py) share: receipts at the broker's
consumer, the broker's CPU, the relay's state in ``/healthz``, the throughput and latency phases
and their options.

The bench itself owns the broker side: it declares what the relay publishes to, consumes it into
``Receipts`` and starts the server with the relay's settings; then ``measure`` runs and prints
both phases (described in each bench's docstring).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson

from loadgen import HOST, check_ack, payload
from target import Server, Window, paced, percentile
from tidings.bench.proc import cpu_seconds, find_process
from tidings.bench.wire import HTTPConnection, request

_TS = re.compile(rb'"t":(\d+)')


@dataclass(frozen=True)
class Relay:
    """One relay under test and the broker it publishes to."""

    name: str  # its key in /healthz's "relays"
    channel: str  # where the events are published
    broker: str  # the broker's name in the results
    comm: str  # the broker's process name in /proc, to read its CPU time
    receiver: str  # what the bench's side of the broker is called in the results
    # The broker may drop messages for a receiver that falls behind (Mosquitto's
    # max_queued_messages): after the relay's confirms, wait 5 s for the last and report what
    # is missing, instead of failing after --timeout.
    lossy: bool = False


class Receipts:
    """What the receiver got: message key -> (send ns from the data, first receipt ns)."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[int, int]] = {}
        self.duplicates = 0
        self.last_receipt = 0.0
        self.arrived = asyncio.Event()
        self.expect = 0

    def record(self, key: str, body: bytes, now: int) -> None:
        """A message with ``key`` and ``body`` received at ``now`` (``time.time_ns()``)."""
        if key in self.first:
            self.duplicates += 1
            return
        match = _TS.search(body)
        self.first[key] = (int(match.group(1)) if match else 0, now)
        self.last_receipt = time.perf_counter()
        if len(self.first) >= self.expect:
            self.arrived.set()

    def reset(self, expect: int) -> None:
        self.first.clear()
        self.duplicates = 0
        self.expect = expect
        self.arrived.clear()


def broker_cpu(pid: int | None) -> float:
    """CPU seconds of the broker so far; 0 when it was not found."""
    return 0.0 if pid is None else cpu_seconds(pid)


def _seq(cursor: str) -> int:
    return int(cursor.rsplit(":", 1)[1])


async def until_connected(server: Server, relay: Relay) -> None:
    for _ in range(400):
        health = await server.health()
        if health.get("relays", {}).get(relay.name, {}).get("connected"):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the relay did not connect: {health}\n{server.log()}")


async def until_confirmed(server: Server, relay: Relay, cursor: str) -> float:
    """perf_counter time at which /healthz first shows the relay's cursor at ``cursor``."""
    seq = _seq(cursor)
    while True:
        status = (await server.health())["relays"][relay.name]
        if status["cursor"] and _seq(status["cursor"]) >= seq:
            return time.perf_counter()
        await asyncio.sleep(0.005)


async def throughput(
    args: argparse.Namespace, server: Server, relay: Relay, receipts: Receipts
) -> dict[str, Any]:
    n, batch = args.events, args.batch
    requests = n // batch
    event = {"channel": relay.channel, "data": payload(args.payload)}
    raw = request("POST", "/publish", orjson.dumps({"events": [event] * batch}))
    receipts.reset(requests * batch)
    conns = [await HTTPConnection.open(HOST, server.port) for _ in range(args.in_flight)]
    broker = find_process(relay.comm)
    broker0 = broker_cpu(broker)
    last: list[str] = []
    with Window(server) as window:
        t0 = time.perf_counter()

        async def worker(conn: HTTPConnection, count: int) -> None:
            for _ in range(count):
                status, body = await conn.send(raw)
                if status != 201:
                    raise RuntimeError(f"publish answered {status}: {body[:200]!r}")
                last.append(orjson.loads(body)["events"][-1]["id"])

        share = [requests // len(conns) + (i < requests % len(conns)) for i in range(len(conns))]
        await asyncio.gather(*(worker(c, k) for c, k in zip(conns, share, strict=True)))
        published = time.perf_counter()
        newest = max(last, key=_seq)
        confirmed = await asyncio.wait_for(until_confirmed(server, relay, newest), args.timeout)
        if relay.lossy:
            with contextlib.suppress(TimeoutError):  # what is missing then is reported
                await asyncio.wait_for(receipts.arrived.wait(), 5.0)
        else:
            await asyncio.wait_for(receipts.arrived.wait(), args.timeout)
    for conn in conns:
        conn.close()
    total = requests * batch
    received = len(receipts.first)
    return {
        "events": total,
        "http_publish_per_s": round(total / (published - t0)),
        "relay_confirmed_per_s": round(total / (confirmed - t0)),
        f"{relay.receiver}_received_per_s": round(received / (receipts.last_receipt - t0))
        if received
        else 0,
        "missing": total - received,
        "duplicates": receipts.duplicates,
        "server_cpu_us_per_event": round(1e6 * window.server_cpu / total, 1),
        f"{relay.broker}_cpu_util": round((broker_cpu(broker) - broker0) / window.elapsed, 3),
        **window.summary(),
    }


async def latency(
    args: argparse.Namespace, server: Server, relay: Relay, receipts: Receipts
) -> dict[str, Any]:
    conn = await HTTPConnection.open(HOST, server.port)
    path = f"/channels/{relay.channel}"
    receipts.reset(1 << 62)

    async def send(t: int) -> None:
        await check_ack(conn.send(request("POST", path, orjson.dumps(payload(args.payload, t)))))

    sent = await paced(send, args.rate, args.seconds)
    conn.close()
    receipts.expect = sent
    if len(receipts.first) >= sent:
        receipts.arrived.set()
    with contextlib.suppress(TimeoutError):  # what is missing then is reported
        await asyncio.wait_for(receipts.arrived.wait(), args.timeout)
    lat = sorted((now - t) / 1e6 for t, now in receipts.first.values())
    return {
        "rate_per_s": args.rate,
        "sent": sent,
        "received": len(receipts.first),
        "duplicates": receipts.duplicates,
        "p50_ms": round(percentile(lat, 50), 2),
        "p90_ms": round(percentile(lat, 90), 2),
        "p99_ms": round(percentile(lat, 99), 2),
        "max_ms": round(lat[-1], 2) if lat else None,
    }


async def measure(
    args: argparse.Namespace, server: Server, relay: Relay, receipts: Receipts
) -> None:
    """Both phases on a server whose relay is connected, printed as they end."""
    print(f"throughput: {args.events} events in batches of {args.batch}", flush=True)
    for key, value in (await throughput(args, server, relay, receipts)).items():
        print(f"  {key:32} {value}")
    print(f"latency: {args.rate} events/s for {args.seconds} s", flush=True)
    for key, value in (await latency(args, server, relay, receipts)).items():
        print(f"  {key:32} {value}")


def add_options(p: argparse.ArgumentParser, relay: str) -> None:
    """The phases' options, the server's durability and ``--on-start``."""
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--payload", type=int, default=256)
    p.add_argument("--rate", type=float, default=500.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--durability", default="normal", choices=("normal", "full"))
    p.add_argument("--on-start", help="run this once the server is up, e.g. a profiler: "
                   f"'py-spy record --format raw -o /tmp/{relay}.txt --pid {{pid}}'")  # fmt: skip


def server_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with what target.Server and running_server read and these benches never set."""
    args.port, args.queue_size, args.python = 0, 0, None
    args.gc_stats, args.gc_threshold, args.gc_freeze = False, None, None
    return args
