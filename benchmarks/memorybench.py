"""The idle-memory workload: server memory per idle subscriber, SSE and WebSocket, up to 10,000.

    .venv/bin/python benchmarks/run.py idle [--idle-steps 1000,5000,10000]
                                            [--idle-transports sse,ws]

For each transport, a fresh server (``taskset -c 0 python -m tidings serve``, the other workloads'
start-up, with ``limits.max_streams`` lifted above the largest step: its default is 10,000) and
one channel. Subscribers are opened in steps up to each count in ``--idle-steps``; after each
step they sit idle for ``--idle-settle`` seconds, then the server's RSS (``VmRSS``) is read and
``/healthz`` must count them all. Per step: KiB of RSS per subscriber over the RSS before the
first one connected, and the marginal KiB per subscriber since the previous step (what one more
costs at that scale, start-up allocations left out). Then one event goes to every subscriber
and, once every one has it, RSS again (``after_one_event``): memory the write path keeps.

RSS is user-space memory only: the kernel's socket buffers are not in it (on either side).

The generator holds all the connections in its one process (one socket each, on core 1): the
runner raises ``RLIMIT_NOFILE`` to its hard limit, and the server inherits the raised limit; a
step beyond what the limits or the ephemeral port range allow fails with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
from pathlib import Path
from typing import Any

from loadgen import HOST, check_ack, open_streams, payload_bytes
from target import Server, running_server
from tidings.bench.wire import HTTPConnection, request
from wsbench import Rig

CHANNEL = "bench/idle"
TRANSPORTS = ("sse", "ws")


def port_range() -> int:
    """How many ephemeral ports one (source address, destination) pair may use."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 0
    return high - low + 1


def preflight(largest: int) -> str | None:
    """Why ``largest`` connections cannot be opened from this process, or None."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < largest + 100:
        return f"RLIMIT_NOFILE is {soft} here (hard limit); {largest} connections need more"
    ports = port_range()
    if ports and ports < largest + 100:
        return f"the ephemeral port range holds {ports} ports; {largest} connections need more"
    return None


async def open_subscribers(
    transport: str, args: argparse.Namespace, port: int, n: int
) -> list[Any]:
    if transport == "sse":
        path = f"/sse?channel={CHANNEL}".encode()
        return await open_streams(port, n, path, within=120.0)
    return await Rig("tidings", args).subscribe(port, n, CHANNEL)


def kib(rss: int, base: int, n: int) -> float:
    return round((rss - base) / max(n, 1), 2)


async def one_transport(args: argparse.Namespace, transport: str) -> dict[str, Any]:
    steps = sorted(args.idle_steps)
    env = {"TIDINGS_LIMITS_MAX_STREAMS": str(steps[-1] + 100)}
    async with running_server(args, env) as server:
        await asyncio.sleep(1.0)  # let start-up settle before the baseline
        base = server.rss_kb()
        streams: list[Any] = []
        rows: list[dict[str, Any]] = []
        previous = (0, base)
        for n in steps:
            streams += await open_subscribers(transport, args, server.port, n - len(streams))
            await asyncio.sleep(args.idle_settle)
            rss = server.rss_kb()
            counted = (await server.health()).get("subscribers")
            if counted != n:
                raise RuntimeError(f"server counts {counted} subscribers, expected {n}")
            rows.append(
                {
                    "subscribers": n,
                    "rss_kb": rss,
                    "kib_per_subscriber": kib(rss, base, n),
                    "marginal_kib_per_subscriber": kib(rss, previous[1], n - previous[0]),
                }
            )
            print(
                f"  {transport}: {n:>6,} idle subscribers: {rows[-1]['kib_per_subscriber']} KiB "
                f"each ({rows[-1]['marginal_kib_per_subscriber']} KiB each since the last step)",
                flush=True,
            )
            previous = (n, rss)
        after = await after_one_event(server, streams)
        for s in streams:
            s.close()
    last = rows[-1]
    return {
        "subscribers": last["subscribers"],
        "kib_per_idle_subscriber": last["kib_per_subscriber"],
        "marginal_kib_per_subscriber": last["marginal_kib_per_subscriber"],
        "rss_kb_before": base,
        "steps": rows,
        "after_one_event": {
            **after,
            "kib_per_subscriber": kib(after["rss_kb"], base, last["subscribers"]),
        },
    }


async def after_one_event(server: Server, streams: list[Any]) -> dict[str, Any]:
    """Publish one event, wait until every subscriber has it, read RSS."""
    want = [s.count + 1 for s in streams]
    conn = await HTTPConnection.open(HOST, server.port)
    await check_ack(conn.send(request("POST", f"/channels/{CHANNEL}", payload_bytes(256))))
    conn.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while loop.time() < deadline:
        missing = sum(s.count < w for s, w in zip(streams, want, strict=True))
        if not missing:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    return {
        "rss_kb": server.rss_kb(),
        "missing": sum(s.count < w for s, w in zip(streams, want, strict=True)),
        "closed": sum(bool(s.closed) for s in streams),
    }


async def workload_idle(args: argparse.Namespace) -> dict[str, Any]:
    largest = max(args.idle_steps)
    why = preflight(largest)
    if why is not None:
        raise SystemExit(f"idle: {why}")
    out: dict[str, Any] = {}
    for transport in args.idle_transports:
        print(f"  -- {transport}", flush=True)
        out[transport] = await one_transport(args, transport)
    worst = max(r["kib_per_idle_subscriber"] for r in out.values())
    return {
        "kib_per_idle_subscriber": worst,  # the target is on the worse transport
        **{f"{t}_kib_per_idle_subscriber": r["kib_per_idle_subscriber"] for t, r in out.items()},
        **out,
        "params": {
            "steps": sorted(args.idle_steps),
            "settle_s": args.idle_settle,
            "transports": list(args.idle_transports),
            "generator_processes": 1,
        },
    }


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("idle")
    g.add_argument(
        "--idle-steps",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[1000, 5000, 10000],
        help="idle: subscriber counts to measure at, cumulative (default 1000,5000,10000)",
    )
    g.add_argument(
        "--idle-transports",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(TRANSPORTS),
        help="idle: transports, in order (sse, ws)",
    )
    g.add_argument("--idle-settle", type=float, default=2.0, help="idle: seconds idle before RSS")


IDLE_WORKLOADS = {"idle": workload_idle}
