"""The WebSocket workloads: tidings' ``/ws`` side by side with two broadcast-only baselines.

    .venv/bin/python benchmarks/run.py ws-fanout|ws-latency|ws [--servers tidings,websockets,node]

Every workload runs once per server, one server at a time, each started on the server core:

- ``tidings``: ``python -m tidings serve``; subscribers send a ``subscribe`` message on ``/ws``,
  events are published with ``POST /publish`` (``--ws-publish http``, as the SSE workloads do) or
  with ``publish`` messages on WebSocket publisher connections (``--ws-publish ws``).
- ``websockets``: ``baseline_websockets.py``, the websockets library's ``broadcast()``.
- ``node``: ``node/server.js``, Node's ``ws`` with its broadcast idiom (``npm ci`` on first use).

The baselines broadcast what a publisher connection sends them: no history, no durability, no
envelope. Subscribers of every server are ``loadgen.WSStream``: the same frame walker counts the
same messages, and the same closed loop, phases and percentiles apply to all three.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from loadgen import (
    HOST,
    TimedWSStream,
    WSPublisher,
    WSStream,
    batch_request,
    check_ack,
    open_ws,
    payload,
    payload_bytes,
)
from target import (
    BaselineServer,
    Server,
    Window,
    drain,
    idle_memory,
    lagged_total,
    paced,
    percentile,
    receipt_summary,
    running_server,
    stream_totals,
)
from tidings.bench.wire import HTTPConnection, request
from tidings.bench.ws import frame as ws_frame

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE / "node"
SERVERS = ("tidings", "websockets", "node")
# What the comparison falls back on when the websockets baseline is not run (ARCHITECTURE.md §5).
WEBSOCKETS_YARDSTICK = 49_000
SUBSCRIBED = b'"op":"subscribed"'
FAN_CHANNEL, LATENCY_CHANNEL = "bench/wsfan", "bench/wslatency"


# -- how the generator talks to each server ----------------------------------------------------


class Feed:
    """One publisher: sends ``n`` events of the benchmark's size, or one timestamped event.

    ``send`` returns once the server acknowledged (tidings) or once written (the baselines, which
    never answer: the closed loop's window over the slowest subscriber bounds them instead).
    """

    async def send(self, n: int) -> None:
        raise NotImplementedError

    async def send_timed(self, t: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class HTTPFeed(Feed):
    """tidings over HTTP: ``POST /publish`` with ``n`` events, or one ``POST /channels/<c>``."""

    def __init__(self, conn: HTTPConnection, channel: str, size: int) -> None:
        self.conn, self.channel, self.size = conn, channel, size
        self._batches: dict[int, bytes] = {}

    async def send(self, n: int) -> None:
        raw = self._batches.get(n)
        if raw is None:
            raw = self._batches[n] = batch_request(self.channel, self.size, n)
        await check_ack(self.conn.send(raw))

    async def send_timed(self, t: int) -> None:
        raw = request("POST", f"/channels/{self.channel}", payload_bytes(self.size, t))
        await check_ack(self.conn.send(raw))

    def close(self) -> None:
        self.conn.close()


class WSFeed(Feed):
    """A WebSocket publisher: tidings ``publish`` messages (acknowledged), or baseline events."""

    def __init__(self, conn: WSPublisher, channel: str | None, size: int) -> None:
        self.conn, self.channel, self.size = conn, channel, size
        self._batches: dict[int, bytes] = {}

    def message(self, t: int = 0) -> bytes:
        if self.channel is None:  # a baseline broadcasts the event's bytes as they come
            return payload_bytes(self.size, t)
        return orjson.dumps(
            {"op": "publish", "channel": self.channel, "data": payload(self.size, t)}
        )

    async def send(self, n: int) -> None:
        frames = self._batches.get(n)
        if frames is None:
            frames = self._batches[n] = ws_frame(self.message()) * n
        await self.conn.publish(frames, n)
        self.check()

    async def send_timed(self, t: int) -> None:
        await self.conn.publish(ws_frame(self.message(t)), 1)
        self.check()

    def check(self) -> None:
        if self.conn.errors:
            raise RuntimeError(f"publish answered {self.conn.errors[0]!r}")

    def close(self) -> None:
        self.conn.close()


class Rig:
    """One server under test and the way to subscribe and publish to it."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.args = args

    def publish_via(self, fanout: bool) -> str:
        """How events reach this server, in words for the results."""
        each = f"{self.args.batch} per send, 1 when unbatched" if fanout else "one at a time"
        if self.name != "tidings":
            return f"WebSocket publisher connection, one message per event ({each}), no acks"
        if self.args.ws_publish == "ws":
            return f"WebSocket publish messages ({each}), acknowledged"
        if fanout:
            return f"HTTP POST /publish ({each}), acknowledged"
        return "HTTP POST /channels/<channel> (one event per request), acknowledged"

    def server(self) -> Server:
        if self.name == "tidings":
            return Server(self.args)
        if self.name == "websockets":
            python = self.args.python or sys.executable
            script = str(HERE / "baseline_websockets.py")
            # BaselineServer appends the port; the loop comes after it.
            return BaselineServer(
                self.args, self.name, [python, script], [self.args.websockets_loop]
            )
        return BaselineServer(self.args, self.name, ["node", str(NODE_DIR / "server.js")])

    def subscriber_args(self, channel: str) -> dict[str, Any]:
        if self.name == "tidings":
            message = {"op": "subscribe", "id": "s", "channels": [channel]}
            return {"path": b"/ws", "first": ws_frame(orjson.dumps(message)), "expect": SUBSCRIBED}
        return {"path": b"/sub", "expect": SUBSCRIBED}

    async def subscribe(
        self, port: int, n: int, channel: str, receipts: list[tuple[int, int]] | None = None
    ) -> list[WSStream]:
        kw = self.subscriber_args(channel)
        if receipts is None:
            return await open_ws(port, n, lambda: WSStream(**kw))
        path = kw.pop("path")
        return await open_ws(port, n, lambda: TimedWSStream(path, receipts, **kw))

    async def feeds(self, port: int, n: int, channel: str) -> list[Feed]:
        feeds: list[Feed] = []
        for _ in range(n):
            if self.name == "tidings" and self.args.ws_publish == "http":
                feeds.append(
                    HTTPFeed(await HTTPConnection.open(HOST, port), channel, self.args.size)
                )
                continue
            path, acks = (b"/ws", b'"op":"published"') if self.name == "tidings" else (b"/pub", b"")
            conn = (await open_ws(port, 1, lambda p=path, a=acks: WSPublisher(p, a)))[0]
            assert isinstance(conn, WSPublisher)
            feeds.append(WSFeed(conn, channel if self.name == "tidings" else None, self.args.size))
        return feeds


def delivered_total(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("tidings_delivered_events_total"))


def node_ready() -> str | None:
    """None when the Node baseline can run (installing ``ws`` on first use), else why not."""
    if shutil.which("node") is None:
        return "node is not installed"
    if (NODE_DIR / "node_modules" / "ws" / "package.json").exists():
        return None
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed (needed once to install ws into benchmarks/node)"
    print("  installing ws into benchmarks/node/node_modules (npm ci) ...", flush=True)
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True
    )
    if done.returncode:
        return f"npm ci failed: {(done.stderr or done.stdout).strip()[-500:]}"
    return None


def rigs(args: argparse.Namespace) -> Iterator[Rig | tuple[str, str]]:
    """The servers to run, in order; a (name, reason) pair for one that is skipped."""
    for name in args.servers:
        if name == "node" and (why := node_ready()):
            print(f"  skipping the Node ws baseline: {why}", flush=True)
            yield name, why
        else:
            yield Rig(name, args)


@contextlib.asynccontextmanager
async def started(rig: Rig) -> AsyncIterator[Server]:
    async with running_server(rig.args, server=rig.server()) as server:
        yield server


# -- fan-out -----------------------------------------------------------------------------------


async def closed_loop(
    args: argparse.Namespace,
    server: Server,
    streams: list[WSStream],
    feeds: list[Feed],
    duration: float,
    batch: int,
    window_events: int,
    lowat: int = 0,
) -> dict[str, Any]:
    """Publish as fast as the slowest subscriber receives, at most ``window_events`` ahead.

    Each feed has one send of ``batch`` events in flight (tidings waits for the acknowledgement;
    a baseline feed returns once written). ``lowat``: subscribers read only once that many bytes
    are waiting (``WSStream.set_lowat``), for the measured part. A subscriber may then leave
    up to ``lowat`` bytes unread, so the mark is only used when the window is several times
    that: with a small window the loop would wait for frames that never wake the reader.
    """
    if window_events * args.size < 4 * lowat:
        lowat = 0
    base = min(s.count for s in streams)
    sent = 0
    stop = False

    async def publisher(feed: Feed) -> None:
        nonlocal sent
        while not stop:
            # Every live subscriber must have all but ``window_events`` of what was sent.
            need = base + sent + batch - window_events
            for s in streams:
                if (fut := s.reached(need)) is not None:
                    await fut
                    if stop:
                        return
            if need == base + sent + batch - window_events:  # no other publisher sent meanwhile
                sent += batch
                await feed.send(batch)

    tasks = [asyncio.create_task(publisher(f)) for f in feeds]
    set_lowat(streams, lowat)
    await asyncio.sleep(args.warmup)
    m0 = await server.metrics()
    with Window(server) as window:
        d0, r0 = stream_totals(streams)
        b0 = sum(s.bytes for s in streams)
        await asyncio.sleep(duration)
        d1, r1 = stream_totals(streams)
        b1 = sum(s.bytes for s in streams)
    stop = True
    for s in streams:
        s.wake()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    set_lowat(streams, 0)
    missing = await drain(streams, base + sent)
    m1 = await server.metrics()
    deliveries = d1 - d0
    return {
        "deliveries_per_s": round(deliveries / window.elapsed),
        "events_per_s": round(deliveries / window.elapsed / len(streams), 1),
        "events_per_read": round(deliveries / max(r1 - r0, 1), 2),
        "bytes_per_delivery": round((b1 - b0) / max(deliveries, 1), 1),
        "server_cpu_us_per_delivery": round(window.server_cpu / max(deliveries, 1) * 1e6, 2),
        "server_kernel_us_per_delivery": round(window.server_sys / max(deliveries, 1) * 1e6, 2),
        "implied_max_deliveries_per_s": round(deliveries / max(window.server_cpu, 1e-9)),
        "lagged_disconnects": int(lagged_total(m1) - lagged_total(m0)),
        "closed_streams": sum(s.closed for s in streams),
        "missing_deliveries": missing,
        "server_delivered_delta": int(delivered_total(m1) - delivered_total(m0)),
        **window.summary(),
        "params": {
            "events_per_send": batch,
            "publishers": len(feeds),
            "window_events": window_events,
            "subscriber_rcvlowat_bytes": lowat or 1,
        },
    }


async def open_loop(
    server: Server,
    streams: list[WSStream],
    feeds: list[Feed],
    rate: float,
    duration: float,
    batch: int,
    lowat: int = 0,
) -> dict[str, Any]:
    """Publish at a fixed ``rate`` deliveries/s whatever happens; then see what arrived."""
    interval = batch * len(feeds) / (rate / len(streams))  # per feed
    base = min(s.count for s in streams)
    published = 0
    loop = asyncio.get_running_loop()

    async def publisher(feed: Feed, start: float, end: float) -> None:
        nonlocal published
        nxt = start
        while nxt < end:
            await asyncio.sleep(max(0.0, nxt - loop.time()))
            await feed.send(batch)
            published += batch
            nxt += interval

    set_lowat(streams, lowat)
    m0 = await server.metrics()
    with Window(server) as window:
        d0, _ = stream_totals(streams)
        start = loop.time()
        await asyncio.gather(
            *(
                publisher(f, start + i * interval / len(feeds), start + duration)
                for i, f in enumerate(feeds)
            )
        )
        publishing = loop.time() - start
        set_lowat(streams, 0)
        missing = await drain(streams, base + published, within=5.0)
        d1, _ = stream_totals(streams)
    m1 = await server.metrics()
    deliveries = d1 - d0
    return {
        "offered_deliveries_per_s": round(rate),
        "published_events_per_s": round(published / publishing, 1),
        "deliveries_per_s": round(deliveries / window.elapsed),
        "drained_after_s": round(max(0.0, window.elapsed - publishing), 2),
        "server_cpu_us_per_delivery": round(window.server_cpu / max(deliveries, 1) * 1e6, 2),
        "lagged_disconnects": int(lagged_total(m1) - lagged_total(m0)),
        "closed_streams": sum(s.closed for s in streams),
        "missing_deliveries": missing,
        **window.summary(),
        "params": {"subscriber_rcvlowat_bytes": lowat or 1},
    }


def set_lowat(streams: list[WSStream], nbytes: int) -> None:
    for s in streams:
        s.set_lowat(nbytes)


async def fanout_one(rig: Rig) -> dict[str, Any]:
    args = rig.args
    n = args.subscribers
    duration = args.duration or 6.0
    async with started(rig) as server:
        streams, memory = await idle_memory(
            server, lambda: rig.subscribe(server.port, n, FAN_CHANNEL), n, strict=False
        )
        feeds = await rig.feeds(server.port, args.fan_publishers, FAN_CHANNEL)
        result: dict[str, Any] = {"publish_via": rig.publish_via(True), "memory": memory}
        print(f"  {rig.name}: closed loop ...", flush=True)
        result["closed_loop"] = await closed_loop(
            args, server, streams, feeds, duration, args.batch, args.window, args.ws_lowat
        )
        if args.confirm:
            print(f"  {rig.name}: open-loop confirmation ...", flush=True)
            rate = result["closed_loop"]["deliveries_per_s"] * args.confirm
            result["open_loop_confirm"] = await open_loop(
                server, streams, feeds, rate, min(duration, 4.0), args.batch, args.ws_lowat
            )
        if args.unbatched:
            # One event in flight: each goes out in its own frame and write, on every server.
            # Its rate is paced by the round trip as much as by the server (the generator's read
            # of a frame costs about what the server's write does): implied_max_deliveries_per_s
            # is what the server's CPU per delivery would allow with its core 100 % busy.
            print(f"  {rig.name}: unbatched (one event in flight) ...", flush=True)
            result["unbatched"] = await closed_loop(
                args, server, streams, feeds[:1], min(duration, 5.0), 1, 1
            )
        for f in feeds:
            f.close()
        for s in streams:
            s.close()
    closed = result["closed_loop"]
    return {
        "deliveries_per_s": closed["deliveries_per_s"],
        "unbatched_deliveries_per_s": result.get("unbatched", {}).get("deliveries_per_s"),
        "server_cpu_us_per_delivery": closed["server_cpu_us_per_delivery"],
        "unbatched_server_cpu_us_per_delivery": result.get("unbatched", {}).get(
            "server_cpu_us_per_delivery"
        ),
        "unbatched_implied_max_deliveries_per_s": result.get("unbatched", {}).get(
            "implied_max_deliveries_per_s"
        ),
        "kb_per_idle_connection": memory["kb_per_idle_connection"],
        **result,
    }


# -- latency -----------------------------------------------------------------------------------


async def latency_one(rig: Rig) -> dict[str, Any]:
    args = rig.args
    n = args.subscribers
    duration = args.duration or 15.0
    receipts: list[tuple[int, int]] = []
    async with started(rig) as server:
        streams, memory = await idle_memory(
            server,
            lambda: rig.subscribe(server.port, n, LATENCY_CHANNEL, receipts),
            n,
            strict=False,
        )
        (feed,) = await rig.feeds(server.port, 1, LATENCY_CHANNEL)
        acks: list[int] = []
        await paced(feed.send_timed, args.rate, args.warmup)
        await asyncio.sleep(0.5)
        m0 = await server.metrics()
        for s in streams:
            assert isinstance(s, TimedWSStream)
            s.recording = True
        with Window(server) as window:
            published = await paced(feed.send_timed, args.rate, duration, acks)
            await asyncio.sleep(1.0)  # let the last events arrive
        for s in streams:
            assert isinstance(s, TimedWSStream)
            s.recording = False
        m1 = await server.metrics()
        feed.close()
        closed = sum(s.closed for s in streams)
        for s in streams:
            s.close()
    acks.sort()
    return {
        "publish_via": rig.publish_via(False),
        **receipt_summary(receipts, 35),
        "expected_samples": published * n,
        # For the baselines this is only the time to write the frame: they never acknowledge.
        "publish_ack_p50_ms": round(percentile(acks, 50) / 1e6, 3),
        "publish_ack_p99_ms": round(percentile(acks, 99) / 1e6, 3),
        "lagged_disconnects": int(lagged_total(m1) - lagged_total(m0)),
        "closed_streams": closed,
        "server_cpu_us_per_delivery": round(window.server_cpu / max(len(receipts), 1) * 1e6, 2),
        "kb_per_idle_connection": memory["kb_per_idle_connection"],
        "memory": memory,
        **window.summary(),
    }


# -- the workloads -----------------------------------------------------------------------------


async def each_server(args: argparse.Namespace, one: Any) -> dict[str, Any]:
    servers: dict[str, Any] = {}
    for rig in rigs(args):
        if isinstance(rig, tuple):
            servers[rig[0]] = {"skipped": rig[1]}
            continue
        print(f"  -- {rig.name}", flush=True)
        try:
            servers[rig.name] = await one(rig)
        except Exception as exc:  # a server that fails is reported, the others still run
            print(f"  {rig.name} FAILED: {exc!r}", flush=True)
            servers[rig.name] = {"error": repr(exc)[:2000]}
    return servers


def params(args: argparse.Namespace, duration: float) -> dict[str, Any]:
    return {
        "subscribers": args.subscribers,
        "event_bytes": args.size,
        "tidings_publish": args.ws_publish,
        "queue_size": args.queue_size or "default (1024)",
        "warmup_s": args.warmup,
        "duration_s": duration,
        "baselines": "broadcast only: no history, no durability, no envelope, no lag handling",
    }


async def workload_ws_fanout(args: argparse.Namespace) -> dict[str, Any]:
    servers = await each_server(args, fanout_one)
    tidings, ws = servers.get("tidings", {}), servers.get("websockets", {})
    baseline = ws.get("deliveries_per_s")
    return {
        "deliveries_per_s": tidings.get("deliveries_per_s"),
        "unbatched_deliveries_per_s": tidings.get("unbatched_deliveries_per_s"),
        # The target: the websockets baseline measured in this run (else the §5 yardstick).
        "websockets_deliveries_per_s": baseline or WEBSOCKETS_YARDSTICK,
        "websockets_unbatched_deliveries_per_s": ws.get("unbatched_deliveries_per_s"),
        "target_source": "websockets baseline, this run" if baseline else "ARCHITECTURE.md §5",
        "servers": servers,
        "params": params(args, args.duration or 6.0),
    }


async def workload_ws_latency(args: argparse.Namespace) -> dict[str, Any]:
    servers = await each_server(args, latency_one)
    return {
        "p99_ms": servers.get("tidings", {}).get("p99_ms"),
        "servers": servers,
        "params": {**params(args, args.duration or 15.0), "events_per_s": args.rate},
    }


# -- the side-by-side table --------------------------------------------------------------------


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"


def generator_cpu(fanout: dict[str, Any]) -> str:
    """The generator's CPU use in the batched and the unbatched phase: ``0.12/0.70``."""
    phases = [fanout.get(k, {}).get("generator_cpu_util") for k in ("closed_loop", "unbatched")]
    return "/".join(_num(x, 2) for x in phases if x is not None) or "-"


def table(fanout: dict[str, Any] | None, latency: dict[str, Any] | None) -> str:
    """One row per server: fan-out and latency columns, whichever were run."""
    columns: list[tuple[str, Any]] = []
    if fanout:
        columns += [
            ("deliv/s", lambda f, _l: _num(f.get("deliveries_per_s"))),
            ("us/deliv", lambda f, _l: _num(f.get("server_cpu_us_per_delivery"), 2)),
            ("unbatched/s", lambda f, _l: _num(f.get("unbatched_deliveries_per_s"))),
            ("us/deliv", lambda f, _l: _num(f.get("unbatched_server_cpu_us_per_delivery"), 2)),
            ("at 100%/s", lambda f, _l: _num(f.get("unbatched_implied_max_deliveries_per_s"))),
            ("KB/idle", lambda f, _l: _num(f.get("kb_per_idle_connection"), 1)),
            ("B/deliv", lambda f, _l: _num(f.get("closed_loop", {}).get("bytes_per_delivery"))),
            ("gen cpu", lambda f, _l: generator_cpu(f)),
        ]
    if latency:
        columns += [
            ("p50 ms", lambda _f, lat: _num(lat.get("p50_ms"), 1)),
            ("p90 ms", lambda _f, lat: _num(lat.get("p90_ms"), 1)),
            ("p99 ms", lambda _f, lat: _num(lat.get("p99_ms"), 1)),
            ("max ms", lambda _f, lat: _num(lat.get("max_ms"), 1)),
        ]
    names = list(
        dict.fromkeys([*(fanout or {}).get("servers", {}), *(latency or {}).get("servers", {})])
    )
    rows = [["server", *(c[0] for c in columns)]]
    notes = []
    for name in names:
        f = (fanout or {}).get("servers", {}).get(name, {})
        lat = (latency or {}).get("servers", {}).get(name, {})
        failed = [
            x.get("skipped") or x.get("error") for x in (f, lat) if "skipped" in x or "error" in x
        ]
        if failed:
            notes.append(f"{name}: {failed[0]}")
        label = name + (" (broadcast only)" if name != "tidings" else "")
        rows.append([label, *(c[1](f, lat) for c in columns)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    legend = []
    if fanout:
        legend.append(
            "deliv/s, us/deliv: closed loop, as fast as the slowest subscriber takes events "
            "(server CPU per delivery); unbatched: one event in flight, every delivery its own "
            "frame and write; at 100%/s: 1e6 / its us/deliv; B/deliv: bytes per delivery "
            "(frame and envelope); gen cpu: the generator's core, batched/unbatched"
        )
        via = fanout.get("servers", {}).get("tidings", {}).get("publish_via")
        if via:
            legend.append(f"tidings publishes with {via}")
    if latency:
        legend.append(
            f"p50..max: publish to delivery at {latency['params']['events_per_s']:g} events/s "
            f"x {latency['params']['subscribers']:,} subscribers"
        )
    legend.append(
        "baselines: broadcast only, no history, no durability, no envelope, no lag handling"
    )
    wrapped = [textwrap.fill(x, 100, initial_indent="  ", subsequent_indent="    ") for x in legend]
    return "\n".join([*lines, *notes, *wrapped])


WS_WORKLOADS = {"ws-fanout": workload_ws_fanout, "ws-latency": workload_ws_latency}


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ws-fanout / ws-latency")
    g.add_argument(
        "--servers",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(SERVERS),
        help=f"servers to run, in order (default {','.join(SERVERS)})",
    )
    g.add_argument(
        "--ws-publish",
        choices=["http", "ws"],
        default="http",
        help="tidings: publish with POST /publish (batches of --batch) or WebSocket messages",
    )
    g.add_argument(
        "--websockets-loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="the websockets baseline's event loop (tidings runs on uvloop)",
    )
    g.add_argument(
        "--ws-lowat",
        type=int,
        default=4096,
        help="ws-fanout batched phases: subscribers wake up for at least this many bytes "
        "(SO_RCVLOWAT), so the generator's reads are not what limits a server that writes "
        "every frame on its own (0: off)",
    )


def check_servers(names: Sequence[str]) -> None:
    unknown = set(names) - set(SERVERS)
    if unknown:
        raise SystemExit(f"unknown --servers {sorted(unknown)}: choose from {', '.join(SERVERS)}")
