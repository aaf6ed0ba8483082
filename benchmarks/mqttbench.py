"""The MQTT relay's throughput (QoS 1: every message PUBACKed) and end-to-end latency, against
Mosquitto.

    .venv/bin/python benchmarks/mqttbench.py [--events 20000] [--batch 100] [--in-flight 4]
                                             [--payload 256] [--rate 500] [--seconds 10]
                                             [--url mqtt://127.0.0.1:1883] [--protocol 5]

The server is the usual ``taskset -c 0 python ... tidings serve`` (SQLite, ``durability=normal``)
with ``[mqtt]`` pointed at the broker: outbound only (``inbound_prefix`` empty), QoS 1, to a
fresh topic prefix. The subscriber is this process (core 1, beside the generator): aiomqtt,
MQTT 5, subscribed to ``{prefix}/#`` at QoS 1 before the server starts. Mosquitto runs wherever
it runs (its CPU is read from ``/proc``): on a two-core machine it competes with both, so these
numbers are for the machine, not the relay alone.

- **throughput**: ``--events`` events of ``--payload`` bytes on ``bench/mqtt`` in
  ``POST /publish`` batches of ``--batch``, ``--in-flight`` requests at a time, as fast as
  acknowledged. Reported: the HTTP publish rate; the relay's rate (events / time until
  ``/healthz`` shows the last event's cursor, i.e. every event PUBACKed by the broker); the
  subscriber's rate (events / time until the last one arrived). Every event must arrive;
  duplicates are counted by the ``tidings-cursor`` user property. (Mosquitto queues at most
  ``max_queued_messages``, 1000 by default, for a subscriber that falls behind, and drops the
  rest: ``missing`` then counts the subscriber's shortfall, not the relay's.)
- **link** (``--link-only``, instead of the above): no server; this process drives the relay's
  own ``MQTTLink.send`` (the part that turns logged events into PUBACKed messages) over 256-event
  batches, as the relay does, and reports events/s and this process's CPU per event: what the
  MQTT client (aiomqtt, paho) and the relay cost, without HTTP and the log.
- **latency**: single-event publishes paced at ``--rate`` for ``--seconds``; each event's data
  carries ``time.time_ns()`` taken before its request is written, and the subscriber subtracts
  it from ``time.time_ns()`` at receipt (same host clock): p50/p90/p99/max.
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

import aiomqtt
import orjson

from loadgen import HTTPConnection, check_ack, payload, request
from target import CLK_TCK, Server, Window, percentile, running_server

CHANNEL = "bench/mqtt"
CURSOR = "tidings-cursor"
_TS = re.compile(rb'"t":(\d+)')


class Subscriber:
    """Receipts of one subscription: cursor -> (send ns from the data, first receipt ns)."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[int, int]] = {}
        self.duplicates = 0
        self.last_receipt = 0.0
        self.arrived = asyncio.Event()
        self.expect = 0

    def on_message(self, message: aiomqtt.Message) -> None:
        now = time.time_ns()
        users = dict(getattr(message.properties, "UserProperty", None) or ())
        key = users.get(CURSOR) or f"?{len(self.first)}"  # MQTT 3.1.1: no cursor to go by
        if key in self.first:
            self.duplicates += 1
            return
        body = message.payload if isinstance(message.payload, bytes) else b""
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

    async def run(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.on_message(message)


def broker_pid() -> int | None:
    """Mosquitto's process, to read its CPU time (never touched otherwise)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "mosquitto":
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
        status = (await server.health())["relays"]["mqtt"]
        if status["cursor"] and int(status["cursor"].rsplit(":", 1)[1]) >= seq:
            return time.perf_counter()
        await asyncio.sleep(0.005)


async def throughput(args: argparse.Namespace, server: Server, sub: Subscriber) -> dict[str, Any]:
    n, batch = args.events, args.batch
    requests = n // batch
    event = {"channel": CHANNEL, "data": payload(args.payload)}
    raw = request("POST", "/publish", orjson.dumps({"events": [event] * batch}))
    sub.reset(requests * batch)
    conns = [await HTTPConnection.open(server.port) for _ in range(args.in_flight)]
    broker = broker_pid()
    broker0 = cpu_seconds(broker)
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
        with contextlib.suppress(TimeoutError):  # what is missing then is reported
            await asyncio.wait_for(sub.arrived.wait(), 5.0)
    for conn in conns:
        conn.close()
    total = requests * batch
    return {
        "events": total,
        "http_publish_per_s": round(total / (published - t0)),
        "relay_confirmed_per_s": round(total / (confirmed - t0)),
        "subscriber_received_per_s": round(len(sub.first) / (sub.last_receipt - t0))
        if sub.first
        else 0,
        "missing": total - len(sub.first),
        "duplicates": sub.duplicates,
        "server_cpu_us_per_event": round(1e6 * window.server_cpu / total, 1),
        "mosquitto_cpu_util": round((cpu_seconds(broker) - broker0) / window.elapsed, 3),
        **window.summary(),
    }


async def latency(args: argparse.Namespace, server: Server, sub: Subscriber) -> dict[str, Any]:
    conn = await HTTPConnection.open(server.port)
    path = f"/channels/{CHANNEL}"
    sent = 0
    sub.reset(1 << 62)
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
    sub.expect = sent
    if len(sub.first) >= sent:
        sub.arrived.set()
    with contextlib.suppress(TimeoutError):  # what is missing then is reported
        await asyncio.wait_for(sub.arrived.wait(), args.timeout)
    lat = sorted((now - t) / 1e6 for t, now in sub.first.values())
    return {
        "rate_per_s": args.rate,
        "sent": sent,
        "received": len(sub.first),
        "duplicates": sub.duplicates,
        "p50_ms": round(percentile(lat, 50), 2),
        "p90_ms": round(percentile(lat, 90), 2),
        "p99_ms": round(percentile(lat, 99), 2),
        "max_ms": round(lat[-1], 2) if lat else None,
    }


async def link_only(args: argparse.Namespace) -> int:
    from tidings.brokers.memory import MemoryBroker
    from tidings.config import MQTTSettings
    from tidings.events import Event
    from tidings.hub import Hub
    from tidings.log.memory import MemoryLog
    from tidings.relays.mqtt import MQTTRelay

    settings = MQTTSettings(url=args.url, protocol=args.protocol, inbound_prefix="",
                            prefix=f"mqttbench-{uuid.uuid4().hex[:8]}")  # fmt: skip
    relay = MQTTRelay(Hub(MemoryLog(), MemoryBroker()), settings, 1 << 20)
    data = orjson.dumps(payload(args.payload))
    now = time.time()
    events = [Event("bench", i + 1, CHANNEL, "message", data, "application/json", now)
              for i in range(args.events)]  # fmt: skip
    async with relay._connect() as link:
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(events), 256):  # OutboundRelay's batch
            await link.send(events[start : start + 256])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"link: {args.events} events, window {link.window} (the broker's Receive Maximum)")
    print(f"  {'link_confirmed_per_s':32} {round(args.events / wall)}")
    print(f"  {'client_cpu_us_per_event':32} {round(1e6 * cpu / args.events, 1)}")
    print(f"  {'client_cpu_util':32} {round(cpu / wall, 3)}")
    return 0


async def main(args: argparse.Namespace) -> int:
    if args.link_only:
        return await link_only(args)
    prefix = f"mqttbench-{uuid.uuid4().hex[:8]}"
    host, _, port = args.url.removeprefix("mqtt://").partition(":")
    sub = Subscriber()
    env = {
        "TIDINGS_MQTT_URL": args.url,
        "TIDINGS_MQTT_PREFIX": prefix,
        "TIDINGS_MQTT_INBOUND_PREFIX": "",
        "TIDINGS_MQTT_PROTOCOL": args.protocol,
    }
    client = aiomqtt.Client(host, int(port or 1883), protocol=aiomqtt.ProtocolVersion.V5)
    async with client:
        await client.subscribe(f"{prefix}/#", qos=1)
        reader = asyncio.create_task(sub.run(client))
        try:
            async with running_server(args, env) as server:
                for _ in range(400):
                    health = await server.health()
                    if health.get("relays", {}).get("mqtt", {}).get("connected"):
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise RuntimeError(f"the relay did not connect: {health}\n{server.log()}")
                print(f"throughput: {args.events} events in batches of {args.batch}", flush=True)
                for key, value in (await throughput(args, server, sub)).items():
                    print(f"  {key:32} {value}")
                print(f"latency: {args.rate} events/s for {args.seconds} s", flush=True)
                for key, value in (await latency(args, server, sub)).items():
                    print(f"  {key:32} {value}")
        finally:
            reader.cancel()
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--url", default="mqtt://127.0.0.1:1883")
    p.add_argument("--protocol", default="5", choices=("5", "3.1.1"))
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--payload", type=int, default=256)
    p.add_argument("--rate", type=float, default=500.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--durability", default="normal", choices=("normal", "full"))
    p.add_argument("--link-only", action="store_true", help="measure MQTTLink.send alone")
    p.add_argument("--on-start", help="run this once the server is up, e.g. a profiler: "
                   "'py-spy record --format raw -o /tmp/mqtt.txt --pid {pid}'")  # fmt: skip
    args = p.parse_args(argv)
    # What target.Server and running_server read.
    args.port, args.queue_size, args.python = 0, 0, None
    args.gc_stats, args.gc_threshold, args.gc_freeze = False, None, None
    return args


if __name__ == "__main__":
    os.sched_setaffinity(0, {1})  # the generator and subscriber: core 1 (server: core 0)
    import uvloop

    sys.exit(uvloop.run(main(parse(sys.argv[1:]))))
