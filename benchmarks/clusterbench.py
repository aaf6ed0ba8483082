"""Tidings as a cluster: acknowledged publishes/s and SSE fan-out with 1 and 3 nodes sharing
Redis or NATS JetStream, beside the single-node SQLite default.

    .venv/bin/python benchmarks/clusterbench.py                  # sqlite x1, redis and nats x1, x3
    .venv/bin/python benchmarks/clusterbench.py --engines redis --nodes 3 --repeat 2
    .venv/bin/python benchmarks/clusterbench.py --help

For each engine and node count, a fresh deployment: N ``python -m tidings serve --cluster URL``
processes with a ``TIDINGS_LOG_PREFIX`` of their own (so each run has its own keys or stream on
the engine, removed afterwards), or one ``tidings serve --db <tmp>`` for sqlite. Then:

1. publish: K keep-alive connections, spread round-robin over the nodes, each with one
   ``POST /channels/bench/publish`` (256-byte JSON) in flight; after a warm-up, acknowledged
   (201) publishes/s over D seconds, ack latency p50/p99, errors (must be 0), and CPU per publish
   of the nodes and of the engine's server.
2. fan-out: S SSE subscribers on one channel, spread round-robin over the nodes. A paced
   open-loop publisher on node 0 sends R single-event ``POST /channels/bench/fan`` a second,
   each stamped with its send time and number (``tidings.bench.wire.payload``); every
   subscriber must receive every number exactly once (losses, duplicates), and latency is taken
   at receipt in this process (one clock). Then the closed loop of ``tidings bench``
   (``Workload.closed_loop``: batches of 10 events from node 0, never more than 256 ahead of the
   slowest subscriber): the most deliveries/s the deployment sustains.

The generator is one process pinned to the last core(s) (uvloop, the lean clients of
``tidings.bench``: ``wire.HTTPConnection``, ``sse.SSEDriver``, ``subscriber.Subscriber``); every
node is pinned to the first core with ``--pin split`` (default, as benchmarks/run.py does: the
nodes' CPU is one core whatever their number), or left to the scheduler with ``--pin none``. The
engine's server is never touched; its CPU is read from /proc. Prints a table per workload and,
with ``--json PATH``, writes every measurement (``--tables`` prints saved ones together). A run
with more than ``--noisy`` of a core of other load in a measured window (another process on the
machine) is run again, and table cells range over the runs whose window was quiet. Exit status 1
when a run had errors, losses or duplicates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import HOST, Publishers, payload_bytes
from tidings.bench.driver import Target
from tidings.bench.hub import LocalHub, answers, split_url
from tidings.bench.proc import (
    CLK_TCK,
    busy_seconds,
    cpu_seconds,
    cpu_times,
    find_process,
    machine,
    raise_nofile,
    source,
)
from tidings.bench.proc import placement as default_placement
from tidings.bench.sse import SSEDriver
from tidings.bench.stats import Meter, Tally, latency_summary
from tidings.bench.subscriber import Subscriber
from tidings.bench.wire import HTTPConnection, payload, publish_batch, q, request
from tidings.bench.workload import BATCH, Params, Probe, Window, Workload, drain

ENGINES = {
    # name: (default URL, default port, the engine server's process name, for its CPU)
    "sqlite": ("", 0, ""),
    "redis": ("redis://127.0.0.1:6379/0", 6379, "redis-server"),
    "nats": ("nats://127.0.0.1:4222", 4222, "nats-server"),
}
PUBLISH_CHANNEL = "bench/publish"
FANOUT_CHANNEL = "bench/fan"


# -- the deployment ----------------------------------------------------------------------------


class Deployment:
    """N tidings nodes on one engine (or one SQLite node), started and stopped together."""

    def __init__(
        self, engine: str, url: str, n: int, cores: list[int], extra_env: dict[str, str]
    ) -> None:
        self.engine, self.url, self.n = engine, url, n
        self.prefix = f"cb{uuid.uuid4().hex[:10]}"
        args: tuple[str, ...] = ("--cluster", url) if engine != "sqlite" else ()
        env = {"TIDINGS_LOG_PREFIX": self.prefix} if engine != "sqlite" else {}
        env.update(extra_env)
        self.nodes = [LocalHub(cores, args, env) for _ in range(n)]
        self.side: list[subprocess.Popen[bytes]] = []

    @property
    def pids(self) -> list[int]:
        return [node.pid for node in self.nodes if node.pid is not None]

    async def start(self) -> None:
        # In threads: each start waits for its node's /healthz, and the nodes import in parallel.
        results = await asyncio.gather(
            *(asyncio.to_thread(node.start) for node in self.nodes), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self.stop()
            raise failed[0]

    def on_start(self, command: str) -> None:
        """Run ``command`` once per node ({pid}, {port}, {node}, {engine}, {nodes} filled in)."""
        for i, node in enumerate(self.nodes):
            cmd = command.format(
                pid=node.pid, port=node.port, node=i, engine=self.engine, nodes=self.n
            )
            print(f"    starting: {cmd}", flush=True)
            self.side.append(subprocess.Popen(cmd, shell=True))

    def stop(self) -> None:
        for side in self.side:
            if side.poll() is None:
                side.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    side.wait(30)
        for node in self.nodes:
            node.stop()

    def failure(self, exc: BaseException) -> str:
        """Why a node did not start, in one line (the last line of its output says it)."""
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return lines[-1][:300] if lines else repr(exc)

    async def forget(self) -> None:
        """Remove what this deployment left on its engine (keys, streams, buckets)."""
        if self.engine == "redis":
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(self.url)
            try:
                keys = [key async for key in client.scan_iter(f"{self.prefix}:*", count=1000)]
                for i in range(0, len(keys), 500):
                    await client.delete(*keys[i : i + 500])
            finally:
                await client.aclose()
        elif self.engine == "nats":
            import nats

            nc = await nats.connect(self.url)
            try:
                js = nc.jetstream()
                for info in await js.streams_info():
                    name = info.config.name or ""
                    if self.prefix.upper() in name.upper():
                        await js.delete_stream(name)
            finally:
                await nc.close()


class NodesProbe(Probe):
    """``workload.Window``'s probe for a deployment: the nodes' CPU together as the hub's, the
    engine's server as the broker's."""

    def __init__(self, pids: list[int], engine_process: str) -> None:
        self.pids = pids
        self.pid = pids[0]
        self.broker = find_process(engine_process) if engine_process else None

    def server_cpu(self) -> float | None:
        with contextlib.suppress(OSError):
            return sum(cpu_seconds(pid) for pid in self.pids)
        return None


def softirq_seconds() -> float:
    """CPU seconds every core spent in softirq so far (/proc/stat): on loopback, mostly the
    receiving half of our own sockets' traffic, which no process is charged with."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[7]) / CLK_TCK
    return 0.0


class Span(Window):
    """``workload.Window`` (wall time; the nodes', the engine's and the generator's CPU, and the
    rest of the machine's) with each node's user and kernel CPU apart, and softirq time apart
    from other load."""

    probe: NodesProbe

    def __enter__(self) -> Span:
        self.nodes0 = [cpu_times(pid) for pid in self.probe.pids]
        self.softirq0 = softirq_seconds()
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.softirq = softirq_seconds() - self.softirq0
        self.nodes = [
            (u1 - u0, s1 - s0)
            for (u0, s0), (u1, s1) in zip(
                self.nodes0, (cpu_times(pid) for pid in self.probe.pids), strict=True
            )
        ]

    def usage(self, per: int = 0, unit: str = "") -> dict[str, Any]:
        """Utilisations over the span; with ``per``, CPU µs per ``unit`` of the nodes and engine."""
        e = self.elapsed
        nodes_cpu = sum(u + s for u, s in self.nodes)
        out: dict[str, Any] = {
            "nodes_cpu_util": round(nodes_cpu / e, 3),
            "node_cpu_util": [round((u + s) / e, 3) for u, s in self.nodes],
            "nodes_kernel_share": round(sum(s for _, s in self.nodes) / max(nodes_cpu, 1e-9), 3),
            "engine_cpu_util": None if self.broker is None else round(self.broker / e, 3),
            "generator_cpu_util": round(self.own / e, 3),
        }
        out["softirq_cpu_util"] = round(self.softirq / e, 3)
        other = self.busy - self.softirq - nodes_cpu - self.own - (self.broker or 0.0)
        out["other_cpu_util"] = round(max(0.0, other) / e, 3)
        if per:
            out[f"nodes_cpu_us_per_{unit}"] = round(nodes_cpu / per * 1e6, 1)
            if self.broker is not None:
                out[f"engine_cpu_us_per_{unit}"] = round(self.broker / per * 1e6, 1)
        return out


def without_cdf(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "cdf_ms"}


# -- workload 1: publish -----------------------------------------------------------------------


async def publish(args: argparse.Namespace, dep: Deployment, probe: NodesProbe) -> dict[str, Any]:
    """K closed-loop publishers (``loadgen.Publishers``), connection i on node i mod N."""
    raw = request("POST", f"/channels/{q(PUBLISH_CHANNEL)}", payload_bytes(args.size))
    conns: list[list[HTTPConnection]] = [[] for _ in dep.nodes]
    for i in range(args.publishers):
        node = dep.nodes[i % dep.n]
        conns[i % dep.n].append(await HTTPConnection.open(HOST, node.port))
    groups = [Publishers(c, raw, args.depth) for c in conns]
    try:
        await asyncio.sleep(args.warmup)
        with Span(probe) as span:
            for g in groups:
                g.measuring = True
            await asyncio.sleep(args.duration)
            for g in groups:
                g.measuring = False
        for g in groups:
            await g.stop()
    finally:
        for c in (c for group in conns for c in group):
            c.close()
    ok = sum(g.ok for g in groups)
    latencies = sorted(x for g in groups for x in g.latencies)
    lat = latency_summary(latencies)
    return {
        "publishes_per_s": round(ok / span.elapsed),
        "node_publishes_per_s": [round(g.ok / span.elapsed) for g in groups],
        "ack_p50_ms": lat["p50_ms"],
        "ack_p90_ms": lat["p90_ms"],
        "ack_p99_ms": lat["p99_ms"],
        "ack_max_ms": lat["max_ms"],
        "acknowledged": ok,
        "errors": sum(g.errors for g in groups),
        "seconds": round(span.elapsed, 3),
        **span.usage(ok, "publish"),
        "params": {
            "publishers": args.publishers,
            "in_flight_per_connection": args.depth,
            "event_bytes": args.size,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
        },
    }


# -- workload 2: fan-out -----------------------------------------------------------------------


async def fanout(args: argparse.Namespace, dep: Deployment, probe: NodesProbe) -> dict[str, Any]:
    """S SSE subscribers over the nodes; the paced phase, then the closed loop, on them."""
    meter = Meter()
    drivers = [SSEDriver(Target(HOST, node.port), meter) for node in dep.nodes]
    subs = [Subscriber(i, FANOUT_CHANNEL, meter) for i in range(args.subscribers)]
    groups = [subs[k :: dep.n] for k in range(dep.n)]
    await asyncio.gather(*(d.connect_all(g) for d, g in zip(drivers, groups, strict=True)))
    try:
        counted = [node.health().get("subscribers") for node in dep.nodes]
        if counted != [len(g) for g in groups]:
            raise RuntimeError(f"the nodes count {counted} subscribers, expected {len(groups[0])}…")
        # One event first: every path (the engine's, each node's follower and streams) is warm.
        conn = await HTTPConnection.open(HOST, dep.nodes[0].port)
        warm = request("POST", f"/channels/{q(FANOUT_CHANNEL)}", payload(args.size))
        status, body = await conn.send(warm)
        conn.close()
        if status != 201:
            raise RuntimeError(f"publish answered {status}: {body[:200]!r}")
        if not await drain(subs, lambda s: s.count >= 1, 10.0):
            raise RuntimeError("the warm-up event did not reach every subscriber")
        await asyncio.sleep(0.5)
        result: dict[str, Any] = {"subscribers": len(subs), "per_node": [len(g) for g in groups]}
        result["paced"] = await paced(args, dep, probe, subs, groups)
        if args.closed_duration > 0:
            result["closed_loop"] = await closed_loop(args, dep, probe, drivers[0], subs)
        return result
    finally:
        for d, g in zip(drivers, groups, strict=True):
            await d.release(g)


async def paced(
    args: argparse.Namespace,
    dep: Deployment,
    probe: NodesProbe,
    subs: list[Subscriber],
    groups: list[list[Subscriber]],
) -> dict[str, Any]:
    """``rate`` stamped single-event publishes a second on node 0, open loop: each is sent on
    time whether or not the previous ones were acknowledged (``paced_connections`` keep-alive
    connections in turn, pipelining when one is still busy)."""
    total = max(1, round(args.rate * args.fanout_duration))
    samples: list[list[int]] = [[] for _ in groups]
    for k, group in enumerate(groups):
        for s in group:
            s.tally, s.samples = Tally(total), samples[k]
    node0 = dep.nodes[0]
    conns = [await HTTPConnection.open(HOST, node0.port) for _ in range(args.paced_connections)]
    path = f"/channels/{q(FANOUT_CHANNEL)}"
    acks: list[int] = []
    statuses: list[int] = []

    def acked(t: int, fut: asyncio.Future[tuple[int, bytes]]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            acks.append(time.time_ns() - t)
            statuses.append(fut.result()[0])

    pending: list[asyncio.Future[tuple[int, bytes]]] = []
    loop = asyncio.get_running_loop()
    counts0 = sum(s.count for s in subs)
    try:
        with Span(probe) as span:
            start = loop.time()
            sent = 0
            while sent < total:
                due = min(total, int((loop.time() - start) * args.rate) + 1)
                while sent < due:  # on time, or catching up after a late wake-up
                    t = time.time_ns()
                    raw = request("POST", path, payload(args.size, t, sent))
                    fut = conns[sent % len(conns)].send(raw)
                    fut.add_done_callback(functools.partial(acked, t))
                    pending.append(fut)
                    sent += 1
                await asyncio.sleep(max(0.0, start + sent / args.rate - loop.time()))
            publishing = loop.time() - start
            await asyncio.wait_for(asyncio.gather(*pending), 30)
            complete = await drain(
                subs, lambda s: s.closed or bool(s.tally and s.tally.complete), 10.0
            )
    finally:
        for c in conns:
            c.close()
    tallies = [s.tally for s in subs if s.tally is not None]
    deliveries = sum(s.count for s in subs) - counts0
    for s in subs:
        s.tally = s.samples = None
    lat = latency_summary([x for node in samples for x in node])
    ack = latency_summary(acks)
    return {
        "events": total,
        "offered_events_per_s": args.rate,
        "published_events_per_s": round(total / publishing, 1),
        "offered_deliveries_per_s": round(args.rate * len(subs)),
        "deliveries_per_s": round(deliveries / span.elapsed),
        "drained_after_s": round(span.elapsed - publishing, 3),
        "complete": complete,
        "latency": without_cdf(lat),
        "latency_by_node": [
            {"p50_ms": n["p50_ms"], "p99_ms": n["p99_ms"], "max_ms": n["max_ms"]}
            for n in (latency_summary(s) for s in samples)
        ],
        "publish_ack_p50_ms": ack["p50_ms"],
        "publish_ack_p99_ms": ack["p99_ms"],
        "publish_errors": sum(st != 201 for st in statuses) + total - len(statuses),
        "expected": total * len(subs),
        "received": sum(t.received for t in tallies),
        "losses": sum(t.missing for t in tallies),
        "duplicates": sum(t.duplicates for t in tallies),
        "unexpected": sum(t.unexpected for t in tallies),
        "lagged": sum(s.lagged for s in subs),
        "closed": sum(s.closed for s in subs),
        "seconds": round(span.elapsed, 3),
        **span.usage(deliveries, "delivery"),
        "params": {"paced_connections": args.paced_connections, "event_bytes": args.size},
    }


async def closed_loop(
    args: argparse.Namespace,
    dep: Deployment,
    probe: NodesProbe,
    driver: SSEDriver,
    subs: list[Subscriber],
) -> dict[str, Any]:
    """``tidings bench``'s closed loop on these subscribers, publishing on node 0.

    Its window counts softirq time as other load; softirq is read here over the whole call
    (warm-up and drain too, at much the same rate) and taken out of ``other_cpu_util``."""
    params = Params("sse", len(subs), payload=args.size, duration=2 * args.closed_duration)
    workload = Workload(driver, params, HOST, dep.nodes[0].port)
    workload.probe = probe
    t0, softirq0 = time.perf_counter(), softirq_seconds()
    try:
        rounds = [publish_batch([(FANOUT_CHANNEL, payload(args.size))] * BATCH)]
        result = await workload.closed_loop(subs, rounds, BATCH)
    finally:
        workload.publisher.close()
    softirq = (softirq_seconds() - softirq0) / (time.perf_counter() - t0)
    cpu = {"server_cpu_util": "nodes_cpu_util", "broker_cpu_util": "engine_cpu_util"}
    out = {cpu.get(k, k): v for k, v in result.items()}
    out["softirq_cpu_util"] = round(softirq, 3)
    if out.get("other_cpu_util") is not None:
        out["other_cpu_util"] = round(max(0.0, out["other_cpu_util"] - softirq), 3)
    return out


# -- one run, the matrix -----------------------------------------------------------------------


async def run_one(
    args: argparse.Namespace, engine: str, n: int, cores: list[int]
) -> dict[str, Any]:
    url, port, process = ENGINES[engine]
    url = getattr(args, engine) if engine != "sqlite" else ""
    out: dict[str, Any] = {"engine": engine, "nodes": n}
    if engine != "sqlite":
        host, port = split_url(url, port)
        if not answers(host, port, 1.0):
            out["skipped"] = f"nothing answers at {host}:{port}"
            return out
    dep = Deployment(engine, url, n, cores, dict(args.node_env))
    try:
        await dep.start()
    except (RuntimeError, OSError) as exc:
        out["skipped"] = f"a node did not start: {dep.failure(exc)}"
        return out
    try:
        if args.on_start:
            dep.on_start(args.on_start)
        probe = NodesProbe(dep.pids, process)
        out["command"] = shlex.join(dep.nodes[0].command)
        out["prefix"] = dep.prefix if engine != "sqlite" else None
        if "publish" in args.workloads:
            print("    publish ...", flush=True)
            out["publish"] = await publish(args, dep, probe)
        if "fanout" in args.workloads:
            print("    fan-out ...", flush=True)
            out["fanout"] = await fanout(args, dep, probe)
    except Exception as exc:  # one deployment failing does not end the matrix
        out["failed"] = f"{type(exc).__name__}: {exc}"[:500]
        out["node_logs"] = [node.log()[-1500:] for node in dep.nodes]
    finally:
        dep.stop()
        with contextlib.suppress(Exception):
            await dep.forget()
    return out


def noise(run: dict[str, Any]) -> float:
    """The most other load (cores' worth) in any of the run's measured windows."""
    paths = ("publish", "fanout.paced", "fanout.closed_loop")
    found = [get(run, f"{path}.other_cpu_util") for path in paths]
    return max((x for x in found if isinstance(x, int | float)), default=0.0)


def problems(run: dict[str, Any]) -> list[str]:
    """What makes a run count as failed: errors, losses, duplicates, lagged subscribers."""
    found = []
    if "failed" in run:
        found.append(run["failed"])
    pub = run.get("publish") or {}
    if pub.get("errors"):
        found.append(f"{pub['errors']} publish errors")
    fan = run.get("fanout") or {}
    p = fan.get("paced") or {}
    for key in ("publish_errors", "losses", "duplicates", "unexpected", "lagged", "closed"):
        if p.get(key):
            found.append(f"paced: {p[key]} {key}")
    c = fan.get("closed_loop") or {}
    for key in ("missing", "extra", "lagged", "closed"):
        if c.get(key):
            found.append(f"closed loop: {c[key]} {key}")
    return found


# -- the table ---------------------------------------------------------------------------------


def span_of(values: Sequence[Any], digits: int) -> str:
    """``a`` or ``lo–hi`` over the repeats (thousands separated)."""
    nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not nums:
        return "-"

    def fmt(x: float) -> str:
        return f"{x:,.{digits}f}"

    lo, hi = min(nums), max(nums)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}–{fmt(hi)}"


def get(run: dict[str, Any], path: str) -> Any:
    value: Any = run
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


PUBLISH_COLUMNS = [
    ("publishes/s", "publish.publishes_per_s", 0),
    ("ack p50 ms", "publish.ack_p50_ms", 1),
    ("ack p99 ms", "publish.ack_p99_ms", 1),
    ("errors", "publish.errors", 0),
    ("nodes CPU", "publish.nodes_cpu_util", 2),
    ("engine CPU", "publish.engine_cpu_util", 2),
    ("gen CPU", "publish.generator_cpu_util", 2),
    ("other CPU", "publish.other_cpu_util", 2),
    ("node µs/pub", "publish.nodes_cpu_us_per_publish", 0),
    ("engine µs/pub", "publish.engine_cpu_us_per_publish", 0),
]
FANOUT_COLUMNS = [
    ("paced deliv/s", "fanout.paced.deliveries_per_s", 0),
    ("lat p50 ms", "fanout.paced.latency.p50_ms", 1),
    ("lat p99 ms", "fanout.paced.latency.p99_ms", 1),
    ("lost", "fanout.paced.losses", 0),
    ("dup", "fanout.paced.duplicates", 0),
    ("nodes CPU", "fanout.paced.nodes_cpu_util", 2),
    ("other CPU", "fanout.paced.other_cpu_util", 2),
    ("closed-loop deliv/s", "fanout.closed_loop.deliveries_per_s", 0),
    ("nodes CPU", "fanout.closed_loop.nodes_cpu_util", 2),
    ("engine CPU", "fanout.closed_loop.engine_cpu_util", 2),
    ("other CPU", "fanout.closed_loop.other_cpu_util", 2),
]


def phase(path: str) -> str:
    """The measured window a column's value comes from."""
    for prefix in ("fanout.paced", "fanout.closed_loop"):
        if path.startswith(prefix + "."):
            return prefix
    return path.split(".", 1)[0]


def cell(done: list[dict[str, Any]], path: str, digits: int, noisy: float) -> str:
    """The range of ``path`` over the runs whose window for it was quiet (other load at most
    ``noisy``); over all of them, marked ``*``, when none was."""
    other = f"{phase(path)}.other_cpu_util"
    quiet_runs = [r for r in done if (get(r, other) or 0.0) <= noisy]
    if quiet_runs:
        return span_of([get(r, path) for r in quiet_runs], digits)
    return span_of([get(r, path) for r in done], digits) + "*"


def table(runs: list[dict[str, Any]], columns: list[tuple[str, str, int]], noisy: float) -> str:
    keys: list[tuple[str, int]] = []
    for r in runs:
        if (r["engine"], r["nodes"]) not in keys:
            keys.append((r["engine"], r["nodes"]))
    header = ["engine", "nodes", *(c[0] for c in columns)]
    rows = []
    for engine, n in keys:
        mine = [r for r in runs if (r["engine"], r["nodes"]) == (engine, n)]
        done = [r for r in mine if "skipped" not in r and "failed" not in r]
        if not done:
            why = mine[0].get("skipped") or mine[0].get("failed") or ""
            rows.append([engine, str(n), f"({why[:90]})"])
            continue
        rows.append([engine, str(n), *(cell(done, path, d, noisy) for _, path, d in columns)])
    widths = [
        max(len(row[i]) for row in [header, *rows] if i < len(row)) for i in range(len(header))
    ]
    lines = [" | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    for row in rows:
        if len(row) < len(header):  # skipped: the reason spans the row
            lines.append(" | ".join([row[0].rjust(widths[0]), row[1].rjust(widths[1]), row[2]]))
        else:
            lines.append(" | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    paced = f"{args.subscribers} SSE subscribers, {args.rate:g} events/s paced on node 0"
    if "publish" in args.workloads:
        print(
            f"\n== publish: {args.publishers} connections x {args.depth} in flight, "
            f"{args.size}-byte events, {args.duration:g} s =="
        )
        print(table(runs, PUBLISH_COLUMNS, args.noisy))
    if "fanout" in args.workloads:
        print(
            f"\n== fan-out: {paced} for {args.fanout_duration:g} s "
            f"(offered {args.rate * args.subscribers:,.0f} deliveries/s); closed loop "
            f"{args.closed_duration:g} s =="
        )
        print(table(runs, FANOUT_COLUMNS, args.noisy))
    print(
        "\nCPU columns are cores' worth: nodes together, the engine's server, the generator, and "
        "the rest of the machine (other processes; softirq apart, in the JSON). Ranges over "
        f"the runs whose window for the column had other load <= {args.noisy:g} core (* : none "
        "had, every run shown); every run is in the JSON (--json)."
    )
    commits = sorted(
        {
            (r.get("source") or {}).get("commit", "?")
            + ("+" + ",".join(m) if (m := (r.get("source") or {}).get("modified")) else "")
            for r in runs
        }
    )
    print(f"{len(runs)} runs of tidings {'; '.join(commits)}")


# -- main --------------------------------------------------------------------------------------


def csv(kind: type, choices: Sequence[str] = ()) -> Any:
    def parse(text: str) -> list[Any]:
        values = [kind(x) for x in text.split(",") if x]
        for v in values:
            if choices and v not in choices:
                raise argparse.ArgumentTypeError(f"{v!r}: choose from {', '.join(choices)}")
        return values

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--engines",
        type=csv(str, list(ENGINES)),
        default=list(ENGINES),
        help="comma-separated, from sqlite,redis,nats (default: all three)",
    )
    p.add_argument(
        "--nodes",
        type=csv(int),
        default=[1, 3],
        help="node counts for redis and nats (default 1,3; sqlite always runs one)",
    )
    p.add_argument(
        "--workloads", type=csv(str, ["publish", "fanout"]), default=["publish", "fanout"]
    )
    p.add_argument("--repeat", type=int, default=1, help="run the whole matrix this many times")
    p.add_argument("--redis", default=ENGINES["redis"][0], help="Redis URL")
    p.add_argument("--nats", default=ENGINES["nats"][0], help="NATS URL")
    p.add_argument(
        "--pin",
        choices=["split", "none"],
        default="split",
        help="split: every node on the first core, the generator on the others (default); "
        "none: no pinning",
    )
    p.add_argument("--size", type=int, default=256, help="event data bytes (JSON)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="before each deployment, wait up to this many seconds for a second with under "
        "0.1 core of other load on the machine (0: do not wait)",
    )
    p.add_argument(
        "--noisy",
        type=float,
        default=0.15,
        help="a run with more other load than this (cores' worth) in a measured window is "
        "noisy: run again (--retries) and left out of the table while quiet runs exist",
    )
    p.add_argument("--retries", type=int, default=1, help="runs again of a noisy run")
    g = p.add_argument_group("publish")
    g.add_argument("--publishers", type=int, default=50, help="keep-alive connections (K)")
    g.add_argument("--depth", type=int, default=1, help="requests in flight per connection")
    g.add_argument("--duration", type=float, default=8.0, help="measured seconds (D)")
    g.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    g = p.add_argument_group("fan-out")
    g.add_argument("--subscribers", type=int, default=300, help="SSE subscribers (S)")
    g.add_argument("--rate", type=float, default=200.0, help="paced events/s on node 0 (R)")
    g.add_argument("--fanout-duration", type=float, default=6.0, help="paced seconds")
    g.add_argument("--paced-connections", type=int, default=8, help="paced publish connections")
    g.add_argument(
        "--closed-duration",
        type=float,
        default=3.0,
        help="measured seconds of the closed loop (0: skip it)",
    )
    p.add_argument(
        "--node-env",
        type=lambda text: tuple(text.split("=", 1)),
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for every node (repeatable), e.g. an experiment's "
        "PYTHONPATH or a TIDINGS_* setting",
    )
    p.add_argument("--json", default="", help="write every measurement here")
    p.add_argument(
        "--tables",
        nargs="+",
        metavar="JSON",
        help="run nothing: print the tables of runs saved with --json (several files: together)",
    )
    p.add_argument(
        "--on-start",
        default="",
        help="shell command run per node once a deployment is up ({pid}, {port}, {node}, "
        "{engine}, {nodes}), stopped with SIGINT at its end; e.g. py-spy record",
    )
    return p.parse_args(argv)


async def quiet(within: float, below: float = 0.1) -> float:
    """Wait (up to ``within`` s) for a second in which the machine is busy less than ``below``
    of a core: between deployments nothing of ours runs, so that is other load. Returns the
    last second's busy share."""
    deadline = time.monotonic() + within
    while True:
        b0 = busy_seconds()
        await asyncio.sleep(1.0)
        busy = busy_seconds() - b0
        if busy < below or time.monotonic() >= deadline:
            return round(busy, 3)


async def main_async(args: argparse.Namespace, node_cores: list[int]) -> list[dict[str, Any]]:
    matrix = [
        (engine, n) for engine in args.engines for n in ([1] if engine == "sqlite" else args.nodes)
    ]
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        for engine, n in matrix:
            print(f"{engine} x{n} (run {rep + 1}/{args.repeat}) ...", flush=True)
            busy = await quiet(args.quiet_wait) if args.quiet_wait > 0 else None
            started = time.time()
            for attempt in range(1 + args.retries):
                busy = await quiet(args.quiet_wait) if args.quiet_wait > 0 else None
                started, ran = time.time(), source()  # others may commit between runs
                run = await run_one(args, engine, n, node_cores)
                run["machine_busy_before"] = busy
                run["source"] = ran
                run["repeat"] = rep + 1
                run["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))
                run["problems"] = problems(run)
                run["noisy"] = noise(run) > args.noisy
                runs.append(run)
                if "skipped" in run:
                    print(f"    skipped: {run['skipped']}", flush=True)
                for problem in run["problems"]:
                    print(f"    FAILED: {problem}", flush=True)
                if not run["noisy"]:
                    break
                print(
                    f"    noisy: other load up to {noise(run):.2f} of a core in a measured "
                    f"window{'; again' if attempt < args.retries else ''}",
                    flush=True,
                )
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tables:  # no run: the tables of saved runs, together
        docs = [json.loads(Path(f).read_text()) for f in args.tables]
        for key, value in docs[0]["params"].items():
            if key not in ("tables", "noisy"):
                setattr(args, key, value)
        runs = [{"source": doc["machine"]["source"], **run} for doc in docs for run in doc["runs"]]
        report(runs, args)
        return 0
    node_cores, generator_cores = default_placement() if args.pin == "split" else ([], [])
    if generator_cores:
        os.sched_setaffinity(0, set(generator_cores))
    raise_nofile()
    began = time.time()
    try:
        import uvloop
    except ImportError:
        runs = asyncio.run(main_async(args, node_cores))
    else:
        runs = uvloop.run(main_async(args, node_cores))
    report(runs, args)
    print(f"({time.time() - began:.0f} s)")
    if args.json:
        document = {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "machine": machine(),
            "placement": {"nodes": node_cores or "any", "generator": generator_cores or "any"},
            "params": {k: v for k, v in vars(args).items() if k not in ("json", "on_start")},
            "runs": runs,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        print(f"-> {args.json}")
    return 1 if any(run["problems"] for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
