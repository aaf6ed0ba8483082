"""The AMQP relay's throughput (publisher confirms on) and end-to-end latency, against RabbitMQ.

    .venv/bin/python benchmarks/amqpbench.py [--events 20000] [--batch 100] [--in-flight 4]
                                             [--payload 256] [--rate 500] [--seconds 10]
                                             [--queue durable|transient] [--on-start CMD]
                                             [--url amqp://guest:guest@127.0.0.1:5672/]

The server is the usual ``taskset -c 0 python ... tidings serve`` (SQLite, ``durability=normal``)
with ``[amqp]`` pointed at the broker: outbound only (``inbound_queue`` empty), to a fresh durable
topic exchange. The consumer is this process (core 1, beside the generator): aio-pika on one
durable queue bound ``#`` to that exchange, declared before the server starts, consuming with
``no_ack``; ``--queue transient`` makes it a non-durable queue, so RabbitMQ keeps the messages
in memory and the numbers show the relay without the broker's disk. RabbitMQ runs wherever it
runs (``beam.smp``; its CPU is read from ``/proc``): on a two-core machine it competes with
both, so these numbers are for the machine, not the relay alone.

- **throughput**: ``--events`` events of ``--payload`` bytes on ``bench/amqp`` in ``POST /publish``
  batches of ``--batch``, ``--in-flight`` requests at a time, as fast as acknowledged. Reported:
  the HTTP publish rate; the relay's rate (events / time until ``/healthz`` shows the last
  event's cursor, i.e. every event confirmed by the broker); the consumer's rate (events / time
  until the last one arrived). Every event must arrive; duplicates are counted by message id.
- **latency**: single-event publishes paced at ``--rate`` for ``--seconds``; each event's data
  carries ``time.time_ns()`` taken before its request is written, and the consumer subtracts it
  from ``time.time_ns()`` at receipt (same host clock): p50/p90/p99/max.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from loadgen import HTTPConnection, check_ack, payload, request
from target import CLK_TCK, Server, Window, percentile, running_server

CHANNEL = "bench/amqp"
_TS = re.compile(rb'"t":(\d+)')


class Consumer:
    """Receipts of one queue: message id -> (send ns from the data, first receipt ns)."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[int, int]] = {}
        self.duplicates = 0
        self.last_receipt = 0.0
        self.arrived = asyncio.Event()
        self.expect = 0

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        now = time.time_ns()
        key = message.message_id or ""
        if key in self.first:
            self.duplicates += 1
            return
        match = _TS.search(message.body)
        self.first[key] = (int(match.group(1)) if match else 0, now)
        self.last_receipt = time.perf_counter()
        if len(self.first) >= self.expect:
            self.arrived.set()

    def reset(self, expect: int) -> None:
        self.first.clear()
        self.duplicates = 0
        self.expect = expect
        self.arrived.clear()


def beam_pid() -> int | None:
    """RabbitMQ's Erlang VM, to read its CPU time (never touched otherwise)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
    return None


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def until_confirmed(server: Server, cursor: str) -> float:
    """perf_counter time at which /healthz first shows the relay's cursor at ``cursor``."""
    seq = int(cursor.rsplit(":", 1)[1])
    while True:
        status = (await server.health())["relays"]["amqp"]
        if status["cursor"] and int(status["cursor"].rsplit(":", 1)[1]) >= seq:
            return time.perf_counter()
        await asyncio.sleep(0.005)


async def throughput(
    args: argparse.Namespace, server: Server, consumer: Consumer
) -> dict[str, Any]:
    n, batch = args.events, args.batch
    requests = n // batch
    event = {"channel": CHANNEL, "data": payload(args.payload)}
    raw = request("POST", "/publish", orjson.dumps({"events": [event] * batch}))
    consumer.reset(requests * batch)
    conns = [await HTTPConnection.open(server.port) for _ in range(args.in_flight)]
    beam = beam_pid()
    beam0 = cpu_seconds(beam)
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
        newest = max(last, key=lambda c: int(c.rsplit(":", 1)[1]))
        confirmed = await asyncio.wait_for(until_confirmed(server, newest), args.timeout)
        await asyncio.wait_for(consumer.arrived.wait(), args.timeout)
    for conn in conns:
        conn.close()
    total = requests * batch
    return {
        "events": total,
        "http_publish_per_s": round(total / (published - t0)),
        "relay_confirmed_per_s": round(total / (confirmed - t0)),
        "consumer_received_per_s": round(total / (consumer.last_receipt - t0)),
        "missing": total - len(consumer.first),
        "duplicates": consumer.duplicates,
        "server_cpu_us_per_event": round(1e6 * window.server_cpu / total, 1),
        "rabbitmq_cpu_util": round((cpu_seconds(beam) - beam0) / window.elapsed, 3),
        **window.summary(),
    }


async def latency(args: argparse.Namespace, server: Server, consumer: Consumer) -> dict[str, Any]:
    conn = await HTTPConnection.open(server.port)
    path = f"/channels/{CHANNEL}"
    sent = 0
    consumer.reset(1 << 62)
    loop = asyncio.get_running_loop()
    interval, nxt = 1.0 / args.rate, loop.time()
    end = nxt + args.seconds
    while nxt < end:
        t = time.time_ns()
        await check_ack(conn.send(request("POST", path, orjson.dumps(payload(args.payload, t)))))
        sent += 1
        nxt += interval
        await asyncio.sleep(max(0.0, nxt - loop.time()))
    conn.close()
    consumer.expect = sent
    if len(consumer.first) >= sent:
        consumer.arrived.set()
    with contextlib.suppress(TimeoutError):  # what is missing then is reported
        await asyncio.wait_for(consumer.arrived.wait(), args.timeout)
    lat = sorted((now - t) / 1e6 for t, now in consumer.first.values())
    return {
        "rate_per_s": args.rate,
        "sent": sent,
        "received": len(consumer.first),
        "duplicates": consumer.duplicates,
        "p50_ms": round(percentile(lat, 50), 2),
        "p90_ms": round(percentile(lat, 90), 2),
        "p99_ms": round(percentile(lat, 99), 2),
        "max_ms": round(lat[-1], 2) if lat else None,
    }


async def main(args: argparse.Namespace) -> int:
    name = f"amqpbench-{uuid.uuid4().hex[:8]}"
    broker = await aio_pika.connect(args.url)
    channel = await broker.channel()
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(name, durable=args.queue == "durable")
    await queue.bind(exchange, "#")
    consumer = Consumer()
    env = {
        "TIDINGS_AMQP_URL": args.url,
        "TIDINGS_AMQP_EXCHANGE": name,
        "TIDINGS_AMQP_INBOUND_QUEUE": "",
    }
    try:
        async with running_server(args, env, Server(args, env)) as server:
            for _ in range(400):
                health = await server.health()
                if health.get("relays", {}).get("amqp", {}).get("connected"):
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"the relay did not connect: {health}\n{server.log()}")
            tag = await queue.consume(consumer.on_message, no_ack=True)
            print(f"throughput: {args.events} events in batches of {args.batch}", flush=True)
            for key, value in (await throughput(args, server, consumer)).items():
                print(f"  {key:32} {value}")
            print(f"latency: {args.rate} events/s for {args.seconds} s", flush=True)
            for key, value in (await latency(args, server, consumer)).items():
                print(f"  {key:32} {value}")
            await queue.cancel(tag)
    finally:
        await channel.queue_delete(name)
        await channel.exchange_delete(name)
        await broker.close()
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--payload", type=int, default=256)
    p.add_argument("--rate", type=float, default=500.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--durability", default="normal", choices=("normal", "full"))
    p.add_argument("--queue", default="durable", choices=("durable", "transient"),
                   help="the consumer's queue (transient: not written to disk)")  # fmt: skip
    p.add_argument("--on-start", help="run this once the server is up, e.g. a profiler: "
                   "'py-spy record --format raw -o /tmp/amqp.txt --pid {pid}'")  # fmt: skip
    args = p.parse_args(argv)
    # What target.Server and running_server read.
    args.port, args.queue_size, args.python = 0, 0, None
    args.gc_stats, args.gc_threshold, args.gc_freeze = False, None, None
    return args


if __name__ == "__main__":
    os.sched_setaffinity(0, {1})  # the generator and consumer: core 1 (server: core 0)
    import uvloop

    sys.exit(uvloop.run(main(parse(sys.argv[1:]))))
