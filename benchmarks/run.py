"""Tidings benchmarks: a real server on core 0, a lean asyncio load generator on core 1.

    .venv/bin/python benchmarks/run.py [publish|fanout|latency|ws-fanout|ws-latency|ws|
                                        grpc-fanout|grpc-publish|grpc|webhooks|all]

Workloads (see benchmarks/README.md for what each measures and the targets):
  publish     acknowledged HTTP publishes/s from 50 keep-alive publishers, p50/p99 ack latency
  fanout      SSE deliveries/s to 1,000 subscribers at the highest rate with no lagged subscriber
  latency     publish-to-delivery latency at 5 events/s x 1,000 SSE subscribers
  ws-fanout   WebSocket deliveries/s to 1,000 subscribers: tidings, then the websockets and
              Node ws broadcast baselines on the same core (wsbench.py)
  ws-latency  publish-to-delivery latency at 5 events/s x 1,000 WebSocket subscribers, same three
  ws          ws-fanout and ws-latency, then one table side by side
  grpc-fanout gRPC Subscribe deliveries/s to 500 streams over a few HTTP/2 connections, then
              publish-to-delivery latency at 5 events/s on them (grpcbench.py)
  grpc-publish acknowledged unary gRPC Publish calls/s from 50 callers, p50/p99 ack latency
  grpc        grpc-fanout and grpc-publish
  webhooks    webhook deliveries/s from 100 endpoints on every event to a fast local receiver,
              publish-to-receipt latency, losses and duplicates; then one endpoint
              (webhookbench.py)
  idle        server memory per idle SSE and WebSocket subscriber at 1,000, 5,000 and 10,000
              subscribers (memorybench.py)

Each workload starts its own server (``taskset -c 0 python -m tidings serve``) on a fresh SQLite
file, waits for /healthz, runs, prints a table, writes benchmarks/results/<workload>.json and stops
the server; the ws workloads do so for tidings and each baseline in turn. Server CPU comes from
/proc/<pid>/stat (all threads), memory from /proc/<pid>/status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpcbench import GRPC_WORKLOADS
from grpcbench import add_options as add_grpc_options
from loadgen import (
    HOST,
    Publishers,
    SSEStream,
    TimedSSEStream,
    batch_request,
    check_ack,
    open_streams,
    payload_bytes,
)
from memorybench import IDLE_WORKLOADS
from memorybench import add_options as add_idle_options
from target import (
    CLIENT_CORE,
    ROOT,
    SERVER_CORE,
    Server,
    Window,
    delivered_sse,
    drain,
    idle_memory,
    lagged_total,
    paced,
    percentile,
    receipt_summary,
    running_server,
    stream_totals,
)
from tidings.bench.proc import raise_nofile
from tidings.bench.wire import HTTPConnection, request
from webhookbench import WEBHOOK_WORKLOADS
from webhookbench import add_options as add_webhook_options
from webhookbench import headline as webhook_headline
from wsbench import WS_WORKLOADS, check_servers
from wsbench import add_options as add_ws_options
from wsbench import table as ws_table

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {
    "publish": ("publishes_per_s", ">=", 5_000),
    "fanout": ("deliveries_per_s", ">=", 40_000),
    "latency": ("p99_ms", "<=", 50.0),
    # A string target names the result key holding it: measured in the same run.
    "ws-fanout": ("deliveries_per_s", ">=", "websockets_deliveries_per_s"),
    "ws-latency": ("p99_ms", "<=", 35.0),
    "grpc-fanout": ("deliveries_per_s", ">=", 40_000),
    "grpc-publish": ("publishes_per_s", ">=", 2_500),
    "webhooks": ("deliveries_per_s", ">=", 2000),
    "idle": ("kib_per_idle_subscriber", "<=", 11.0),
}
# The performance targets of issue 8 (1,000 subscribers on one channel, 256-byte events, the
# server on one core), checked and saved beside TARGETS (the floors that set the exit status):
# (dotted path into the result, op, value).
GOALS: dict[str, list[tuple[str, str, float]]] = {
    "publish": [("publishes_per_s", ">=", 10_000)],
    "fanout": [
        ("deliveries_per_s", ">=", 80_000),
        ("server_cpu_us_per_delivery", "<=", 12.0),
        ("unbatched.server_cpu_us_per_delivery", "<=", 12.0),
    ],
    "latency": [("p99_ms", "<=", 35.0)],
    "ws-fanout": [
        ("deliveries_per_s", ">=", 80_000),
        ("servers.tidings.server_cpu_us_per_delivery", "<=", 12.0),
        ("servers.tidings.unbatched_server_cpu_us_per_delivery", "<=", 12.0),
    ],
    "ws-latency": [("p99_ms", "<=", 35.0)],
    "idle": [
        ("sse_kib_per_idle_subscriber", "<=", 11.0),
        ("ws_kib_per_idle_subscriber", "<=", 11.0),
    ],
}


# -- workload: publish -------------------------------------------------------------------------


async def workload_publish(args: argparse.Namespace) -> dict[str, Any]:
    duration = args.duration or 10.0
    async with running_server(args) as server:
        conns = [await HTTPConnection.open(HOST, server.port) for _ in range(args.publishers)]
        raw = request("POST", "/channels/bench/publish", payload_bytes(args.size))
        publishers = Publishers(conns, raw, args.depth)
        await asyncio.sleep(args.warmup)
        m0 = await server.metrics()
        with Window(server) as window:
            publishers.measuring = True
            await asyncio.sleep(duration)
            publishers.measuring = False
        await publishers.stop()
        m1 = await server.metrics()
        rss = server.rss_kb()
        for c in conns:
            c.close()

    latencies = sorted(publishers.latencies)
    ok = publishers.ok
    rate = ok / window.elapsed
    return {
        "publishes_per_s": round(rate),
        "p50_ms": round(percentile(latencies, 50) / 1e6, 3),
        "p90_ms": round(percentile(latencies, 90) / 1e6, 3),
        "p99_ms": round(percentile(latencies, 99) / 1e6, 3),
        "max_ms": round(percentile(latencies, 100) / 1e6, 3),
        "acknowledged": ok,
        "errors": publishers.errors,
        "server_cpu_us_per_publish": round(window.server_cpu / max(ok, 1) * 1e6, 1),
        "server_published_delta": m1.get("tidings_published_events_total", 0)
        - m0.get("tidings_published_events_total", 0),
        "server_rss_kb": rss,
        **window.summary(),
        "params": {
            "publishers": args.publishers,
            "in_flight_per_connection": args.depth,
            "event_bytes": args.size,
            "durability": args.durability,
            "warmup_s": args.warmup,
            "duration_s": duration,
        },
    }


# -- workload: fanout --------------------------------------------------------------------------


async def fanout_closed_loop(
    args: argparse.Namespace,
    server: Server,
    streams: list[SSEStream],
    duration: float,
    batch: int,
    window_events: int,
    connections: int,
) -> dict[str, Any]:
    """Publish as fast as the slowest subscriber receives, at most ``window_events`` ahead.

    ``connections`` publishers, each with one ``POST /publish`` of ``batch`` events in flight.
    """
    base = min(s.count for s in streams)
    sent = 0
    stop = False
    raw = batch_request("bench/fan", args.size, batch)

    def received() -> int:
        live = [s.count for s in streams if not s.closed]
        return (min(live) if live else 1 << 62) - base

    async def publisher(conn: HTTPConnection) -> None:
        nonlocal sent
        while not stop:
            while sent + batch - received() > window_events:
                await asyncio.sleep(0.0005)
                if stop:
                    return
            sent += batch
            await check_ack(conn.send(raw))

    conns = [await HTTPConnection.open(HOST, server.port) for _ in range(connections)]
    tasks = [asyncio.create_task(publisher(c)) for c in conns]
    await asyncio.sleep(args.warmup)
    m0 = await server.metrics()
    with Window(server) as window:
        d0, r0 = stream_totals(streams)
        await asyncio.sleep(duration)
        d1, r1 = stream_totals(streams)
    stop = True
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    missing = await drain(streams, base + sent)
    m1 = await server.metrics()
    for c in conns:
        c.close()
    deliveries = d1 - d0
    return {
        "deliveries_per_s": round(deliveries / window.elapsed),
        "events_per_s": round(deliveries / window.elapsed / len(streams), 1),
        "events_per_read": round(deliveries / max(r1 - r0, 1), 2),
        "server_cpu_us_per_delivery": round(window.server_cpu / max(deliveries, 1) * 1e6, 2),
        "lagged_disconnects": int(lagged_total(m1) - lagged_total(m0)),
        "closed_streams": sum(s.closed for s in streams),
        "missing_deliveries": missing,
        "server_delivered_delta": int(delivered_sse(m1) - delivered_sse(m0)),
        **window.summary(),
        "params": {
            "events_per_publish": batch,
            "publish_connections": connections,
            "window_events": window_events,
        },
    }


async def fanout_open_loop(
    args: argparse.Namespace,
    server: Server,
    streams: list[SSEStream],
    rate: float,
    duration: float,
    batch: int,
    connections: int,
) -> dict[str, Any]:
    """Publish at a fixed ``rate`` deliveries/s (events/s x subscribers), whatever happens.

    ``connections`` publishers share the rate, each with one request in flight; one that falls
    behind its schedule sends at once to catch up, so ``published_events_per_s`` shows whether the
    offered rate was really offered.
    """
    events_per_s = rate / len(streams)
    interval = batch * connections / events_per_s  # per publisher
    raw = batch_request("bench/fan", args.size, batch)
    conns = [await HTTPConnection.open(HOST, server.port) for _ in range(connections)]
    base = min(s.count for s in streams)
    published = 0
    loop = asyncio.get_running_loop()

    async def publisher(conn: HTTPConnection, start: float, end: float) -> None:
        nonlocal published
        nxt = start
        while nxt < end:
            await asyncio.sleep(max(0.0, nxt - loop.time()))
            await check_ack(conn.send(raw))
            published += batch
            nxt += interval

    m0 = await server.metrics()
    with Window(server) as window:
        d0, r0 = stream_totals(streams)
        start = loop.time()
        end = start + duration
        await asyncio.gather(
            *(publisher(c, start + i * interval / connections, end) for i, c in enumerate(conns))
        )
        publishing = loop.time() - start
        missing = await drain(streams, base + published, within=5.0)
        d1, r1 = stream_totals(streams)
    m1 = await server.metrics()
    for c in conns:
        c.close()
    deliveries = d1 - d0
    return {
        "offered_deliveries_per_s": round(rate),
        "published_events_per_s": round(published / publishing, 1),
        "deliveries_per_s": round(deliveries / window.elapsed),
        "drained_after_s": round(max(0.0, window.elapsed - publishing), 2),
        "events_per_read": round(deliveries / max(r1 - r0, 1), 2),
        "server_cpu_us_per_delivery": round(window.server_cpu / max(deliveries, 1) * 1e6, 2),
        "lagged_disconnects": int(lagged_total(m1) - lagged_total(m0)),
        "closed_streams": sum(s.closed for s in streams),
        "missing_deliveries": missing,
        **window.summary(),
        "params": {"events_per_publish": batch, "publish_connections": connections},
    }


async def reopen(server: Server, streams: list[SSEStream], path: bytes) -> list[SSEStream]:
    """Replace closed streams with fresh ones (after a step that lagged some out)."""
    alive = [s for s in streams if not s.closed]
    lost = len(streams) - len(alive)
    if lost:
        alive += await open_streams(server.port, lost, path)
        await asyncio.sleep(0.5)
    return alive


async def workload_fanout(args: argparse.Namespace) -> dict[str, Any]:
    duration = args.duration or 10.0
    path = b"/sse?channel=bench/fan"
    n = args.subscribers
    async with running_server(args) as server:
        streams, memory = await idle_memory(server, lambda: open_streams(server.port, n, path), n)
        result: dict[str, Any] = {"memory": memory}
        print("  closed loop ...", flush=True)
        result["closed_loop"] = await fanout_closed_loop(
            args, server, streams, duration, args.batch, args.window, args.fan_publishers
        )
        capacity = result["closed_loop"]["deliveries_per_s"]
        if args.confirm:
            print("  open-loop confirmation ...", flush=True)
            streams = await reopen(server, streams, path)
            result["open_loop_confirm"] = await fanout_open_loop(
                args,
                server,
                streams,
                capacity * args.confirm,
                min(duration, 5.0),
                args.batch,
                args.fan_publishers,
            )
        if args.unbatched:
            # One event in flight at a time, so each goes out in its own write: the price of a
            # delivery without batching, comparable with per-message brokers.
            print("  unbatched (one event per write) ...", flush=True)
            streams = await reopen(server, streams, path)
            step = await fanout_closed_loop(args, server, streams, min(duration, 5.0), 1, 1, 1)
            step["implied_max_deliveries_per_s"] = round(
                1e6 / max(step["server_cpu_us_per_delivery"], 1e-9)
            )
            result["unbatched"] = step
        if args.sweep:
            steps = []
            for rate in args.sweep:
                streams = await reopen(server, streams, path)
                step = await fanout_open_loop(
                    args, server, streams, rate, duration, args.batch, args.fan_publishers
                )
                steps.append(step)
                print(
                    f"  sweep {rate:>9,.0f}/s offered: {step['deliveries_per_s']:>9,}/s "
                    f"delivered, {step['events_per_read']} events/read, "
                    f"lagged {step['lagged_disconnects']}",
                    flush=True,
                )
            result["sweep"] = steps
            clean = [
                s["deliveries_per_s"]
                for s in steps
                if not s["lagged_disconnects"]
                and not s["missing_deliveries"]
                and s["drained_after_s"] < 1.0
            ]
            result["sweep_highest_clean_deliveries_per_s"] = max(clean, default=None)
        for s in streams:
            s.close()
    closed = result["closed_loop"]
    lagged = sum(
        result.get(k, {}).get("lagged_disconnects", 0)
        for k in ("closed_loop", "open_loop_confirm", "unbatched")
    )
    return {
        "deliveries_per_s": closed["deliveries_per_s"],
        "lagged_disconnects": lagged,
        "server_cpu_us_per_delivery": closed["server_cpu_us_per_delivery"],
        "kb_per_idle_connection": memory["kb_per_idle_connection"],
        **result,
        "params": {
            "subscribers": n,
            "event_bytes": args.size,
            "queue_size": args.queue_size or "default (1024)",
            "warmup_s": args.warmup,
            "duration_s": duration,
        },
    }


# -- workload: latency -------------------------------------------------------------------------


async def workload_latency(args: argparse.Namespace) -> dict[str, Any]:
    duration = args.duration or 20.0
    path = b"/sse?channel=bench/latency"
    receipts: list[tuple[int, int]] = []
    async with running_server(args) as server:
        streams, memory = await idle_memory(
            server,
            lambda: open_streams(server.port, args.subscribers, path, TimedSSEStream, receipts),
            args.subscribers,
        )
        conn = await HTTPConnection.open(HOST, server.port)
        acks: list[int] = []

        async def publish(t0: int) -> None:
            raw = request("POST", "/channels/bench/latency", payload_bytes(args.size, t0))
            status, body = await conn.send(raw)
            if status != 201:
                raise RuntimeError(f"publish answered {status}: {body[:200]!r}")

        await paced(publish, args.rate, args.warmup)
        await asyncio.sleep(0.5)
        m0 = await server.metrics()
        for s in streams:
            s.recording = True
        with Window(server) as window:
            published = await paced(publish, args.rate, duration, acks)
            await asyncio.sleep(1.0)  # let the last events arrive
        for s in streams:
            s.recording = False
        m1 = await server.metrics()
        conn.close()
        closed = sum(s.closed for s in streams)
        for s in streams:
            s.close()

    acks.sort()
    expected = published * args.subscribers
    deliveries = int(delivered_sse(m1) - delivered_sse(m0))
    return {
        **receipt_summary(receipts, 50),
        "expected_samples": expected,
        "publish_ack_p50_ms": round(percentile(acks, 50) / 1e6, 3),
        "publish_ack_p99_ms": round(percentile(acks, 99) / 1e6, 3),
        "lagged_disconnects": int(lagged_total(m1) - lagged_total(m0)),
        "closed_streams": closed,
        "server_cpu_us_per_delivery": round(window.server_cpu / max(deliveries, 1) * 1e6, 2),
        "kb_per_idle_connection": memory["kb_per_idle_connection"],
        "memory": memory,
        **window.summary(),
        "params": {
            "subscribers": args.subscribers,
            "events_per_s": args.rate,
            "event_bytes": args.size,
            "warmup_s": args.warmup,
            "duration_s": duration,
        },
    }


async def workload_grpc_publish(args: argparse.Namespace) -> dict[str, Any]:
    """``grpc-publish``; with ``--compare-http`` the HTTP ``publish`` workload after it."""
    result = await GRPC_WORKLOADS["grpc-publish"](args)
    if args.compare_http:
        print("  the same over HTTP (publish workload) ...", flush=True)
        http = await workload_publish(args)
        result["http"] = {
            key: http[key]
            for key in (
                "publishes_per_s",
                "p50_ms",
                "p99_ms",
                "server_cpu_us_per_publish",
                "generator_cpu_util",
                "server_cpu_util",
            )
        }
    return result


WORKLOADS = {
    "publish": workload_publish,
    "fanout": workload_fanout,
    "latency": workload_latency,
    **WS_WORKLOADS,
    "grpc-fanout": GRPC_WORKLOADS["grpc-fanout"],
    "grpc-publish": workload_grpc_publish,
    **WEBHOOK_WORKLOADS,
    **IDLE_WORKLOADS,
}
ALIASES = {"all": list(WORKLOADS), "ws": list(WS_WORKLOADS), "grpc": list(GRPC_WORKLOADS)}


# -- reporting ---------------------------------------------------------------------------------


def flat(result: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in result.items():
        if key in ("sweep", "steps", "goals"):
            continue
        if isinstance(value, dict):
            yield from flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def report(name: str, result: dict[str, Any]) -> None:
    metric, op, wanted = TARGETS[name]
    target = result[wanted] if isinstance(wanted, str) else wanted
    value = result[metric]
    if value is None:  # the server under test failed: its error is in the result
        met = False
        print(f"\n== {name} ==  {metric} not measured (target {op} {target:,}: MISSED)")
    else:
        met = value >= target if op == ">=" else value <= target
        source = f" = {wanted}" if isinstance(wanted, str) else ""
        print(
            f"\n== {name} ==  {metric} = {value:,}  (target {op} {target:,}{source}: "
            f"{'met' if met else 'MISSED'})"
        )
    failures = result.get("failures") or []
    for failure in failures:
        print(f"   FAILED: {failure}")
    met = met and not failures
    if name.startswith("grpc-"):
        report_grpc(name, result)
    if name == "webhooks":
        print(webhook_headline(result))
    if "servers" in result:  # a ws workload: the side-by-side table, then tidings in detail
        report_goals(name, result)
        report_ws(name, result, op)
        result["target"] = {"metric": metric, "op": op, "value": target, "met": met}
        return
    if name == "fanout" and "unbatched" in result:
        unbatched = result["unbatched"]
        got = unbatched["deliveries_per_s"]
        result["unbatched_target_met"] = got >= target
        print(
            f"   one event per write (comparable with per-message brokers): {got:,}/s at "
            f"{unbatched['server_cpu_us_per_delivery']} us server CPU per delivery, at most "
            f"{unbatched['implied_max_deliveries_per_s']:,}/s with the core 100 % busy "
            f"(target {op} {target:,}: {'met' if got >= target else 'MISSED'})"
        )
    report_goals(name, result)
    for key, val in flat(result):
        shown = f"{val:,}" if isinstance(val, int | float) and not isinstance(val, bool) else val
        print(f"  {key:<44} {shown}")
    result["target"] = {"metric": metric, "op": op, "value": target, "met": met}


def report_goals(name: str, result: dict[str, Any]) -> None:
    """Check and print the workload's GOALS; saved as ``result["goals"]``."""
    checked = []
    for path, op, wanted in GOALS.get(name, []):
        value: Any = result
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        met = value is not None and (value >= wanted if op == ">=" else value <= wanted)
        checked.append({"metric": path, "op": op, "value": wanted, "got": value, "met": met})
        shown = "not measured" if value is None else f"{value:,}"
        print(f"   goal (issue 8): {path} {op} {wanted:,}: {shown}, {'met' if met else 'MISSED'}")
    if checked:
        result["goals"] = checked


def report_grpc(name: str, result: dict[str, Any]) -> None:
    """The headline numbers of a gRPC workload, before the full list."""
    if name == "grpc-fanout":
        ub = result.get("unbatched") or {}
        print(
            f"   closed loop: {result['deliveries_per_s']:,}/s at "
            f"{result['server_cpu_us_per_delivery']} us server CPU per delivery, generator at "
            f"{result['generator_cpu_util']} of its core; lagged {result['lagged_disconnects']}, "
            f"missing {result['missing_deliveries']}, streams ended {result['streams_ended']}"
        )
        if ub:
            print(
                f"   one event in flight: {ub['deliveries_per_s']:,}/s at "
                f"{ub['server_cpu_us_per_delivery']} us, at most "
                f"{ub['implied_max_deliveries_per_s']:,}/s with the core 100 % busy"
            )
        if result.get("latency_p99_ms") is not None:
            lat = result["latency"]
            print(
                f"   latency at {lat['params']['events_per_s']:g} events/s: p50 "
                f"{lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms "
                f"({lat['samples']:,} receipts)"
            )
        return
    rows = [("grpc Publish", result)]
    if "http" in result:
        rows.append(("HTTP POST /channels/<c>", result["http"]))
    print(
        f"   {'':<24} {'publishes/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'us/publish':>10} "
        f"{'gen cpu':>7}"
    )
    for label, r in rows:
        print(
            f"   {label:<24} {r['publishes_per_s']:>11,} {r['p50_ms']:>7} {r['p99_ms']:>7} "
            f"{r['server_cpu_us_per_publish']:>10} {r['generator_cpu_util']:>7}"
        )


def report_ws(name: str, result: dict[str, Any], op: str) -> None:
    if name == "ws-fanout":
        got, base = (
            result["unbatched_deliveries_per_s"],
            result["websockets_unbatched_deliveries_per_s"],
        )
        if got is not None and base is not None:
            result["unbatched_target_met"] = got >= base
            print(
                f"   one event in flight: {got:,}/s against the websockets baseline's {base:,}/s "
                f"({'met' if got >= base else 'MISSED'})"
            )
    print()
    print(ws_table(*(result, None) if name == "ws-fanout" else (None, result)))
    print()
    for key, val in flat(result["servers"].get("tidings", {}), "tidings."):
        shown = f"{val:,}" if isinstance(val, int | float) and not isinstance(val, bool) else val
        print(f"  {key:<52} {shown}")
    print("  (every server's details are in the results JSON)")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "git": rev + ("+dirty" if dirty else ""),
        "server_core": SERVER_CORE,
        "generator_core": CLIENT_CORE,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("workload", nargs="?", default="all", choices=[*WORKLOADS, *ALIASES])
    p.add_argument("--duration", type=float, help="measured seconds (default 10; latency 20)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--size", type=int, default=256, help="event data bytes (JSON)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--durability", choices=["normal", "full"], default="normal")
    p.add_argument("--queue-size", type=int, default=0, help="TIDINGS_HUB_QUEUE_SIZE")
    p.add_argument("--name", default="", help="results file suffix: results/<workload><name>.json")
    p.add_argument("--no-save", action="store_true", help="do not write results JSON")
    p.add_argument(
        "--on-start",
        default="",
        help="shell command run once the server is up ({pid}, {port} substituted), "
        "stopped with SIGINT at the end; e.g. py-spy record",
    )
    g = p.add_argument_group("experiments (server-side, without changing src/)")
    g.add_argument(
        "--python",
        default="",
        help="server interpreter (tidings imported from src/), e.g. a 3.12 venv",
    )
    g.add_argument("--gc-stats", action="store_true", help="report the server's time in gc")
    g.add_argument("--gc-threshold", default="", help="server gc.set_threshold, e.g. 50000,20,100")
    g.add_argument(
        "--gc-freeze",
        type=float,
        default=0.0,
        help="server gc.freeze() once, this many seconds after start",
    )
    g = p.add_argument_group("publish")
    g.add_argument("--publishers", type=int, default=50, help="keep-alive connections")
    g.add_argument("--depth", type=int, default=1, help="requests in flight per connection")
    g = p.add_argument_group("fanout / latency")
    g.add_argument("--subscribers", type=int, default=1000)
    g.add_argument("--batch", type=int, default=10, help="fanout: events per POST /publish")
    g.add_argument("--fan-publishers", type=int, default=4, help="fanout: publish connections")
    g.add_argument(
        "--unbatched",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fanout: also measure with one event in flight, so one event per write (5 s)",
    )
    g.add_argument(
        "--window",
        type=int,
        default=256,
        help="fanout: max events published ahead of the slowest subscriber",
    )
    g.add_argument(
        "--confirm",
        type=float,
        default=0.9,
        help="fanout: then publish open-loop at this fraction of the closed-loop rate "
        "for 5 s and check for lag (0: skip)",
    )
    g.add_argument(
        "--sweep",
        type=lambda s: [float(x) for x in s.split(",")],
        default=None,
        help="fanout: open-loop steps at these deliveries/s, e.g. 20000,40000,60000",
    )
    g.add_argument("--rate", type=float, default=5.0, help="latency: events per second")
    add_ws_options(p)
    add_grpc_options(p)
    add_webhook_options(p)
    add_idle_options(p)
    args = p.parse_args(argv)
    check_servers(args.servers)
    return args


async def main_async(args: argparse.Namespace) -> int:
    names = ALIASES.get(args.workload, [args.workload])
    failed = 0
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"running {name} ...", flush=True)
        started = time.time()
        result = results[name] = await WORKLOADS[name](args)
        report(name, result)
        failed += not result["target"]["met"]
        document = {
            "workload": name,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "machine": machine(),
            "result": result,
        }
        if not args.no_save:
            RESULTS.mkdir(exist_ok=True)
            out = RESULTS / f"{name}{args.name}.json"
            out.write_text(json.dumps(document, indent=2) + "\n")
            print(f"  -> {out.relative_to(ROOT)}")
    if "ws-fanout" in results and "ws-latency" in results:
        print("\n== WebSocket, side by side ==")
        print(ws_table(results["ws-fanout"], results["ws-latency"]))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("taskset") is None:
        sys.exit("benchmarks need taskset (util-linux)")
    if (os.cpu_count() or 1) < 2:
        sys.exit("benchmarks need two cores: the server on one, the load generator on the other")
    os.sched_setaffinity(0, {CLIENT_CORE})
    raise_nofile()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_async(args))
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
