"""The gRPC workloads: ``Subscribe`` fan-out and unary ``Publish`` on tidings' gRPC port.

    .venv/bin/python benchmarks/run.py grpc-fanout|grpc-publish|grpc [--grpc-client lean|aio]

The server is the usual ``taskset -c 0 python -m tidings serve`` with ``TIDINGS_GRPC_PORT`` set
to a free port; the workloads wait for ``grpc.health.v1.Health/Check`` to answer SERVING.

- ``grpc-fanout``: ``--grpc-subscribers`` (500) ``Subscribe`` calls on one channel, spread over
  ``--grpc-connections`` (4) HTTP/2 connections. The phases of ``ws-fanout`` (the same
  ``wsbench.closed_loop`` and ``open_loop``): a closed loop of ``PublishBatch`` calls of
  ``--batch`` events from ``--fan-publishers`` callers, never more than ``--window`` events ahead
  of the slowest subscriber; an open-loop confirmation at ``--confirm`` of that rate; an unbatched
  phase (one ``Publish`` in flight). Then publish-to-delivery latency on the same streams:
  ``--rate`` timestamped ``Publish`` calls per second for ``--grpc-latency-duration`` seconds.
  ``--grpc-fan-publish http`` publishes with ``POST /publish`` instead.
- ``grpc-publish``: ``--publishers`` (50) callers, each with one unary ``Publish`` in flight, over
  ``--grpc-connections`` connections: acknowledged publishes/s, ack latency, server CPU per
  publish (``--compare-http``: then the HTTP ``publish`` workload, side by side).

The generator's client is ``grpcgen.py``'s lean HTTP/2 client (``--grpc-client lean``) or
grpcio's ``grpc.aio`` (``--grpc-client aio``, to cross-check; it costs the generator several
times more CPU per message).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from grpcgen import (
    PUBLISH,
    PUBLISH_BATCH,
    AioUnary,
    H2Connection,
    aio_channel,
    open_aio_subscribers,
    open_subscribers,
    unary,
    wait_serving,
)
from loadgen import HOST, payload_bytes
from target import (
    Server,
    Window,
    idle_memory,
    lagged_total,
    paced,
    percentile,
    receipt_summary,
    running_server,
)
from tidings.bench.hub import free_port
from tidings.bench.proc import CLK_TCK
from tidings.bench.wire import HTTPConnection
from tidings.v1 import tidings_pb2 as pb
from wsbench import Feed, HTTPFeed, closed_loop, open_loop

FAN_CHANNEL, PUBLISH_CHANNEL = "bench/grpcfan", "bench/grpcpub"
STATUS_OK = 0
# Checked besides the target in run.TARGETS: a run with any of these is not a pass.
LATENCY_P99_MS = 35.0

Caller = Callable[[bytes, bytes], Awaitable[tuple[int, bytes]]]


# -- the client side ---------------------------------------------------------------------------


class Client:
    """The generator's gRPC connections: lean ``H2Connection``s or ``grpc.aio`` channels."""

    def __init__(self, args: argparse.Namespace, port: int) -> None:
        self.args = args
        self.port = port
        self.kind = args.grpc_client
        self.conns: list[Any] = []  # for subscribers, or for publishers in grpc-publish
        self.publish_conns: list[Any] = []  # grpc-fanout's publishers: their own connection

    async def _open(self) -> Any:
        if self.kind == "lean":
            return await H2Connection.open(self.port)
        channel = aio_channel(self.port)
        await asyncio.wait_for(channel.channel_ready(), 10)
        return channel

    async def connect(self, n: int, publish: int = 0) -> None:
        self.conns += [await self._open() for _ in range(n)]
        self.publish_conns += [await self._open() for _ in range(publish)]

    def caller(self, i: int) -> Caller:
        """Unary calls on connection ``i`` (round robin): ``await call(path, body)``; on the
        publishers' own connections if there are any."""
        conns = self.publish_conns or self.conns
        conn = conns[i % len(conns)]
        if self.kind == "lean":
            return lambda path, body: unary(conn, path, body)
        return AioUnary(conn).call

    async def subscribe(
        self, n: int, channel: str, receipts: list[tuple[int, int]] | None = None
    ) -> list[Any]:
        request = pb.SubscribeRequest(channels=[channel]).SerializeToString()
        if self.kind == "lean":
            limit = min(c.peer_max_streams for c in self.conns)
            if n > limit * len(self.conns):
                raise RuntimeError(
                    f"the server allows {limit} streams per connection: "
                    f"{n} subscribers need --grpc-connections >= {-(-n // limit)}"
                )
            return await open_subscribers(self.conns, n, request, receipts)
        return await open_aio_subscribers(self.conns, n, request, receipts)

    def transport_reads(self) -> int:
        """TCP reads so far over every lean connection (0 for grpc.aio)."""
        return sum(getattr(c, "reads", 0) for c in self.conns)

    def lowat_dropped(self) -> int:
        """How often ``LowatWatch`` dropped a connection's low-water mark (a stall)."""
        return sum(getattr(c, "lowat_dropped", 0) for c in self.conns)

    async def close(self) -> None:
        for c in self.conns + self.publish_conns:
            if self.kind == "lean":
                c.close()
            else:
                await c.close()


def publish_request(channel: str, size: int, t: int = 0) -> pb.PublishRequest:
    return pb.PublishRequest(channel=channel, data=payload_bytes(size, t))


def check_reply(status: int, reply: bytes, what: str) -> None:
    if status != STATUS_OK:
        raise RuntimeError(f"{what} answered status {status}: {reply[:200]!r}")


class GRPCFeed(Feed):
    """tidings over gRPC: ``PublishBatch`` of ``n`` events, ``Publish`` for one."""

    def __init__(self, call: Caller, channel: str, size: int) -> None:
        self.call, self.channel, self.size = call, channel, size
        self._bodies: dict[int, bytes] = {}

    async def send(self, n: int) -> None:
        body = self._bodies.get(n)
        if body is None:
            one = publish_request(self.channel, self.size)
            if n == 1:
                body = one.SerializeToString()
            else:
                body = pb.PublishBatchRequest(events=[one] * n).SerializeToString()
            self._bodies[n] = body
        status, reply = await self.call(PUBLISH if n == 1 else PUBLISH_BATCH, body)
        check_reply(status, reply, "Publish" if n == 1 else "PublishBatch")

    async def send_timed(self, t: int) -> None:
        body = publish_request(self.channel, self.size, t).SerializeToString()
        status, reply = await self.call(PUBLISH, body)
        check_reply(status, reply, "Publish")

    def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def grpc_server(args: argparse.Namespace) -> AsyncIterator[tuple[Server, int]]:
    """tidings with its gRPC port on a free port; yields (server, gRPC port) once SERVING."""
    port = free_port()
    env = {"TIDINGS_GRPC_PORT": str(port), "TIDINGS_GRPC_HOST": "127.0.0.1"}
    async with running_server(args, env) as server:
        try:
            await wait_serving(port)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nserver log:\n{server.log()}") from None
        yield server, port


class Threads:
    """The server's CPU and context switches by thread, between ``__enter__`` and ``__exit__``.

    grpc.aio runs a call across threads: grpcio's C-core I/O threads (``event_engine``), its
    poller thread (a Python thread that hands completions to the event loop) and the event
    loop itself; on one core every hand-off is a context switch. ``summary(per, unit)`` gives
    each group's share of the server's CPU and the switches per ``unit``. Groups: ``main`` (the
    event loop), ``event_engine`` (grpcio's C-core threads), ``other`` (Python threads: grpc's
    poller, the SQLite writer).
    """

    def __init__(self, server: Server) -> None:
        self.pid = server.pid

    def snapshot(self) -> dict[str, tuple[float, int]]:
        """Per thread group: (CPU seconds, context switches)."""
        out: dict[str, tuple[float, int]] = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                stat = (task / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
                switches = sum(
                    int(line.split()[1])
                    for line in (task / "status").read_text().splitlines()
                    if "ctxt_switches:" in line
                )
                comm = (task / "comm").read_text().strip()
                group = (
                    "main"
                    if task.name == str(self.pid)
                    else "event_engine"
                    if comm == "event_engine"
                    else "other"
                )
                cpu0, sw0 = out.get(group, (0.0, 0))
                out[group] = (cpu0 + cpu, sw0 + switches)
        return out

    def __enter__(self) -> Threads:
        self.before = self.snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        after = self.snapshot()
        self.delta = {
            group: (
                cpu - self.before.get(group, (0.0, 0))[0],
                sw - self.before.get(group, (0.0, 0))[1],
            )
            for group, (cpu, sw) in after.items()
        }

    def summary(self, per: int, unit: str) -> dict[str, Any]:
        total = sum(cpu for cpu, _ in self.delta.values()) or 1e-9
        shares = {g: round(cpu / total, 3) for g, (cpu, _) in sorted(self.delta.items())}
        switches = sum(sw for _, sw in self.delta.values())
        return {
            "server_cpu_share_by_thread": shares,
            f"server_context_switches_per_{unit}": round(switches / max(per, 1), 3),
        }


def outcomes(streams: Sequence[Any]) -> dict[str, int]:
    """How the streams that ended ended, e.g. ``{"RESOURCE_EXHAUSTED lagged": 3}``."""
    return dict(collections.Counter(s.outcome() for s in streams if s.closed))


async def reopen(client: Client, streams: list[Any], receipts: list[tuple[int, int]]) -> list[Any]:
    """Replace streams that ended (after a phase that lagged some out) with fresh ones."""
    alive = [s for s in streams if not s.closed]
    lost = len(streams) - len(alive)
    if lost:
        print(f"  reopening {lost} ended streams: {outcomes(streams)}", flush=True)
        alive += await client.subscribe(lost, FAN_CHANNEL, receipts)
        await asyncio.sleep(0.5)
    return alive


# -- grpc-fanout -------------------------------------------------------------------------------


async def fanout_phase(
    server: Server,
    client: Client,
    streams: list[Any],
    run: Awaitable[dict[str, Any]],
) -> dict[str, Any]:
    """A ``wsbench`` phase, with TCP reads and stream outcomes added, gRPC's terms used."""
    reads0, delivered0 = client.transport_reads(), sum(s.count for s in streams)
    dropped0 = client.lowat_dropped()
    with Threads(server) as threads:
        step = await run
    reads, delivered = client.transport_reads() - reads0, sum(s.count for s in streams) - delivered0
    # wsbench calls a subscriber's data_received a read; here each stream's "read" is a DATA
    # frame, and TCP reads are per connection (whole phase: warm-up and drain included).
    if "events_per_read" in step:
        step["events_per_data_frame"] = step.pop("events_per_read")
    if client.kind == "lean":
        step["events_per_tcp_read"] = round(delivered / max(reads, 1), 1)
    step["stream_outcomes"] = outcomes(streams)
    if client.kind == "lean":
        step["lowat_dropped_by_watchdog"] = client.lowat_dropped() - dropped0
    step["whole_phase"] = threads.summary(delivered, "delivery")
    return step


async def latency_phase(
    args: argparse.Namespace,
    server: Server,
    streams: list[Any],
    feed: Feed,
    receipts: list[tuple[int, int]],
) -> dict[str, Any]:
    """``--rate`` timestamped single-event publishes/s; latency taken at receipt."""
    duration = args.grpc_latency_duration
    acks: list[int] = []
    await paced(feed.send_timed, args.rate, min(args.warmup, 2.0))
    await asyncio.sleep(0.5)
    m0 = await server.metrics()
    for s in streams:
        s.recording = True
    with Window(server) as window:
        published = await paced(feed.send_timed, args.rate, duration, acks)
        await asyncio.sleep(1.0)  # let the last events arrive
    for s in streams:
        s.recording = False
    m1 = await server.metrics()
    acks.sort()
    return {
        **receipt_summary(receipts, LATENCY_P99_MS),
        "expected_samples": published * len(streams),
        "publish_ack_p50_ms": round(percentile(acks, 50) / 1e6, 3),
        "publish_ack_p99_ms": round(percentile(acks, 99) / 1e6, 3),
        "lagged_disconnects": int(lagged_total(m1) - lagged_total(m0)),
        "closed_streams": sum(s.closed for s in streams),
        "stream_outcomes": outcomes(streams),
        "server_cpu_us_per_delivery": round(window.server_cpu / max(len(receipts), 1) * 1e6, 2),
        **window.summary(),
        "params": {"events_per_s": args.rate, "duration_s": duration},
    }


def publish_via(args: argparse.Namespace) -> str:
    if args.grpc_fan_publish == "http":
        return f"HTTP POST /publish ({args.batch} events per request, 1 when unbatched)"
    return f"gRPC PublishBatch ({args.batch} events per call), Publish when unbatched"


async def workload_grpc_fanout(args: argparse.Namespace) -> dict[str, Any]:
    n = args.grpc_subscribers
    duration = args.duration or 8.0
    receipts: list[tuple[int, int]] = []
    async with grpc_server(args) as (server, port):
        client = Client(args, port)
        # Publishers get a connection of their own (as on HTTP), so that the subscribers'
        # connections carry streams only.
        await client.connect(args.grpc_connections, 0 if args.grpc_fan_publish == "http" else 1)
        streams, memory = await idle_memory(
            server, lambda: client.subscribe(n, FAN_CHANNEL, receipts), n, strict=False
        )
        memory["kb_per_idle_stream"] = memory.pop("kb_per_idle_connection")
        feeds: list[Feed] = []
        for i in range(args.fan_publishers):
            if args.grpc_fan_publish == "http":
                conn = await HTTPConnection.open(HOST, server.port)
                feeds.append(HTTPFeed(conn, FAN_CHANNEL, args.size))
            else:
                feeds.append(GRPCFeed(client.caller(i), FAN_CHANNEL, args.size))
        result: dict[str, Any] = {"publish_via": publish_via(args), "memory": memory}

        print("  closed loop ...", flush=True)
        result["closed_loop"] = await fanout_phase(
            server,
            client,
            streams,
            closed_loop(
                args, server, streams, feeds, duration, args.batch, args.window, args.grpc_lowat
            ),
        )
        if args.confirm:
            print("  open-loop confirmation ...", flush=True)
            streams = await reopen(client, streams, receipts)
            rate = result["closed_loop"]["deliveries_per_s"] * args.confirm
            result["open_loop_confirm"] = await fanout_phase(
                server,
                client,
                streams,
                open_loop(
                    server, streams, feeds, rate, min(duration, 4.0), args.batch, args.grpc_lowat
                ),
            )
        if args.unbatched:
            print("  unbatched (one event in flight) ...", flush=True)
            streams = await reopen(client, streams, receipts)
            result["unbatched"] = await fanout_phase(
                server,
                client,
                streams,
                closed_loop(args, server, streams, feeds[:1], min(duration, 5.0), 1, 1),
            )
        if args.grpc_latency_duration:
            print(f"  latency ({args.rate:g} events/s) ...", flush=True)
            streams = await reopen(client, streams, receipts)
            result["latency"] = await latency_phase(args, server, streams, feeds[0], receipts)
        for f in feeds:
            f.close()
        for s in streams:
            s.close()
        await client.close()

    closed = result["closed_loop"]
    phases = [
        result[k]
        for k in ("closed_loop", "open_loop_confirm", "unbatched", "latency")
        if k in result
    ]
    lagged = sum(p.get("lagged_disconnects", 0) for p in phases)
    missing = sum(p.get("missing_deliveries", 0) for p in phases)
    latency = result.get("latency", {})
    ended = sum(p.get("closed_streams", 0) for p in phases)
    failures = []
    if lagged or missing or ended:
        failures.append(
            f"{lagged} lagged disconnects, {missing} deliveries missing, {ended} streams ended "
            f"(want 0): {[p.get('stream_outcomes') for p in phases]}"
        )
    if latency and not latency["p99_ms"] <= LATENCY_P99_MS:
        failures.append(f"latency p99 {latency['p99_ms']} ms (want <= {LATENCY_P99_MS:g})")
    if latency and latency["samples"] != latency["expected_samples"]:
        failures.append(
            f"latency: {latency['samples']} receipts of {latency['expected_samples']} expected"
        )
    unbatched = result.get("unbatched", {})
    return {
        "deliveries_per_s": closed["deliveries_per_s"],
        "server_cpu_us_per_delivery": closed["server_cpu_us_per_delivery"],
        "generator_cpu_util": closed["generator_cpu_util"],
        "unbatched_deliveries_per_s": unbatched.get("deliveries_per_s"),
        "unbatched_server_cpu_us_per_delivery": unbatched.get("server_cpu_us_per_delivery"),
        "latency_p50_ms": latency.get("p50_ms"),
        "latency_p99_ms": latency.get("p99_ms"),
        "lagged_disconnects": lagged,
        "missing_deliveries": missing,
        "streams_ended": ended,
        "kb_per_idle_stream": memory["kb_per_idle_stream"],
        "failures": failures,
        **result,
        "params": {
            "subscribers": n,
            "connections": args.grpc_connections,
            "client": args.grpc_client,
            "event_bytes": args.size,
            "queue_size": args.queue_size or "default (1024)",
            "warmup_s": args.warmup,
            "duration_s": duration,
        },
    }


# -- grpc-publish ------------------------------------------------------------------------------


async def workload_grpc_publish(args: argparse.Namespace) -> dict[str, Any]:
    duration = args.duration or 10.0
    async with grpc_server(args) as (server, port):
        client = Client(args, port)
        await client.connect(args.grpc_connections)
        body = publish_request(PUBLISH_CHANNEL, args.size).SerializeToString()
        reply = await client.caller(0)(PUBLISH, body)
        check_reply(*reply, "Publish")
        first = pb.PublishResponse.FromString(reply[1])
        if not first.event.id or first.event.data != payload_bytes(args.size):
            raise RuntimeError(f"Publish answered {first!r}")
        latencies: list[int] = []
        errors: collections.Counter[int] = collections.Counter()
        state = {"measuring": False, "stop": False, "ok": 0}
        clock = time.perf_counter_ns

        async def publisher(call: Caller) -> None:
            while not state["stop"]:
                t0 = clock()
                status, _ = await call(PUBLISH, body)
                t1 = clock()
                if state["measuring"]:
                    if status == STATUS_OK:
                        state["ok"] += 1
                        latencies.append(t1 - t0)
                    else:
                        errors[status] += 1

        tasks = [asyncio.create_task(publisher(client.caller(i))) for i in range(args.publishers)]
        await asyncio.sleep(args.warmup)
        m0 = await server.metrics()
        with Window(server) as window, Threads(server) as threads:
            state["measuring"] = True
            await asyncio.sleep(duration)
            state["measuring"] = False
        state["stop"] = True
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        m1 = await server.metrics()
        rss = server.rss_kb()
        await client.close()

    latencies.sort()
    ok = state["ok"]
    failures = []
    if errors:
        failures.append(f"calls that failed: {dict(errors)} (status codes)")
    return {
        "publishes_per_s": round(ok / window.elapsed),
        "p50_ms": round(percentile(latencies, 50) / 1e6, 3),
        "p90_ms": round(percentile(latencies, 90) / 1e6, 3),
        "p99_ms": round(percentile(latencies, 99) / 1e6, 3),
        "max_ms": round(percentile(latencies, 100) / 1e6, 3),
        "acknowledged": ok,
        "errors": sum(errors.values()),
        "server_cpu_us_per_publish": round(window.server_cpu / max(ok, 1) * 1e6, 1),
        "generator_cpu_us_per_publish": round(window.own_cpu / max(ok, 1) * 1e6, 1),
        "server_published_delta": m1.get("tidings_published_events_total", 0)
        - m0.get("tidings_published_events_total", 0),
        "server_rss_kb": rss,
        "failures": failures,
        **window.summary(),
        **threads.summary(ok, "publish"),
        "params": {
            "callers": args.publishers,
            "in_flight_per_caller": 1,
            "connections": args.grpc_connections,
            "client": args.grpc_client,
            "event_bytes": args.size,
            "durability": args.durability,
            "warmup_s": args.warmup,
            "duration_s": duration,
        },
    }


GRPC_WORKLOADS = {"grpc-fanout": workload_grpc_fanout, "grpc-publish": workload_grpc_publish}


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "grpc-fanout / grpc-publish (also --publishers, --batch, --fan-publishers, --window, "
        "--confirm, --unbatched, --rate)"
    )
    g.add_argument("--grpc-subscribers", type=int, default=500, help="grpc-fanout: Subscribe calls")
    g.add_argument(
        "--grpc-connections",
        type=int,
        default=4,
        help="HTTP/2 connections the subscribers (or publish callers) are spread over",
    )
    g.add_argument(
        "--grpc-client",
        choices=["lean", "aio"],
        default="lean",
        help="the generator's client: grpcgen.py's HTTP/2 protocol, or grpcio's grpc.aio",
    )
    g.add_argument(
        "--grpc-fan-publish",
        choices=["grpc", "http"],
        default="grpc",
        help="grpc-fanout: publish with PublishBatch/Publish, or POST /publish",
    )
    g.add_argument(
        "--grpc-latency-duration",
        type=float,
        default=10.0,
        help="grpc-fanout: seconds of the paced latency phase (0: skip)",
    )
    g.add_argument(
        "--grpc-lowat",
        type=int,
        default=8192,
        help="grpc-fanout batched phases: the generator reads a connection once this many bytes "
        "wait (SO_RCVLOWAT; 0: off), as --ws-lowat",
    )
    g.add_argument(
        "--compare-http",
        action="store_true",
        help="grpc-publish: then run the HTTP publish workload with the same callers",
    )
