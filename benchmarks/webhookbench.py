"""The ``webhooks`` workload: webhook deliveries/s from tidings to a fast local receiver.

    .venv/bin/python benchmarks/run.py webhooks [--endpoints 100] [--events 600]
                                                [--concurrency N] [--payload 256]

The server is the usual ``taskset -c 0 python -m tidings serve`` (SQLite, ``durability=normal``)
with ``TIDINGS_WEBHOOKS_ALLOW_HTTP=true`` and ``TIDINGS_WEBHOOKS_ALLOWED_NETWORKS=127.0.0.1/32``.
The receiver is this file run as ``taskset -c 1 python webhookbench.py receive PORT``: its own
process, beside the generator on core 1 (the generator only publishes and polls). It is a raw
asyncio protocol (uvloop): keep-alive HTTP/1.1, each request read by its head and
``content-length`` only, answered ``204 No Content`` at once; per path it keeps every
``webhook-id`` with the event's send time (the ``"t"`` in its data) and the first receipt.

A scenario registers ``--endpoints`` endpoints, ``/hook/<i>`` each, all on ``bench/**`` (so every
event goes to every endpoint), then:

- **throughput**: ``--events`` events published on ``bench/hooks`` in ``POST /publish`` batches of
  ``--webhook-batch``, one request in flight, as fast as acknowledged; deliveries/s = requests the
  receiver got / (last receipt - first publish). The events are all out long before they are
  delivered, so this is the rate at which the server drains a backlog, and its latency is
  mostly queueing.
- **latency**: single-event publishes, paced at ``--webhook-latency-load`` of the throughput just
  measured (events/s = load x deliveries/s / endpoints), for ``--webhook-latency-duration`` s.

Latency is publish to receipt: each event's data carries ``time.time_ns()`` taken just before
its publish request is written; the receiver subtracts it from ``time.time_ns()`` when the
request's last byte is read (the same host clock). Losses: every endpoint must get every
published event (``webhook-id`` = the cursor the publish acknowledged); duplicates are requests
beyond the first for one id and path. Server CPU is ``/proc/<pid>/stat`` (all threads).

With more than one endpoint, a second scenario follows on a fresh server (unless
``--no-webhook-single``): one endpoint, ``--webhook-single-events`` events, to show what one
endpoint gets at its concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from loadgen import HOST, payload
from target import CLIENT_CORE, Server, Window, percentile, running_server
from tidings.bench.hub import free_port
from tidings.bench.proc import cpu_seconds
from tidings.bench.wire import HTTPConnection, messages, request

CHANNEL, PATTERN = "bench/hooks", "bench/**"
HOOK_PATH = "/hook/{}"
# No new request for this long: the rest is missing. Long enough for a retry (the first is
# 5 s after a failure) of an attempt that waited for httpx's pool until its timeout (15 s).
STALL_S = 30.0
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
_TS = re.compile(rb'"t":(\d+)')


# -- the receiver (its own process) ------------------------------------------------------------


class Tally:
    """What the receiver has seen since the last reset."""

    def __init__(self) -> None:
        self.open = 0  # the sender's connections open now (survives a reset)
        self.reset()

    def reset(self) -> None:
        self.paths: dict[bytes, dict[bytes, tuple[int, int]]] = {}  # path -> id -> (t, receipt)
        self.requests: dict[bytes, int] = {}
        self.total = self.bytes = self.no_id = self.first = self.last = 0
        self.connections = 0  # the sender's new connections since the reset
        self.most_open = self.open

    def stats(self) -> bytes:
        return orjson.dumps(
            {"requests": self.total, "first_ns": self.first, "last_ns": self.last,
             "connections": self.connections, "open": self.open, "most_open": self.most_open}
        )  # fmt: skip

    def report(self) -> bytes:
        paths = {
            p.decode(): {
                "requests": self.requests[p],
                "ids": {k.decode(): v for k, v in ids.items()},
            }
            for p, ids in self.paths.items()
        }
        return orjson.dumps(
            {"requests": self.total, "bytes": self.bytes, "no_id": self.no_id,
             "first_ns": self.first, "last_ns": self.last, "paths": paths}
        )  # fmt: skip


def _header(head: bytes, lower: bytes, name: bytes) -> bytes | None:
    i = lower.find(b"\r\n" + name + b":")
    if i < 0:
        return None
    start = i + len(name) + 3
    end = lower.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


class Hook(asyncio.Protocol):
    """One keep-alive connection to the receiver; ``/_stats``, ``/_report`` and ``/_reset``
    are its control paths (JSON answers), anything else is a delivery."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self.served = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.served:  # a sender's connection (the generator's control requests are not)
            self.tally.open -= 1

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        found, rest = messages(buf)
        self._buf = buf[rest:]
        out = []
        for start, end, total in found:
            head = buf[start:end]
            body = buf[end + 4 : total]
            path = head[head.find(b" ") + 1 : head.find(b" HTTP/")]
            if path.startswith(b"/_"):
                out.append(self.control(path))
            else:
                if not self.served:
                    t = self.tally
                    t.connections += 1
                    t.open += 1
                    t.most_open = max(t.most_open, t.open)
                self.served += 1
                self.delivery(path, _header(head, head.lower(), b"webhook-id"), body, total - start)
                out.append(NO_CONTENT)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def delivery(self, path: bytes, id: bytes | None, body: bytes, size: int) -> None:
        now = time.time_ns()
        t = self.tally
        t.total += 1
        t.bytes += size
        t.first = t.first or now
        t.last = now
        t.requests[path] = t.requests.get(path, 0) + 1
        if id is None:
            t.no_id += 1
            return
        ids = t.paths.get(path)
        if ids is None:
            ids = t.paths[path] = {}
        if id not in ids:
            m = _TS.search(body)
            ids[id] = (int(m.group(1)) if m else 0, now)

    def control(self, path: bytes) -> bytes:
        t = self.tally
        if path == b"/_reset":
            t.reset()
            body = b"{}"
        elif path == b"/_report":
            body = t.report()
        else:
            body = t.stats()
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
        return head.encode() + b"\r\n\r\n" + body


async def serve_receiver(port: int) -> None:
    tally = Tally()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Hook(tally), "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


def receiver_main(argv: list[str]) -> None:
    port = int(argv[0])
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve_receiver(port))
    else:
        uvloop.run(serve_receiver(port))


# -- the generator's side ----------------------------------------------------------------------


class Receiver:
    """``taskset -c 1 python webhookbench.py receive PORT``, and what it has seen."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.control: HTTPConnection | None = None  # kept open: polls cost no connection

    async def start(self) -> None:
        command = ["taskset", "-c", str(CLIENT_CORE), sys.executable, __file__, "receive"]
        self.proc = subprocess.Popen([*command, str(self.port)])  # noqa: ASYNC220
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the receiver exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                self.control = await HTTPConnection.open(HOST, self.port)
                await self.get("/_stats")
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the receiver did not answer within 10 s")

    async def stop(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            for _ in range(100):
                if self.proc.poll() is not None:
                    return
                await asyncio.sleep(0.05)
            self.proc.kill()
            self.proc.wait()

    async def get(self, path: str) -> dict[str, Any]:
        assert self.control is not None
        status, body = await asyncio.wait_for(self.control.send(request("GET", path)), 30)
        if status != 200:
            raise RuntimeError(f"receiver {path} answered {status}")
        answer: dict[str, Any] = orjson.loads(body)
        return answer

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    async def wait_for(self, expected: int, stall: float = STALL_S) -> dict[str, Any]:
        """Poll until ``expected`` requests arrived, or none for ``stall`` s; the last stats."""
        seen, since = -1, time.monotonic()
        while True:
            stats = await self.get("/_stats")
            if stats["requests"] >= expected:
                return stats
            if stats["requests"] != seen:
                seen, since = stats["requests"], time.monotonic()
            elif time.monotonic() - since > stall:
                return stats
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    try:
        await receiver.start()
        yield receiver
    finally:
        await receiver.stop()


async def register(conn: HTTPConnection, receiver: Receiver, n: int, concurrency: int) -> list[str]:
    """``n`` endpoints ``/hook/<i>`` on ``bench/**``; their paths."""
    paths = []
    for i in range(n):
        path = HOOK_PATH.format(i)
        spec: dict[str, Any] = {"url": f"http://127.0.0.1:{receiver.port}{path}",
                                "channels": [PATTERN], "description": "benchmark"}  # fmt: skip
        if concurrency:
            spec["concurrency"] = concurrency
        status, body = await conn.send(request("POST", "/webhooks", orjson.dumps(spec)))
        if status != 201 or not orjson.loads(body).get("secret"):
            raise RuntimeError(f"POST /webhooks answered {status}: {body[:300]!r}")
        paths.append(path)
    return paths


async def publish(conn: HTTPConnection, n: int, size: int) -> list[str]:
    """One ``POST /publish`` of ``n`` events sent now (their ``"t"``); the acknowledged ids."""
    t = time.time_ns()
    event = {"channel": CHANNEL, "data": payload(size, t)}
    raw = request("POST", "/publish", orjson.dumps({"events": [event] * n}))
    status, body = await conn.send(raw)
    if status != 201:
        raise RuntimeError(f"publish answered {status}: {body[:200]!r}")
    return [e["id"] for e in orjson.loads(body)["events"]]


def summarize(report: dict[str, Any], paths: list[str], ids: list[str]) -> dict[str, Any]:
    """Losses, duplicates and publish-to-receipt latency of ``ids`` at every one of ``paths``."""
    latencies: list[int] = []
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    sent: dict[str, int] = {}
    missing = duplicates = 0
    missing_by_path: dict[str, int] = {}
    got = report["paths"]
    for path in paths:
        seen = got.get(path, {"requests": 0, "ids": {}})
        duplicates += seen["requests"] - len(seen["ids"])
        lost = 0
        for id in ids:
            receipt = seen["ids"].get(id)
            if receipt is None:
                lost += 1
                continue
            t, now = receipt
            latencies.append(now - t)
            sent[id] = t
            first[id] = min(first.get(id, now), now)
            last[id] = max(last.get(id, now), now)
        if lost:
            missing_by_path[path] = lost
        missing += lost
    wanted = set(paths)
    unexpected = sum(v["requests"] for p, v in got.items() if p not in wanted)
    extra = set().union(*(v["ids"] for v in got.values())) - set(ids) if got else set()
    latencies.sort()
    firsts = sorted(first[i] - sent[i] for i in first)
    lasts = sorted(last[i] - sent[i] for i in last)

    def ms(values: list[int], p: float) -> float:
        return round(percentile(values, p) / 1e6, 2)

    return {
        "expected_deliveries": len(ids) * len(paths),
        "missing_deliveries": missing,
        "missing_by_path": dict(list(missing_by_path.items())[:10]),
        "duplicate_deliveries": duplicates,
        "unexpected_requests": unexpected + report["no_id"],
        "unpublished_ids_received": len(extra),
        "latency_p50_ms": ms(latencies, 50),
        "latency_p90_ms": ms(latencies, 90),
        "latency_p99_ms": ms(latencies, 99),
        "latency_max_ms": ms(latencies, 100),
        "first_endpoint_receipt_p50_ms": ms(firsts, 50),
        "last_endpoint_receipt_p50_ms": ms(lasts, 50),
        "last_endpoint_receipt_max_ms": ms(lasts, 100),
        "bytes_per_request": round(report["bytes"] / max(report["requests"], 1)),
    }


async def attempts(server: Server) -> dict[str, int]:
    """tidings' own count of attempts by outcome (``tidings_webhook_attempts_total``); empty if
    ``/metrics`` does not answer within 10 s (an overloaded server)."""
    out: dict[str, int] = {}
    try:
        metrics = await server.metrics()
    except (OSError, TimeoutError):
        return {"metrics_unanswered": 1}
    for key, value in metrics.items():
        m = re.match(r'tidings_webhook_attempts_total\{.*outcome="(\w+)"', key)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + int(value)
    return out


async def throughput_phase(
    args: argparse.Namespace, server: Server, receiver: Receiver, paths: list[str], events: int
) -> dict[str, Any]:
    conn = await HTTPConnection.open(HOST, server.port)
    await receiver.get("/_reset")
    a0 = await attempts(server)
    ids: list[str] = []
    with Window(server) as window:
        r0 = receiver.cpu_seconds()
        start = time.time_ns()
        while len(ids) < events:
            ids += await publish(conn, min(args.webhook_batch, events - len(ids)), args.payload)
        published = time.time_ns()
        stats = await receiver.wait_for(events * len(paths))
        receiver_cpu = receiver.cpu_seconds() - r0
    conn.close()
    a1 = await attempts(server)
    report = await receiver.get("/_report")
    requests = report["requests"]
    # Wall time to the last receipt; the window's CPU may run up to one poll (20 ms) past it.
    span = max(report["last_ns"] - start, 1) / 1e9
    return {
        "deliveries_per_s": round(requests / span),
        "per_endpoint_deliveries_per_s": round(requests / span / len(paths), 1),
        "requests_received": requests,
        "seconds_first_publish_to_last_receipt": round(span, 3),
        "seconds_publishing": round((published - start) / 1e9, 3),
        "publish_events_per_s": round(events / max((published - start) / 1e9, 1e-9)),
        "server_cpu_s_per_1000_deliveries": round(window.server_cpu / max(requests, 1) * 1e3, 4),
        "server_cpu_us_per_delivery": round(window.server_cpu / max(requests, 1) * 1e6, 1),
        "receiver_cpu_util": round(receiver_cpu / window.elapsed, 3),
        "receiver_cpu_us_per_request": round(receiver_cpu / max(requests, 1) * 1e6, 1),
        "receiver_connections_opened": stats["connections"],
        "receiver_most_open_connections": stats["most_open"],
        "server_attempts": {k: v - a0.get(k, 0) for k, v in a1.items() if v - a0.get(k, 0)},
        **summarize(report, paths, ids),
        **window.summary(),
        "params": {"events": events, "events_per_publish": args.webhook_batch},
    }


async def latency_phase(
    args: argparse.Namespace, server: Server, receiver: Receiver, paths: list[str], rate: float
) -> dict[str, Any]:
    conn = await HTTPConnection.open(HOST, server.port)
    await receiver.get("/_reset")
    ids: list[str] = []
    acks: list[int] = []
    loop = asyncio.get_running_loop()
    with Window(server) as window:
        r0 = receiver.cpu_seconds()
        nxt = loop.time()
        end = nxt + args.webhook_latency_duration
        while nxt < end:
            t0 = time.perf_counter_ns()
            ids += await publish(conn, 1, args.payload)
            acks.append(time.perf_counter_ns() - t0)
            nxt += 1 / rate
            await asyncio.sleep(max(0.0, nxt - loop.time()))
        await receiver.wait_for(len(ids) * len(paths))
        receiver_cpu = receiver.cpu_seconds() - r0
    conn.close()
    report = await receiver.get("/_report")
    requests = report["requests"]
    acks.sort()
    return {
        "events_per_s": round(rate, 1),
        "offered_deliveries_per_s": round(rate * len(paths)),
        "published": len(ids),
        "published_events_per_s": round(len(ids) / args.webhook_latency_duration, 1),
        "publish_ack_p50_ms": round(percentile(acks, 50) / 1e6, 2),
        "publish_ack_max_ms": round(percentile(acks, 100) / 1e6, 2),
        "requests_received": requests,
        # Publishing included: one single-event POST /publish per event.
        "server_cpu_us_per_delivery": round(window.server_cpu / max(requests, 1) * 1e6, 1),
        "receiver_cpu_util": round(receiver_cpu / window.elapsed, 3),
        **summarize(report, paths, ids),
        **window.summary(),
    }


async def scenario(args: argparse.Namespace, endpoints: int, events: int) -> dict[str, Any]:
    env = {
        "TIDINGS_WEBHOOKS_ALLOW_HTTP": "true",
        "TIDINGS_WEBHOOKS_ALLOWED_NETWORKS": "127.0.0.1/32",
        "TIDINGS_WEBHOOKS_MAX_ENDPOINTS": str(max(endpoints, 1000)),
        # Not measured here; and its fixed default port (50051) may be taken on a busy machine.
        "TIDINGS_GRPC_ENABLED": "false",
    }
    async with running_receiver() as receiver, running_server(args, env) as server:
        conn = await HTTPConnection.open(HOST, server.port)
        paths = await register(conn, receiver, endpoints, args.concurrency)
        conn.close()
        # A warm-up event: every endpoint has opened a connection before the clock starts.
        await throughput_phase(args, server, receiver, paths, 1)
        name = f"{endpoints} endpoint{'s' * (endpoints != 1)}"
        print(f"  {name}: {events} events ...", flush=True)
        result: dict[str, Any] = {
            "endpoints": endpoints,
            "throughput": await throughput_phase(args, server, receiver, paths, events),
        }
        rate = args.webhook_latency_load * result["throughput"]["deliveries_per_s"] / endpoints
        if args.webhook_latency_duration and rate > 0:
            print(f"  {name}: latency at {rate:.1f} events/s ...", flush=True)
            result["latency"] = await latency_phase(args, server, receiver, paths, rate)
        result["server_rss_kb"] = server.rss_kb()
    return result


def failures_of(name: str, result: dict[str, Any]) -> list[str]:
    out = []
    for phase, step in result.items():
        if not isinstance(step, dict) or "missing_deliveries" not in step:
            continue
        lost, dup = step["missing_deliveries"], step["duplicate_deliveries"]
        other = step["unexpected_requests"] + step["unpublished_ids_received"]
        if lost or dup or other:
            out.append(
                f"{name} {phase}: {lost} deliveries missing {step['missing_by_path']}, "
                f"{dup} duplicates, {other} unexpected requests (want 0)"
            )
    return out


async def workload_webhooks(args: argparse.Namespace) -> dict[str, Any]:
    n = args.endpoints
    main = await scenario(args, n, args.events)
    single = None
    if n > 1 and args.webhook_single:
        single = await scenario(args, 1, args.webhook_single_events)
    tp, lat = main["throughput"], main.get("latency", {})
    scenarios = {f"endpoints_{n}": main, **({"endpoints_1": single} if single else {})}
    failures = [f for key, step in scenarios.items() for f in failures_of(key, step)]
    return {
        "deliveries_per_s": tp["deliveries_per_s"],
        "server_cpu_s_per_1000_deliveries": tp["server_cpu_s_per_1000_deliveries"],
        "latency_p50_ms": lat.get("latency_p50_ms"),
        "latency_p99_ms": lat.get("latency_p99_ms"),
        "missing_deliveries": tp["missing_deliveries"] + lat.get("missing_deliveries", 0),
        "duplicate_deliveries": tp["duplicate_deliveries"] + lat.get("duplicate_deliveries", 0),
        "single_endpoint_deliveries_per_s": single and single["throughput"]["deliveries_per_s"],
        "failures": failures,
        **scenarios,
        "params": {
            "endpoints": n,
            "events": args.events,
            "concurrency": args.concurrency or "default (4)",
            "event_bytes": args.payload,
            "durability": args.durability,
        },
    }


WEBHOOK_WORKLOADS = {"webhooks": workload_webhooks}


def headline(result: dict[str, Any]) -> str:
    """The scenarios' main numbers, one line each, for ``run.py``'s report."""
    lines = []
    for key, scenario in result.items():
        if not key.startswith("endpoints_"):
            continue
        tp, lat, n = scenario["throughput"], scenario.get("latency"), scenario["endpoints"]
        line = (
            f"   {n} endpoint{'s' * (n != 1)}: {tp['deliveries_per_s']:,} deliveries/s "
            f"({tp['per_endpoint_deliveries_per_s']:,}/s each) at "
            f"{tp['server_cpu_s_per_1000_deliveries']} s server CPU per 1,000 (server core "
            f"{tp['server_cpu_util']}, receiver {tp['receiver_cpu_util']}); missing "
            f"{tp['missing_deliveries']}, duplicates {tp['duplicate_deliveries']}"
        )
        if lat:
            line += (
                f"\n      latency at {lat['events_per_s']:g} events/s "
                f"({lat['offered_deliveries_per_s']:,} deliveries/s): p50 {lat['latency_p50_ms']} "
                f"ms, p99 {lat['latency_p99_ms']} ms, last endpoint p50 "
                f"{lat['last_endpoint_receipt_p50_ms']} ms, publish ack p50 "
                f"{lat['publish_ack_p50_ms']} ms; missing {lat['missing_deliveries']}, "
                f"duplicates {lat['duplicate_deliveries']}"
            )
        lines.append(line)
    return "\n".join(lines)


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("webhooks")
    for flag, kind, default, text in (
        ("--endpoints", int, 100, "endpoints registered (100)"),
        ("--events", int, 600, "events published (600)"),
        ("--concurrency", int, 0, "attempts in flight per endpoint (0: the server's default, "
         "webhooks.concurrency = 4)"),
        ("--payload", int, 256, "event data bytes (JSON, 256)"),
        ("--webhook-batch", int, 100, "events per POST /publish (100)"),
        ("--webhook-latency-load", float, 0.5,
         "the latency phase offers this fraction of the measured deliveries/s (0.5)"),
        ("--webhook-latency-duration", float, 8.0,
         "seconds of paced single-event publishes (8; 0: skip)"),
        ("--webhook-single-events", int, 2000, "events, one endpoint (2000)"),
    ):  # fmt: skip
        g.add_argument(flag, type=kind, default=default, help=f"webhooks: {text}")
    g.add_argument(
        "--webhook-single",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="webhooks: then the same with one endpoint, on a fresh server",
    )


if __name__ == "__main__":
    if sys.argv[1:2] != ["receive"]:
        sys.exit(f"usage: {sys.argv[0]} receive PORT (the webhooks workload starts it)")
    receiver_main(sys.argv[2:])
