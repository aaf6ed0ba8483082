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
import os
import sys
import time
import uuid

import aiomqtt
import orjson

from loadgen import payload
from relaycommon import Receipts, Relay, add_options, measure, server_defaults, until_connected
from target import running_server

MQTT = Relay("mqtt", "bench/mqtt", broker="mosquitto", comm="mosquitto", receiver="subscriber",
             lossy=True)  # fmt: skip
CHANNEL = MQTT.channel
CURSOR = "tidings-cursor"


class Subscriber(Receipts):
    """Receipts of one subscription, by cursor."""

    def on_message(self, message: aiomqtt.Message) -> None:
        now = time.time_ns()
        users = dict(getattr(message.properties, "UserProperty", None) or ())
        key = users.get(CURSOR) or f"?{len(self.first)}"  # MQTT 3.1.1: no cursor to go by
        body = message.payload if isinstance(message.payload, bytes) else b""
        self.record(key, body, now)

    async def run(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.on_message(message)


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
                await until_connected(server, MQTT)
                await measure(args, server, MQTT, sub)
        finally:
            reader.cancel()
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--url", default="mqtt://127.0.0.1:1883")
    p.add_argument("--protocol", default="5", choices=("5", "3.1.1"))
    add_options(p, "mqtt")
    p.add_argument("--link-only", action="store_true", help="measure MQTTLink.send alone")
    return server_defaults(p.parse_args(argv))


if __name__ == "__main__":
    os.sched_setaffinity(0, {1})  # the generator and subscriber: core 1 (server: core 0)
    import uvloop

    sys.exit(uvloop.run(main(parse(sys.argv[1:]))))
