"""The webhook service: endpoints, their workers, replays and operational events.

Rules:
- One ``EndpointWorker`` per enabled endpoint, each a task owned by the service's TaskGroup and
  supervised: a worker that fails unexpectedly is logged and restarted after a pause, so one
  endpoint's trouble never stops the hub or the other endpoints.
- The log's commit listener wakes the workers whose channel patterns match a new event.
- Edits that change what a worker reads (channels, concurrency, order, enabling) restart it from
  its stored cursor; the others (URL, headers, secrets, rate, timeout) apply to the next attempt.
- Operational events go to ``_tidings/webhooks/<endpoint id>`` (a reserved channel: only
  patterns naming ``_tidings`` see them): ``webhook.endpoint_disabled``,
  ``webhook.endpoint_recovered``, ``webhook.attempt_exhausted`` and ``webhook.events_lost``.
  An event that failed on a system channel raises no ``attempt_exhausted`` of its own, so an
  endpoint that watches its own channel cannot feed itself.
- In a cluster (``leases`` given) every node serves the admin API from the shared store, and
  only the node holding the ``webhooks`` lease runs workers; another takes over, from the stored
  cursors and retries, when it dies. A node that changes an endpoint publishes
  ``webhook.endpoint_changed`` on the endpoint's channel; every node reloads that endpoint from
  the store when it sees that event (or a health event), so edits reach the delivering node.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from ..config import WebhookSettings, schedule_seconds
from ..events import SYSTEM, Cursor, Event, format_time, is_system, make_draft
from ..exceptions import BadRequest, Conflict, InvalidCursor, NotFound, Unavailable
from ..hub import Hub
from ..leases import Leases
from ..log import Log
from ..metrics import Metrics
from ..periodic import every
from ..routing import Router
from .delivery import Attempt, Endpoint, EndpointWorker, HttpSender, Retry, Secret, Sender
from .policy import Health, HealthState, Schedule
from .signing import generate_secret
from .ssrf import AddressPolicy, safe_session
from .store import Failed, Store, StoredAttempt

logger = logging.getLogger("tidings.webhooks")

RESTART_PAUSE = 5.0  # seconds before a worker that failed unexpectedly starts again
TRIM_INTERVAL = 600.0  # how often the attempt log is trimmed
REPLAYS_KEPT = 20  # finished replays shown per endpoint
LEASE = "webhooks"
# Events on an endpoint's channel after which the other nodes of a cluster reload it.
RELOAD_ON = frozenset(
    {"webhook.endpoint_changed", "webhook.endpoint_disabled", "webhook.endpoint_recovered"}
)


def channel_of(endpoint: str) -> str:
    return f"{SYSTEM}/webhooks/{endpoint}"


def restarts(before: Endpoint, after: Endpoint) -> bool:
    """Whether a change from ``before`` to ``after`` changes what a worker reads, so it must
    restart from its cursor (the other fields apply to the next attempt)."""
    return (
        after.channels != before.channels
        or after.concurrency != before.concurrency
        or after.strict_order != before.strict_order
        or after.enabled != before.enabled
    )


@dataclass(frozen=True, slots=True)
class Selection:
    """The events a replay sends: one (``event``), or a range of sequence numbers
    ``(after, until]`` and times ``[start, end)``, optionally only failed ones."""

    event: int | None = None
    after: int = 0
    until: int | None = None
    start: float | None = None
    end: float | None = None
    failed_only: bool = False


@dataclass
class Replay:
    id: str
    endpoint: str
    events: int
    rate: float
    started: float
    sent: int = 0
    delivered: int = 0
    failed: int = 0
    state: str = "running"  # running, done, stopped (endpoint disabled or deleted, shutdown)
    finished: float | None = None
    reason: str | None = None

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id, "endpoint": self.endpoint, "events": self.events, "rate": self.rate,
            "sent": self.sent, "delivered": self.delivered, "failed": self.failed,
            "state": self.state, "reason": self.reason, "started": format_time(self.started),
            "finished": None if self.finished is None else format_time(self.finished),
        }  # fmt: skip


@dataclass
class _Running:
    worker: EndpointWorker
    task: asyncio.Task[None] = field(init=False)


class Webhooks:
    """All webhook endpoints of one node: ``await webhooks.run(stopping)``; the admin API calls
    the other methods while it runs."""

    def __init__(
        self,
        hub: Hub,
        settings: WebhookSettings,
        store: Store,
        *,
        sender: Sender | None = None,
        clock: Callable[[], float] = time.time,
        leases: Leases | None = None,
    ) -> None:
        self.hub = hub
        self.settings = settings
        self.store = store
        self.policy = AddressPolicy(settings.allowed_networks, allow_http=settings.allow_http)
        self.schedule = Schedule(schedule_seconds(settings))
        self.metrics: Metrics = hub.metrics
        self.clock = clock
        self._sender = sender
        self._endpoints: dict[str, Endpoint] = {}
        self._running: dict[str, _Running] = {}
        self._replays: dict[str, list[Replay]] = {}
        self._router: Router[str] = Router()
        self._tasks: asyncio.TaskGroup | None = None
        self._replaying: set[asyncio.Task[None]] = set()
        self._leases = leases
        self._delivering = leases is None  # one node delivers always; a cluster, when leased
        self._reloading: set[str] = set()
        self._reload_lock = asyncio.Lock()
        self.ready = asyncio.Event()  # set once endpoints are loaded and the API may change them

    @property
    def log(self) -> Log:
        return self.hub.log

    # -- running -------------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Deliver to every enabled endpoint until ``stopping`` is set."""
        await self.store.open()
        try:
            async with safe_session(self.policy, self.settings.timeout) as session:
                if self._sender is None:
                    self._sender = HttpSender(session)
                async with asyncio.TaskGroup() as tasks:
                    self._tasks = tasks
                    tasks.create_task(self.store.run(stopping))
                    for endpoint in await self.store.endpoints():
                        self._add(endpoint)
                    self.log.listen(self._on_commit)
                    if self._leases is None:
                        tasks.create_task(self._trim_loop(stopping))
                    else:
                        deliver = lambda: self._deliver(stopping)  # noqa: E731
                        tasks.create_task(self._leases.run(LEASE, deliver, stopping))
                    self.ready.set()
                    await stopping.wait()
                    self._tasks = None
                    for running in self._running.values():
                        running.task.cancel()
                    for replays in self._replays.values():
                        for replay in replays:
                            self._stop_replay(replay, "the server shut down")
                    for task in self._replaying:
                        task.cancel()
        finally:
            self._tasks = None
            self._running.clear()
            await self.store.close()

    async def _deliver(self, stopping: asyncio.Event) -> None:
        """In a cluster, while this node holds the lease: run every enabled endpoint's worker
        (from the store as it is now) and trim the attempt log; stop them when cancelled."""
        try:
            self._delivering = True
            for endpoint in await self.store.endpoints():
                await self._reload(endpoint.id, endpoint)
            for endpoint in list(self._endpoints.values()):
                if endpoint.enabled and endpoint.id not in self._running:
                    self._start(endpoint)
            logger.info("this node delivers webhooks (%d endpoints)", len(self._running))
            await self._trim_loop(stopping)
        finally:
            self._delivering = False
            for id in list(self._running):
                await self._stop(id)

    def _on_commit(self, events: Sequence[Event]) -> None:
        if self._tasks is None:
            return
        woken: set[str] = set()
        for event in events:
            woken.update(self._router.match(event.channel))
            if self._leases is not None and event.type in RELOAD_ON:
                self._schedule_reload(event.channel.rpartition("/")[2])
        for id in woken:
            running = self._running.get(id)
            if running is not None:
                running.worker.wake()

    def _schedule_reload(self, id: str) -> None:
        if self._tasks is not None and id not in self._reloading:
            self._reloading.add(id)
            self._tasks.create_task(self._reload(id))

    async def _reload(self, id: str, stored: Endpoint | None = None) -> None:
        """Make this node's view of endpoint ``id`` what the store holds (another node changed
        it): add, drop, or restart its worker as ``update`` would."""
        self._reloading.discard(id)
        async with self._reload_lock:
            if stored is None:
                try:
                    stored = next((e for e in await self.store.endpoints() if e.id == id), None)
                except Exception:
                    logger.exception("webhook endpoint %s: reloading it failed", id)
                    return
            current = self._endpoints.get(id)
            if current == stored:
                return
            if current is not None:
                running = self._running.get(id)
                if stored is not None and running is not None and not restarts(current, stored):
                    self._endpoints[id] = running.worker.endpoint = stored
                    return
                await self._stop(id)
                self._forget(current)
                if stored is None and running is not None:
                    # Deleted on another node while this one delivered: whatever the worker
                    # stored since (a retry, its cursor) would outlive the endpoint.
                    await self.store.delete(id)
                    await self.log.delete_consumer(current.consumer)
                    self.metrics.forget_endpoint(id)
            if stored is not None:
                self._add(stored)

    def _add(self, endpoint: Endpoint) -> None:
        self._endpoints[endpoint.id] = endpoint
        for pattern in endpoint.patterns:
            self._router.add(pattern, endpoint.id)
        if endpoint.enabled and self._delivering:
            self._start(endpoint)

    def _forget(self, endpoint: Endpoint) -> None:
        for pattern in endpoint.patterns:
            self._router.remove(pattern, endpoint.id)
        del self._endpoints[endpoint.id]

    def _start(self, endpoint: Endpoint) -> None:
        assert self._tasks is not None
        running = _Running(self._worker(endpoint))
        running.task = self._tasks.create_task(self._supervise(running), name=endpoint.id)
        self._running[endpoint.id] = running

    def _worker(self, endpoint: Endpoint) -> EndpointWorker:
        assert self._sender is not None
        return EndpointWorker(
            endpoint,
            self.log,
            self._sender,
            self,
            schedule=self.schedule,
            disable_after=self.settings.disable_after,
            max_retrying=self.settings.max_retrying,
            clock=self.clock,
        )

    async def _supervise(self, running: _Running) -> None:
        id = running.worker.endpoint.id
        while True:
            try:
                await running.worker.run(start=0)  # a new endpoint's cursor is already stored
                return  # disabled
            except Exception:
                logger.exception("webhook endpoint %s: delivery failed; restarting", id)
                await asyncio.sleep(RESTART_PAUSE)
                running.worker = self._worker(running.worker.endpoint)

    async def _stop(self, id: str) -> None:
        running = self._running.pop(id, None)
        if running is None:
            return
        running.task.cancel()
        await asyncio.wait([running.task])
        for replay in self._replays.get(id, []):
            self._stop_replay(replay, "the endpoint was disabled, edited or deleted")

    async def _trim_loop(self, stopping: asyncio.Event) -> None:
        async for _ in every(TRIM_INTERVAL, stopping):
            try:
                await self.store.trim(
                    self.clock() - self.settings.attempt_retention, await self.log.low()
                )
            except Exception:
                logger.exception("trimming the webhook attempt log failed")

    async def refresh_metrics(self) -> None:
        """Set the lag gauges (called when metrics are scraped). A running worker knows its
        oldest undelivered event; a disabled endpoint's is the first one after its cursor."""
        now = self.clock()
        for id, endpoint in self._endpoints.items():
            running = self._running.get(id)
            if running is not None and not running.task.done():
                lag = running.worker.lag(now)
            else:
                cursor = await self.log.get_consumer(endpoint.consumer) or 0
                waiting = await self.log.read(cursor, endpoint.patterns, 1)
                lag = max(0.0, now - waiting[0].time) if waiting else 0.0
            self.metrics.webhook_lag.labels(id).set(lag)

    # -- the Reporter the workers call ---------------------------------------------------------

    async def retries(self, endpoint: str) -> list[Retry]:
        return await self.store.retries(endpoint)

    async def retrying(self, endpoint: Endpoint, retry: Retry) -> None:
        await self.store.set_retry(endpoint.id, retry)

    async def settled(
        self, endpoint: Endpoint, seq: int, attempts: int, failure: str | None
    ) -> None:
        if failure is None:
            if attempts > 1:  # it waited in the retry table
                await self.store.settle(endpoint.id, seq, None)
            return
        await self.store.settle(endpoint.id, seq, Failed(seq, self.clock(), failure))
        self.metrics.webhook_failed.labels(endpoint.id).inc()
        event = await self._event(seq)
        if event is not None and is_system(event.channel):
            return  # see the module doc: no loop through an endpoint's own channel
        await self._announce(
            endpoint,
            "webhook.attempt_exhausted",
            event=self._cursor(seq),
            attempts=attempts,
            reason=failure,
        )

    async def attempted(self, attempt: Attempt) -> None:
        await self.store.record(attempt)
        self.metrics.webhook_attempts.labels(attempt.endpoint, attempt.outcome.verdict.value).inc()
        self.metrics.webhook_seconds.labels(attempt.endpoint).observe(attempt.duration)

    async def health_changed(self, endpoint: Endpoint, before: HealthState) -> None:
        current = self._endpoints.get(endpoint.id)
        if current is None:
            return
        current = self._endpoints[endpoint.id] = replace(current, health=endpoint.health)
        await self.store.put(current)
        health = endpoint.health
        if health.health is Health.DISABLED:
            await self._announce(current, "webhook.endpoint_disabled", reason=health.reason)
        elif health.health is Health.HEALTHY and before.health is Health.FAILING:
            since = before.failing_since
            await self._announce(
                current,
                "webhook.endpoint_recovered",
                failing_since=None if since is None else format_time(since),
            )

    async def lost(self, endpoint: Endpoint, after: int, low: int) -> None:
        logger.warning(
            "webhook endpoint %s: events %d-%d were removed by retention before delivery",
            endpoint.id,
            after + 1,
            low,
        )
        await self._announce(
            endpoint,
            "webhook.events_lost",
            after=self._cursor(after),
            through=self._cursor(low),
            reason="removed from history by retention (log.max_events, log.max_age) first",
        )

    async def _announce(self, endpoint: Endpoint, type: str, **fields: Any) -> None:
        data = orjson.dumps({"endpoint": endpoint.id, "url": endpoint.url, **fields})
        draft = make_draft(channel_of(endpoint.id), data, content_type="application/json",
                           type=type)  # fmt: skip
        try:
            await self.hub.publish([draft])
        except Unavailable:  # shutting down
            logger.info("not published (shutting down): %s for endpoint %s", type, endpoint.id)
        except Exception:  # the log failed: the log says why; delivery goes on
            logger.exception("could not publish %s for endpoint %s", type, endpoint.id)

    def _cursor(self, seq: int) -> str:
        return f"{self.log.epoch}:{seq}"

    async def _event(self, seq: int) -> Event | None:
        page = await self.log.read(seq - 1, None, 1)
        return page[0] if page and page[0].seq == seq else None

    # -- the admin operations ------------------------------------------------------------------

    def _running_or_503(self) -> None:
        if self._tasks is None:
            raise Unavailable("webhooks are not running (webhooks.enabled, or shutting down)")

    def endpoints(self) -> list[Endpoint]:
        return sorted(self._endpoints.values(), key=lambda e: e.created)

    def get(self, id: str) -> Endpoint:
        endpoint = self._endpoints.get(id)
        if endpoint is None:
            raise NotFound(f"no webhook endpoint {id!r}")
        return endpoint

    async def cursor_of(self, id: str) -> int | None:
        """Where endpoint ``id`` is: its worker's cursor, else the stored one."""
        running = self._running.get(id)
        if running is not None and running.worker.loaded and not running.task.done():
            return running.worker.cursor
        return await self.log.get_consumer(self.get(id).consumer)

    async def create(self, endpoint: Endpoint) -> tuple[Endpoint, str]:
        """Register ``endpoint`` (its id, secrets and times are made here); returns it and its
        secret. It receives the events published from now on."""
        self._running_or_503()
        if len(self._endpoints) >= self.settings.max_endpoints:
            raise Conflict(
                f"there are already {len(self._endpoints)} endpoints "
                "(webhooks.max_endpoints); delete one first"
            )
        await self.policy.check_endpoint(endpoint.url)
        now = self.clock()
        secret = generate_secret()
        endpoint = replace(
            endpoint,
            id="ep_" + secrets.token_hex(8),
            secrets=(Secret(secret, now),),
            created=now,
            updated=now,
        )
        await self.log.set_consumer(endpoint.consumer, await self.log.head())
        await self.store.put(endpoint)
        self._add(endpoint)
        await self._changed(endpoint)
        return endpoint, secret

    async def update(self, id: str, changes: dict[str, Any]) -> Endpoint:
        """Apply ``changes`` (Endpoint fields, and ``enabled``)."""
        self._running_or_503()
        before = self.get(id)
        running = self._running.get(id)
        if running is not None:  # the worker's copy has the newest health
            before = replace(before, health=running.worker.endpoint.health)
        enabled = changes.pop("enabled", None)
        if "url" in changes:
            await self.policy.check_endpoint(changes["url"])
        after = replace(before, **changes, updated=self.clock())
        if enabled is True and not before.enabled:
            after = replace(after, health=HealthState())
        elif enabled is False and before.enabled:
            operator = HealthState(Health.DISABLED, None, "disabled by an operator")
            after = replace(after, health=operator)
        await self.store.put(after)
        if restarts(before, after):
            await self._stop(id)
            self._forget(before)
            self._add(after)
        else:
            self._endpoints[id] = after
            if running is not None:
                running.worker.endpoint = after
        await self._changed(after)
        return after

    async def rotate(
        self, id: str, grace: float, secret: str | None = None
    ) -> tuple[Endpoint, str]:
        """A new current secret; the old ones keep signing for ``grace`` seconds at most."""
        self._running_or_503()
        endpoint = self.get(id)
        now = self.clock()
        new = secret or generate_secret()
        older = tuple(
            replace(s, expires=min(s.expires or now + grace, now + grace))
            for s in endpoint.secrets
            if s.live(now)
        )
        kept = tuple(s for s in older if s.live(now))  # grace 0: they stop at once
        updated = await self.update(id, {"secrets": (Secret(new, now), *kept)})
        return updated, new

    async def delete(self, id: str) -> Endpoint:
        self._running_or_503()
        endpoint = self.get(id)
        await self._stop(id)
        self._forget(endpoint)
        await self.store.delete(id)
        await self.log.delete_consumer(endpoint.consumer)
        self.metrics.forget_endpoint(id)
        self._replays.pop(id, None)
        await self._changed(endpoint)
        return endpoint

    async def _changed(self, endpoint: Endpoint) -> None:
        """In a cluster, tell the other nodes to reload ``endpoint`` from the store."""
        if self._leases is not None:
            await self._announce(endpoint, "webhook.endpoint_changed")

    async def attempts(
        self, id: str, event: Cursor | None, before: int | None, limit: int
    ) -> list[StoredAttempt]:
        self.get(id)
        seq = None if event is None else self.seq_of(event)
        return await self.store.attempts(id, seq, before, limit)

    async def failed(self, id: str, after: Cursor | None, limit: int) -> list[Failed]:
        self.get(id)
        start = 0 if after is None else self.seq_of(after)
        return await self.store.failed(id, start, await self.log.head(), limit)

    def seq_of(self, cursor: Cursor) -> int:
        if cursor.epoch != self.log.epoch:
            raise InvalidCursor(
                f"cursor {cursor} is from another history (epoch {cursor.epoch!r}; this log's "
                f"is {self.log.epoch!r})"
            )
        return cursor.seq

    # -- replay --------------------------------------------------------------------------------

    async def select(self, id: str, selection: Selection) -> list[Event]:
        """The events a replay of ``selection`` would send to endpoint ``id``, in order."""
        endpoint = self.get(id)
        limit = self.settings.max_replay
        head = await self.log.head()
        until = head if selection.until is None else min(selection.until, head)

        def wanted(event: Event) -> bool:
            return (
                endpoint.wants(event)
                and (selection.start is None or event.time >= selection.start)
                and (selection.end is None or event.time < selection.end)
            )

        if selection.event is not None:
            event = await self._event(selection.event)
            if event is None:
                raise NotFound(f"event {self._cursor(selection.event)} is not in history")
            if not any(p.matches(event.channel) for p in endpoint.patterns):
                raise BadRequest(
                    f"event {event.cursor} is on {event.channel!r}, which is not one of this "
                    f"endpoint's channels ({', '.join(endpoint.channels)})"
                )
            if not endpoint.wants(event):
                raise BadRequest(
                    f"event {event.cursor} has type {event.type!r}, which is not one of this "
                    f"endpoint's types ({', '.join(endpoint.types)})"
                )
            return [event]
        chosen: list[Event] = []
        if selection.failed_only:
            for mark in await self.store.failed(id, selection.after, until, limit + 1):
                found = await self._event(mark.seq)
                if found is not None and wanted(found):
                    chosen.append(found)
        else:
            after = selection.after
            while after < until and len(chosen) <= limit:
                page = await self.log.read(after, endpoint.patterns, 1000)
                if not page:
                    break
                for event in page:
                    if event.seq > until:
                        break
                    if wanted(event):
                        chosen.append(event)
                after = page[-1].seq
        if len(chosen) > limit:
            raise BadRequest(
                f"the selection holds more than {limit} events (webhooks.max_replay); "
                "narrow it with since/until or from/to"
            )
        return chosen

    async def replay(self, id: str, selection: Selection, rate: float | None) -> Replay:
        """Send the selected events again, one attempt each, at ``rate`` events/s."""
        self._running_or_503()
        endpoint = self.get(id)
        running = self._running.get(id)
        if not self._delivering:
            raise Unavailable(
                "replays run on the node that delivers webhooks, and this node does not "
                "(another holds the lease); send the request to another node"
            )
        if running is None or not endpoint.enabled:
            raise Conflict(f"webhook endpoint {id} is disabled; enable it before a replay")
        events = await self.select(id, selection)
        pace = float(rate or self.settings.replay_rate)
        replay = Replay("rp_" + secrets.token_hex(6), id, len(events), pace, self.clock())
        kept = self._replays.setdefault(id, [])
        kept.append(replay)
        del kept[:-REPLAYS_KEPT]
        assert self._tasks is not None
        task = self._tasks.create_task(self._replay(running.worker, replay, events))
        self._replaying.add(task)
        task.add_done_callback(self._replaying.discard)
        return replay

    def replays(self, id: str) -> list[Replay]:
        self.get(id)
        return list(self._replays.get(id, []))

    async def _replay(self, worker: EndpointWorker, replay: Replay, events: list[Event]) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        for event in events:
            if replay.state != "running":
                return
            if worker.disabled:
                return self._stop_replay(replay, "the endpoint was disabled")
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = max(next_at, loop.time() - 1) + 1 / replay.rate
            try:
                outcome = await worker.attempt(event, 0, "replay")
            except Exception:
                logger.exception("replay %s: attempt failed", replay.id)
                return self._stop_replay(replay, "an internal error; see the server log")
            replay.sent += 1
            if outcome.verdict.value == "delivered":
                replay.delivered += 1
                await self.store.settle(replay.endpoint, event.seq, None)  # no longer failed
            else:
                replay.failed += 1
        replay.state = "done"
        replay.finished = self.clock()

    def _stop_replay(self, replay: Replay, reason: str) -> None:
        if replay.state == "running":
            replay.state, replay.reason, replay.finished = "stopped", reason, self.clock()
