"""The server under test and what is measured about it.

``Server`` runs ``taskset -c 0 python -m tidings serve`` on a temporary SQLite file and reads its
CPU time (``/proc/<pid>/stat``, every thread), memory (``/proc/<pid>/status``), ``/healthz`` and
``/metrics``; ``Window`` takes wall time, server and generator CPU, other load on both cores and
(with ``--gc-stats``) the server's garbage-collector time over one measurement window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from loadgen import HOST
from tidings.bench.hub import free_port
from tidings.bench.proc import CLK_TCK, cpu_times, own_cpu_seconds, raise_nofile, rss_kb
from tidings.bench.wire import fetch

ROOT = Path(__file__).resolve().parent.parent
HARNESS = Path(__file__).resolve().parent / "harness"
SERVER_CORE, CLIENT_CORE = 0, 1


# -- the server under test ---------------------------------------------------------------------


class Server:
    """``taskset -c 0 python -m tidings serve`` on a temporary SQLite file."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str] | None = None) -> None:
        self.port = args.port or free_port()
        self.tmp = tempfile.mkdtemp(prefix="tidings-bench-")
        self.db = os.path.join(self.tmp, "bench.db")
        # The load generator is one address sending far past the per-address defaults of
        # [limits]; the benchmark measures the hub, not the rate limiter, so lift them.
        self.env = {
            "TIDINGS_LIMITS_PUBLISH_RATE": "0",
            "TIDINGS_LIMITS_SUBSCRIBE_RATE": "0",
            "TIDINGS_LIMITS_MAX_STREAMS_PER_ADDRESS": "0",
            **(env or {}),
        }
        if args.queue_size:
            self.env["TIDINGS_HUB_QUEUE_SIZE"] = str(args.queue_size)
        python = args.python or sys.executable
        pythonpath = []
        if args.python:  # another interpreter: import tidings from the source tree
            pythonpath.append(str(ROOT / "src"))
        self.gc_stats: str | None = None
        if args.gc_stats or args.gc_threshold or args.gc_freeze:
            pythonpath.insert(0, str(HARNESS))
            if args.gc_stats:
                self.gc_stats = self.env["BENCH_GC_STATS"] = os.path.join(self.tmp, "gc.json")
            if args.gc_threshold:
                self.env["BENCH_GC_THRESHOLD"] = args.gc_threshold
            if args.gc_freeze:
                self.env["BENCH_GC_FREEZE"] = str(args.gc_freeze)
        if pythonpath:
            self.env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        self.command = [
            "taskset",
            "-c",
            str(SERVER_CORE),
            python,
            "-m",
            "tidings",
            "serve",
            "--port",
            str(self.port),
            "--db",
            self.db,
            "--durability",
            args.durability,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = os.path.join(self.tmp, "server.log")

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
        env.update(self.env)
        # Blocking calls in async code are fine here: nothing else runs while the server starts.
        with open(self.logfile, "wb") as out:  # noqa: ASYNC230
            self.proc = subprocess.Popen(  # noqa: ASYNC220
                self.command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=raise_nofile,
                cwd=self.tmp,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                status, _ = await fetch(HOST, self.port, "GET", "/healthz")
                if status == 200:
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"server did not answer /healthz within 20 s:\n{self.log()}")

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return Path(self.logfile).read_text()[-4000:]
        return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the whole server process (every thread)."""
        return cpu_times(self.pid)

    def cpu_seconds(self) -> float:
        return sum(self.cpu_times())

    def gc_info(self) -> dict[str, Any] | None:
        """The server's gc totals (with --gc-stats; up to 0.25 s stale)."""
        if not self.gc_stats:
            return None
        with contextlib.suppress(OSError, ValueError):
            info: dict[str, Any] = json.loads(Path(self.gc_stats).read_text())
            return info
        return None

    def gc_seconds(self) -> float | None:
        info = self.gc_info()
        return None if info is None else float(sum(info["seconds"]))

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    async def health(self) -> dict[str, Any]:
        _, body = await fetch(HOST, self.port, "GET", "/healthz")
        result: dict[str, Any] = orjson.loads(body)
        return result

    async def metrics(self) -> dict[str, float]:
        """The Prometheus text exposition as ``{'name{labels}': value}``."""
        _, body = await fetch(HOST, self.port, "GET", "/metrics")
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            for _ in range(200):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


class BaselineServer(Server):
    """A baseline WebSocket server (``baseline_websockets.py``, ``node/server.js``), core 0 too.

    ``command`` is run as ``taskset -c 0 <command> PORT <after_port>``. Baselines answer
    ``GET /healthz`` with ``{"subscribers": N}`` and have no ``/metrics``.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        name: str,
        command: Sequence[str],
        after_port: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.port = args.port or free_port()
        self.tmp = tempfile.mkdtemp(prefix=f"tidings-bench-{name}-")
        self.env = {}
        self.gc_stats = None
        self.command = ["taskset", "-c", str(SERVER_CORE), *command, str(self.port), *after_port]
        self.proc = None
        self.logfile = os.path.join(self.tmp, "server.log")

    async def metrics(self) -> dict[str, float]:
        return {}


@contextlib.asynccontextmanager
async def running_server(
    args: argparse.Namespace, env: dict[str, str] | None = None, server: Server | None = None
) -> AsyncIterator[Server]:
    """Start ``server`` (default: tidings with ``env``), yield it, stop it whatever happens."""
    server = server or Server(args, env)
    side: subprocess.Popen[bytes] | None = None
    try:
        await server.start()
        if args.on_start:  # e.g. a profiler: --on-start 'py-spy record -o /tmp/x.svg --pid {pid}'
            cmd = args.on_start.format(pid=server.pid, port=server.port)
            print(f"  starting: {cmd}", flush=True)
            side = subprocess.Popen(cmd, shell=True)  # noqa: ASYNC220
        yield server
    finally:
        if side is not None and side.poll() is None:
            side.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                side.wait(30)
        await server.stop()


# -- measuring helpers -------------------------------------------------------------------------


def percentile(sorted_values: Sequence[int | float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[k])


def receipt_summary(receipts: Sequence[tuple[int, int]], slow_ms: float) -> dict[str, Any]:
    """Latency percentiles over (send ns, receipt ns) pairs, and per event the first and last
    subscriber's receipt; ``slow_ms`` names the threshold counted for the last subscriber."""
    latencies = sorted(now - t for t, now in receipts)
    per_event: dict[int, list[int]] = {}
    for t, now in receipts:
        span = per_event.setdefault(t, [now, now])
        span[0], span[1] = min(span[0], now), max(span[1], now)
    first = sorted(lo - t for t, (lo, _) in per_event.items())
    last = sorted(hi - t for t, (_, hi) in per_event.items())
    return {
        "p50_ms": round(percentile(latencies, 50) / 1e6, 3),
        "p90_ms": round(percentile(latencies, 90) / 1e6, 3),
        "p99_ms": round(percentile(latencies, 99) / 1e6, 3),
        "p999_ms": round(percentile(latencies, 99.9) / 1e6, 3),
        "max_ms": round(percentile(latencies, 100) / 1e6, 3),
        "samples": len(latencies),
        "first_receipt_per_event_p50_ms": round(percentile(first, 50) / 1e6, 3),
        "first_receipt_per_event_max_ms": round(percentile(first, 100) / 1e6, 3),
        "last_receipt_per_event_p50_ms": round(percentile(last, 50) / 1e6, 3),
        "last_receipt_per_event_max_ms": round(percentile(last, 100) / 1e6, 3),
        f"events_over_{slow_ms:g}ms_to_last_subscriber": sum(x > slow_ms * 1e6 for x in last),
        "events": len(per_event),
    }


def core_times() -> dict[int, tuple[float, float]]:
    """Per core (busy, steal) seconds from /proc/stat, to see load that is not ours."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *ticks = line.split()
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, ticks[:8])
            busy = user + nice + system + irq + softirq
            out[int(name[3:])] = (busy / CLK_TCK, steal / CLK_TCK)
    return out


class Window:
    """Wall time, server CPU and generator CPU over one measurement window."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def __enter__(self) -> Window:
        self.t0, self.own0, self.wall0 = time.perf_counter(), own_cpu_seconds(), time.time()
        self.cores0 = core_times()
        self.user0, self.sys0 = self.server.cpu_times()
        self.gc0 = self.server.gc_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.t0
        user, system = self.server.cpu_times()
        self.server_sys = system - self.sys0
        self.server_cpu = user - self.user0 + self.server_sys
        self.own_cpu = own_cpu_seconds() - self.own0
        cores1 = core_times()
        self.cores = {
            c: (cores1[c][0] - b0, cores1[c][1] - s0) for c, (b0, s0) in self.cores0.items()
        }
        gc1 = self.server.gc_seconds()
        self.gc = None if self.gc0 is None or gc1 is None else gc1 - self.gc0
        info = self.server.gc_info() or {}
        self.gc_longest = max(info.get("longest", [0.0]))
        self.gc_pauses = [p for p in info.get("pauses", []) if p[0] >= self.wall0]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seconds": round(self.elapsed, 3),
            "server_cpu_util": round(self.server_cpu / self.elapsed, 3),
            "server_kernel_share_of_cpu": round(self.server_sys / max(self.server_cpu, 1e-9), 3),
            "generator_cpu_util": round(self.own_cpu / self.elapsed, 3),
        }
        # Busy time on each core beyond what the server (core 0) and generator (core 1) used:
        # softirq work, and any other process on the machine (which makes a run noisy).
        for core, mine in ((SERVER_CORE, self.server_cpu), (CLIENT_CORE, self.own_cpu)):
            busy, steal = self.cores.get(core, (0.0, 0.0))
            out[f"core{core}_other_busy_util"] = round(max(0.0, busy - mine) / self.elapsed, 3)
            if steal:
                out[f"core{core}_steal_util"] = round(steal / self.elapsed, 3)
        if self.gc is not None:
            out["server_gc_share_of_cpu"] = round(self.gc / max(self.server_cpu, 1e-9), 3)
            out["server_gc_longest_pause_ms_since_start"] = round(1000 * self.gc_longest, 2)
            pauses = sorted(self.gc_pauses, key=lambda p: -p[2])
            out["server_gc_pauses_over_2ms_in_window"] = len(pauses)
            out["server_gc_longest_pauses_ms_in_window"] = ", ".join(
                f"{p[2]} (gen{p[1]})" for p in pauses[:5]
            )
        return out


async def drain(streams: Sequence[Any], expected: int, within: float = 10.0) -> int:
    """Wait until every open stream has ``expected`` events (or ``within`` s); missing ones."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        missing = sum(max(0, expected - s.count) for s in streams if not s.closed)
        if not missing:
            return 0
        await asyncio.sleep(0.05)
    return sum(max(0, expected - s.count) for s in streams if not s.closed)


def stream_totals(streams: Sequence[Any]) -> tuple[int, int]:
    """(events, reads) summed over ``streams``."""
    return sum(s.count for s in streams), sum(s.reads for s in streams)


def lagged_total(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("tidings_lagged_disconnects_total"))


def delivered_sse(metrics: dict[str, float]) -> float:
    return delivered(metrics, "sse")


def delivered(metrics: dict[str, float], transport: str) -> float:
    return metrics.get(f'tidings_delivered_events_total{{transport="{transport}"}}', 0.0)


async def idle_memory(
    server: Server, streams_factory: Callable[[], Any], n: int, strict: bool = True
) -> tuple[Any, dict[str, Any]]:
    """Open ``n`` streams and report server RSS before and after they sit idle.

    The server's ``/healthz`` must count ``n`` subscribers; with ``strict=False`` a mismatch is
    recorded (``health_subscribers``) rather than raised.
    """
    rss0 = server.rss_kb()
    streams = await streams_factory()
    await asyncio.sleep(2.0)
    rss1 = server.rss_kb()
    health = await server.health()
    counted = health.get("subscribers")
    if counted != n:
        if strict:
            raise RuntimeError(f"server reports {counted} subscribers, expected {n}")
        print(f"  note: /healthz counts {counted} subscribers, expected {n}", flush=True)
    return streams, {
        "rss_kb_before": rss0,
        "rss_kb_idle_subscribers": rss1,
        "kb_per_idle_connection": round((rss1 - rss0) / n, 2),
        "health_subscribers": counted,
    }


async def paced(
    send: Callable[[int], Awaitable[object]],
    rate: float,
    seconds: float,
    acks: list[int] | None = None,
) -> int:
    """Call ``send(t0_ns)`` ``rate`` times a second for ``seconds``, each awaited (acknowledged)
    before the next; ack latencies in ns go to ``acks`` when given. Returns how many were sent."""
    loop = asyncio.get_running_loop()
    interval = 1.0 / rate
    count, nxt = 0, loop.time()
    end = nxt + seconds
    while nxt < end:
        t0 = time.time_ns()
        await send(t0)
        if acks is not None:
            acks.append(time.time_ns() - t0)
        count += 1
        nxt += interval
        await asyncio.sleep(max(0.0, nxt - loop.time()))
    return count
