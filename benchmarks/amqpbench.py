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
import os
import sys
import time
import uuid

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from relaycommon import Receipts, Relay, add_options, measure, server_defaults, until_connected
from target import Server, running_server

AMQP = Relay("amqp", "bench/amqp", broker="rabbitmq", comm="beam.smp", receiver="consumer")


class Consumer(Receipts):
    """Receipts of one queue, by message id."""

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        now = time.time_ns()
        self.record(message.message_id or "", message.body, now)


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
            await until_connected(server, AMQP)
            tag = await queue.consume(consumer.on_message, no_ack=True)
            await measure(args, server, AMQP, consumer)
            await queue.cancel(tag)
    finally:
        await channel.queue_delete(name)
        await channel.exchange_delete(name)
        await broker.close()
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    add_options(p, "amqp")
    p.add_argument("--queue", default="durable", choices=("durable", "transient"),
                   help="the consumer's queue (transient: not written to disk)")  # fmt: skip
    return server_defaults(p.parse_args(argv))


if __name__ == "__main__":
    os.sched_setaffinity(0, {1})  # the generator and consumer: core 1 (server: core 0)
    import uvloop

    sys.exit(uvloop.run(main(parse(sys.argv[1:]))))
