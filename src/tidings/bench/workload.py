"""The workload, the same for every transport: idle memory, paced latency with a drop and a
resume, and closed-loop throughput on one channel and on N channels.

1. **Idle**: N subscribers on one channel connect; one warm-up event reaches them all; after
   a second idle, server RSS minus RSS before they connected, divided by N.
2. **Paced**: ``rate`` events/s for ``duration`` s, one ``POST /channels/…`` each, stamped
   with the publisher's ``time.time_ns()`` and a number. A third of the way in, 10 % of the
   subscribers are dropped (the connection cut); two thirds in they resume from their cursor
   while publishing goes on. Every subscriber must then hold every number exactly once
   (losses, duplicates). Latency is taken at receipt, on the subscribers never dropped.
   Bytes on the wire per delivery: everything the subscribers' sockets carried from their
   first handshake to here, over every event they received.
3. **Throughput**: a closed loop: publishers send batches while never more than ``window``
   events ahead of the slowest subscriber, so no queue on the way can overflow; delivered
   events/s over ``duration / 2`` s after a short warm-up, with the server's and the
   generator's CPU over the same window. First the N subscribers on one channel (10 events
   per publish), then N new subscribers on N channels (one event for each channel per round).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .driver import Driver
from .proc import busy_seconds, cpu_seconds, find_process, own_cpu_seconds, rss_kb
from .stats import Meter, Tally, latency_summary, per_delivery, rate
from .subscriber import Subscriber
from .wire import HTTPConnection, payload, publish_batch, q, request

BATCH = 10  # events per publish request, one channel
CHUNK = 100  # events per publish request, N channels
PUBLISHERS = 4  # publish connections in the closed loop
WARMUP = 0.5  # seconds of closed loop before the measured window
DROP_SHARE = 0.1
BROKERS = {"mqtt": "mosquitto", "amqp": "beam.smp"}


@dataclass
class Params:
    transport: str
    subscribers: int = 200
    rate: float = 10.0
    payload: int = 256
    duration: float = 4.0
    poll_interval: float = 1.0
    pid: int | None = None  # the hub's process, when its CPU and memory can be read

    @property
    def settle_seconds(self) -> float:
        """Idle time before memory is read (shorter for tiny smoke runs)."""
        return min(1.0, self.duration / 5)

    @property
    def warmup_seconds(self) -> float:
        return min(WARMUP, self.duration / 10)

    @property
    def throughput_seconds(self) -> float:
        seconds = self.duration / 2
        if self.transport == "poll":  # a few polls per subscriber at least
            seconds = max(seconds, 3 * self.poll_interval)
        return seconds


def plan(p: Params) -> list[tuple[str, float]]:
    """The phases and about how long each takes (for the progress bar)."""
    return [
        ("connecting", 1.0 + p.subscribers / 400),
        ("idle memory", p.settle_seconds + (p.poll_interval if p.transport == "poll" else 0.0)),
        ("paced latency, drop and resume", p.duration + 1.0),
        ("throughput, 1 channel", p.warmup_seconds + p.throughput_seconds + 0.3),
        ("throughput, N channels", 0.5 + p.warmup_seconds + p.throughput_seconds + 0.3),
    ]


@dataclass
class Progress:
    """Where the run is, read by the loadgen's ticker."""

    phases: list[tuple[str, float]]
    index: int = 0
    started: float = field(default_factory=time.monotonic)

    def enter(self, index: int) -> None:
        self.index, self.started = index, time.monotonic()

    def fraction(self) -> float:
        total = sum(s for _, s in self.phases)
        done = sum(s for _, s in self.phases[: self.index])
        current = self.phases[self.index][1] if self.index < len(self.phases) else 0.0
        done += min(current * 0.98, time.monotonic() - self.started)
        return min(1.0, done / total)

    @property
    def label(self) -> str:
        return self.phases[min(self.index, len(self.phases) - 1)][0]


class Probe:
    """CPU seconds of the hub (and of the broker, for relays) and of this process."""

    def __init__(self, pid: int | None, transport: str) -> None:
        self.pid = pid
        comm = BROKERS.get(transport)
        self.broker = find_process(comm) if comm else None

    def server_cpu(self) -> float | None:
        if self.pid is None:
            return None
        with contextlib.suppress(OSError):
            return cpu_seconds(self.pid)
        return None

    def broker_cpu(self) -> float | None:
        if self.broker is None:
            return None
        with contextlib.suppress(OSError):
            return cpu_seconds(self.broker)
        return None

    def rss(self, which: str = "server") -> int | None:
        pid = self.pid if which == "server" else self.broker
        if pid is None:
            return None
        with contextlib.suppress(OSError):
            return rss_kb(pid)
        return None


class Window:
    """Wall time, hub, broker and generator CPU over one measured span."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def __enter__(self) -> Window:
        self.t0 = time.perf_counter()
        self.own0 = own_cpu_seconds()
        self.cpu0 = self.probe.server_cpu()
        self.broker0 = self.probe.broker_cpu()
        self.busy0 = busy_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.t0
        self.own = own_cpu_seconds() - self.own0
        cpu1, broker1 = self.probe.server_cpu(), self.probe.broker_cpu()
        self.cpu = None if self.cpu0 is None or cpu1 is None else cpu1 - self.cpu0
        self.broker = None if self.broker0 is None or broker1 is None else broker1 - self.broker0
        self.busy = busy_seconds() - self.busy0

    def summary(self, deliveries: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seconds": round(self.elapsed, 3),
            "deliveries": deliveries,
            "deliveries_per_s": round(rate(deliveries, self.elapsed)),
            "generator_cpu_util": round(self.own / self.elapsed, 3),
            "server_cpu_util": None,
            "server_cpu_s_per_1000_deliveries": None,
        }
        if self.cpu is not None:
            out["server_cpu_util"] = round(self.cpu / self.elapsed, 3)
            if deliveries:
                out["server_cpu_s_per_1000_deliveries"] = round(self.cpu / deliveries * 1e3, 7)
        if self.broker is not None:
            out["broker_cpu_util"] = round(self.broker / self.elapsed, 3)
        if self.cpu is not None and self.busy:
            # Busy time on the machine that was neither the hub, the broker nor the generator:
            # kernel work for the sockets, and other processes (a high value: a noisy run).
            other = self.busy - self.cpu - self.own - (self.broker or 0.0)
            out["other_cpu_util"] = round(max(0.0, other) / self.elapsed, 3)
        return out


class Publisher:
    """Keep-alive HTTP connections that publish and check every acknowledgement (201)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.conns: list[HTTPConnection] = []

    async def open(self, n: int) -> None:
        """``n`` open connections (the hub closes one left idle past its keep-alive timeout)."""
        self.conns = [c for c in self.conns if not c.closed]
        while len(self.conns) < n:
            self.conns.append(await HTTPConnection.open(self.host, self.port))

    async def send(self, conn: HTTPConnection, raw: bytes) -> bytes:
        status, body = await asyncio.wait_for(conn.send(raw), 60)
        if status != 201:
            raise RuntimeError(f"publish answered {status}: {body[:300]!r}")
        return body

    async def one(self, channel: str, data: bytes) -> bytes:
        await self.open(1)
        raw = request("POST", f"/channels/{q(channel)}", data, self.host)
        return await self.send(self.conns[0], raw)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns = []


async def drain(subs: list[Subscriber], done: Callable[[Subscriber], bool], within: float) -> bool:
    """Wait until ``done`` holds for every subscriber (or ``within`` s); whether it did."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(done(s) for s in subs):
            return True
        await asyncio.sleep(0.02)
    return all(done(s) for s in subs)


def spread(n: int, share: float) -> list[int]:
    """``share`` of ``n`` indices, evenly spaced (at least one when n >= 2)."""
    k = min(n, max(1 if n >= 2 else 0, round(n * share)))
    return [round(i * n / k) for i in range(k)] if k else []


class Workload:
    def __init__(self, driver: Driver, params: Params, target_host: str, target_port: int):
        self.driver = driver
        self.p = params
        self.probe = Probe(params.pid, params.transport)
        self.publisher = Publisher(target_host, target_port)
        self.progress = Progress(plan(params))
        self.run_id = driver.target.run_id

    def channel(self, name: str) -> str:
        return f"bench/{self.run_id}/{name}"

    async def run(self) -> dict[str, Any]:
        p, driver = self.p, self.driver
        await driver.setup()
        try:
            one = [Subscriber(i, self.channel("one"), driver.meter) for i in range(p.subscribers)]
            result: dict[str, Any] = {"memory": await self.idle(one)}
            self.progress.enter(2)
            result["paced"] = await self.paced(one)
            self.progress.enter(3)
            rounds = [publish_batch([(one[0].channel, payload(p.payload))] * BATCH)]
            result["throughput_one_channel"] = await self.closed_loop(one, rounds, BATCH)
            await driver.release(one)
            self.progress.enter(4)
            many = [Subscriber(i, self.channel(f"n/{i}"), Meter()) for i in range(p.subscribers)]
            await driver.connect_all(many)
            events = [(s.channel, payload(p.payload)) for s in many]
            rounds = [publish_batch(events[i : i + CHUNK]) for i in range(0, len(events), CHUNK)]
            result["throughput_n_channels"] = await self.closed_loop(many, rounds, 1)
            await driver.release(many)
            self.progress.enter(5)
            return result
        finally:
            self.publisher.close()
            await driver.teardown()

    async def idle(self, subs: list[Subscriber]) -> dict[str, Any]:
        p = self.p
        before = self.probe.rss()
        broker_before = self.probe.rss("broker")
        await self.driver.connect_all(subs)
        self.progress.enter(1)
        await self.publisher.one(subs[0].channel, payload(p.payload))  # every path is warm
        await drain(subs, lambda s: s.count >= 1, 10 + p.poll_interval)
        await asyncio.sleep(p.settle_seconds)
        after = self.probe.rss()
        out: dict[str, Any] = {"subscribers": len(subs), "held_by": self.driver.held_by}
        out["rss_kb_before"], out["rss_kb_after"] = before, after
        out["kb_per_idle_subscriber"] = (
            None if before is None or after is None else round((after - before) / len(subs), 2)
        )
        broker_after = self.probe.rss("broker")
        if broker_before is not None and broker_after is not None:
            out["broker_kb_per_idle_subscriber"] = round(
                (broker_after - broker_before) / len(subs), 2
            )
        return out

    async def paced(self, subs: list[Subscriber]) -> dict[str, Any]:
        p, driver = self.p, self.driver
        total = max(3, round(p.rate * p.duration))
        dropped = [subs[i] for i in spread(len(subs), DROP_SHARE)]
        samples: list[int] = []
        acks: list[int] = []
        for s in subs:
            s.tally, s.samples = Tally(total), samples
        for s in dropped:
            s.samples = None  # a resumed subscriber's replay is not a latency
        drop_at, resume_at = total // 3, 2 * total // 3
        if driver.max_outage is not None:
            resume_at = min(resume_at, drop_at + max(1, int(driver.max_outage * p.rate)))
        resuming: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        interval = 1.0 / p.rate
        channel = subs[0].channel
        with Window(self.probe) as window:
            nxt = loop.time()
            for n in range(total):
                if n == drop_at:
                    for s in dropped:
                        driver.drop(s)
                elif n == resume_at:
                    for s in dropped:
                        s.resumes += 1
                    resuming = asyncio.create_task(driver.connect_all(dropped))
                await asyncio.sleep(max(0.0, nxt - loop.time()))
                t = time.time_ns()
                await self.publisher.one(channel, payload(p.payload, t, n))
                acks.append(time.time_ns() - t)
                nxt += interval
            if resuming is not None:
                await resuming
            complete = await drain(
                subs, lambda s: bool(s.tally and s.tally.complete), 10.0 + 2 * p.poll_interval
            )
        deliveries = sum(s.count for s in subs)
        tallies = [s.tally for s in subs if s.tally is not None]
        for s in subs:
            s.tally = s.samples = None
        lat = latency_summary(samples)
        acks.sort()
        return {
            "events": total,
            "events_per_s": p.rate,
            "latency": lat,
            "publish_ack_p50_ms": round(acks[len(acks) // 2] / 1e6, 3),
            "expected": total * len(subs),
            "received": sum(t.received for t in tallies),
            "losses": sum(t.missing for t in tallies),
            "duplicates": sum(t.duplicates for t in tallies),
            "unexpected": sum(t.unexpected for t in tallies),
            "complete": complete,
            "dropped_and_resumed": len(dropped),
            "resumes_not_recovered": sum(s.unrecovered for s in subs),
            "closed_at_end": sum(s.closed for s in subs),
            "bytes_received": driver.meter.received,
            "bytes_sent": driver.meter.sent,
            "deliveries_since_connect": deliveries,
            "bytes_per_delivery": per_delivery(driver.meter.total, deliveries),
            **{k: v for k, v in window.summary(total * len(subs)).items() if k != "deliveries"},
        }

    async def closed_loop(
        self, subs: list[Subscriber], rounds: list[bytes], per_round: int
    ) -> dict[str, Any]:
        """Publish ``rounds`` (each gives every subscriber ``per_round`` events) as fast as the
        slowest subscriber takes them, never more than the driver's window ahead."""
        p = self.p
        window_events = max(self.driver.window, per_round)
        base = {id(s): s.count for s in subs}
        sent = 0
        stop = False

        def received() -> int:
            return sum(s.count for s in subs)

        def reached(at_least: int) -> bool:
            return all(s.closed or s.count - base[id(s)] >= at_least for s in subs)

        async def slowest(at_least: int) -> None:
            for s in subs:
                if stop:  # woken to stop: no new waits (nothing would wake them)
                    return
                fut = s.reached(base[id(s)] + at_least)
                if fut is not None:
                    await fut

        async def publish(conn: HTTPConnection) -> None:
            nonlocal sent
            while not stop:
                # The slowest subscriber must hold all but ``window_events`` of what is sent;
                # once it falls that far behind, wait until it is half a window behind.
                floor = sent + per_round - window_events
                if floor > 0 and not reached(floor):
                    await slowest(min(sent, floor + window_events // 2))
                    if all(s.closed for s in subs):
                        return
                    continue
                sent += per_round
                for raw in rounds:
                    await self.publisher.send(conn, raw)

        # Fresh connections: the hub closes one that sat unused (http.header_timeout).
        self.publisher.close()
        await self.publisher.open(PUBLISHERS)
        tasks = [asyncio.create_task(publish(c)) for c in self.publisher.conns]
        try:
            await asyncio.sleep(p.warmup_seconds)
            with Window(self.probe) as window:
                d0 = received()
                await asyncio.sleep(p.throughput_seconds)
                d1 = received()
        finally:
            stop = True
            for s in subs:
                s.wake()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        await drain(
            subs, lambda s: s.closed or s.count - base[id(s)] >= sent, 10.0 + p.poll_interval
        )
        got = [s.count - base[id(s)] for s in subs]
        return {
            **window.summary(d1 - d0),
            "events_per_subscriber": sent,
            "missing": sum(max(0, sent - g) for g in got),
            "extra": sum(max(0, g - sent) for g in got),
            "closed": sum(s.closed for s in subs),
            "lagged": sum(s.lagged for s in subs),
            "window_events": window_events,
            "events_per_round": per_round * len(subs) if per_round > 1 else len(subs),
        }
