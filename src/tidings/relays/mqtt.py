"""The MQTT relay (aiomqtt over paho-mqtt): every event out to ``{prefix}/{channel}`` on a real
broker, and what devices publish under ``{inbound_prefix}/`` in as events (docs/relays.md).

Rules:
- One client connection carries both directions. MQTT 5's No Local subscription option
  (§3.8.3.1) only holds back what *this connection* published, so with one connection the
  broker itself never echoes our own outbound messages to our inbound subscription, however
  the prefixes overlap. One connection is also one client id and one session, and the two
  directions have separate flow control anyway (each side's Receive Maximum, §4.9). The
  connection's life is the OutboundRelay's: it connects, reconnects with backoff and jitter
  and resends from its cursor; a lost connection ends both directions, and both come back
  together. With no outbound patterns the same loop runs here, for the inbound side alone.
- Outbound: payload = the event's data as is; QoS ``mqtt.qos`` (1: ``send`` returns only when
  every PUBACK is in, so the cursor moves only over what the broker accepted). The messages of
  a batch are pipelined: one loop issues them in log order, keeping at most the broker's
  Receive Maximum unacknowledged (§3.3.4), and a broker forwards one client's QoS 1 messages
  on a topic in the order it received them (§4.6). Resent events after a reconnect carry the
  same cursor (at-least-once). Channels matching ``mqtt.retain`` are published retained.
- MQTT 5 properties of an outbound message: user properties ``tidings-cursor`` (the cursor)
  and ``tidings-type``, Content Type = the event's content type, Payload Format Indicator 1
  for JSON and text; no Message Expiry. MQTT 3.1.1 has no properties: the topic and payload
  are all there is.
- Inbound (``mqtt.inbound_prefix`` set): ``{inbound_prefix}/#`` at ``mqtt.inbound_qos``; topic
  ``{inbound_prefix}/a/b`` publishes to channel ``a/b`` under the relay's grant
  (``mqtt.inbound_publish``). MQTT 5 properties give the type (user property ``tidings-type``
  or ``type``), the content type (Content Type) and an idempotency key (user property
  ``idempotency-key``); without them the content type is sniffed as for HTTP.
- A QoS 1 inbound message is acknowledged only after its publish is durable in the log
  (paho's manual acks), and PUBACKs go out in the order the messages came (§4.6). Messages are
  published concurrently (the log commits them in one group, in arrival order). So inbound is
  at-least-once while the session lives: a message whose PUBACK was lost with the connection
  is sent again by the broker and logged again, unless it carries an ``idempotency-key``.
  At shutdown, in-flight messages (and an outbound batch waiting for PUBACKs) get
  ``STOP_GRACE``; whatever is still unsettled then is sent again next time, not lost.
- Session: with ``mqtt.client_id`` set (stable), the relay connects with Clean Start 0 and a
  Session Expiry of ``SESSION_EXPIRY`` (MQTT 3.1.1: clean session 0), so while tidings is away
  (restart, outage) the broker keeps its subscription and queues the QoS 1 messages for it, up
  to the broker's own limits (Mosquitto: ``max_queued_messages``, 1000 by default), and
  delivers them on return. Without one, the id is ``tidings-<random hex>``, new each process:
  the session starts clean, survives reconnects within the process (``RANDOM_SESSION_EXPIRY``),
  and messages published while the process is not running are not received. MQTT 3.1.1 cannot
  expire a session, so there a random id always starts clean (at-most-once across reconnects).
  With inbound off the session is always clean: there is nothing to keep.
- Not re-ingested: messages carrying ``CURSOR_PROPERTY`` (relayed by a tidings relay; skipped,
  counted as dropped with reason ``relayed``) and retained messages (the broker's stored copy,
  sent again at each subscribe; MQTT 5 subscriptions ask for none, §3.8.3.1 Retain Handling
  2). MQTT 3.1.1 has no properties, so loops are prevented by the topics alone: a
  ``prefix`` whose topics ``{inbound_prefix}/#`` covers (or the reverse) is refused at
  construction.
- A message that can never be published (bad channel, type, content type, JSON or UTF-8,
  too large, not granted) is acknowledged and dropped: ``Ingest.dropped`` counts it by reason
  (``relays.REASONS``) and logs why. Broker-side, MQTT 5 messages over ``max_event_bytes`` +
  ``PACKET_HEADROOM`` are discarded by the broker before they reach us (Maximum Packet Size,
  §3.1.2.11.4), so only the broker's statistics see those.
- aiomqtt 2.5 exposes neither paho's manual acks nor CONNACK properties (empicano/aiomqtt#345):
  both are reached through the paho client underneath (``_paho``), in this module only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..backoff import Backoff
from ..config import MQTTSettings
from ..events import Event, Pattern, is_json_type, is_text_type, matches_any, parse_patterns
from ..exceptions import (
    ConfigError,
    InvalidChannel,
    InvalidPattern,
    TidingsError,
    Unavailable,
)
from ..hub import Hub
from . import CURSOR_PROPERTY, Ingest, OutboundRelay, refusal_reason, sleep_unless
from .mqttcodec import property_block, utf8

logger = logging.getLogger("tidings.relays.mqtt")

TYPE_PROPERTY = "tidings-type"  # outbound; inbound also accepts "type"
IDEMPOTENCY_PROPERTY = "idempotency-key"
DEFAULT_WINDOW = 20  # unacknowledged outbound QoS 1 messages when the broker names no limit
MAX_WINDOW = 64  # …and at most this many: aiomqtt's bookkeeping costs O(window) a publish
INBOUND_WINDOW = 64  # our Receive Maximum: inbound messages in flight before we ack
CONFIRM_TIMEOUT = 60.0  # a batch whose PUBACKs take longer ends the connection
SESSION_EXPIRY = 24 * 3600  # seconds the broker keeps a stable client id's session
RANDOM_SESSION_EXPIRY = 300  # …and a random id's (it only has to bridge reconnects)
PACKET_HEADROOM = 64 * 1024  # topic and properties beyond max_event_bytes in a packet we take
STOP_GRACE = 5.0  # seconds at shutdown for a batch's PUBACKs and in-flight inbound messages

# -- the pure part: URLs, topics and properties ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Broker:
    """Where ``mqtt.url`` points."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @property
    def where(self) -> str:
        """For logs and errors: never the credentials."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_url(url: str) -> Broker:
    """``mqtt://[user[:password]@]host[:port]`` (1883) or ``mqtts://…`` (8883)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"mqtt.url must start with mqtt:// or mqtts://, not {url[:40]!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError("mqtt.url has an invalid port") from None
    if not parts.hostname:
        raise ConfigError("mqtt.url names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError("mqtt.url takes no path, query or fragment: mqtt://host:port")
    tls = parts.scheme == "mqtts"
    return Broker(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def check_prefix(key: str, prefix: str) -> str:
    """A topic prefix: no wildcards (§4.7.1), no ``$`` topics (§4.7.2), no trailing ``/``."""
    if any(c in prefix for c in "+#\x00") or prefix.startswith("$") or prefix.endswith("/"):
        raise ConfigError(
            f"{key} {prefix!r} is not a usable topic prefix: no '+', '#' or NUL, "
            "no leading '$', no trailing '/'"
        )
    return prefix


def topic_of(prefix: str, channel: str) -> str:
    return f"{prefix}/{channel}" if prefix else channel


def channel_of(prefix: str, topic: str) -> str:
    """The channel an inbound topic publishes to (validated later, by the publish)."""
    head = prefix + "/"
    if not topic.startswith(head) or topic == head:
        raise InvalidChannel(f"topic {topic[:300]!r} names no channel under {head!r}")
    return topic[len(head) :]


def overlaps(prefix: str, inbound_prefix: str) -> bool:
    """Whether ``{inbound_prefix}/#`` can match a topic ``{prefix}/{channel}``."""
    if not prefix:
        return True
    mine, theirs = prefix + "/", inbound_prefix + "/"
    return mine.startswith(theirs) or theirs.startswith(mine)


def publish_properties(event: Event) -> bytes:
    """The MQTT 5 PUBLISH properties of a relayed event, encoded (§2.2.2, §3.3.2.3)."""
    body = bytearray()
    if is_json_type(event.content_type) or is_text_type(event.content_type):
        body += b"\x01\x01"  # Payload Format Indicator: UTF-8 (make_draft checked it is)
    body += b"\x03" + utf8(event.content_type)  # Content Type
    body += b"\x26" + utf8(CURSOR_PROPERTY) + utf8(event.cursor)  # User Property
    body += b"\x26" + utf8(TYPE_PROPERTY) + utf8(event.type)
    return property_block(bytes(body))


class EncodedProperties(Properties):
    """PUBLISH properties encoded by ``publish_properties``: paho only calls ``pack()`` (and
    ``str()`` in debug logs). Not ``Properties.__init__``: building and packing paho's own
    costs some 40 µs an event, most of the relay's time."""

    packed: bytes

    def __init__(self, packed: bytes) -> None:
        object.__setattr__(self, "packed", packed)  # past Properties.__setattr__'s name check

    def pack(self) -> bytes:
        return self.packed

    def __str__(self) -> str:
        return f"<{len(self.pack())} bytes of properties>"

    __repr__ = __str__


@dataclass(frozen=True, slots=True)
class Inbound:
    """What an inbound message's MQTT 5 properties say (all None under MQTT 3.1.1)."""

    content_type: str | None = None
    type: str | None = None
    idempotency_key: str | None = None
    cursor: str | None = None  # CURSOR_PROPERTY: a message a tidings relay sent


def read_properties(properties: Properties | None) -> Inbound:
    if properties is None:
        return Inbound()
    users: dict[str, str] = {}
    for key, value in getattr(properties, "UserProperty", None) or ():
        users.setdefault(key, value)  # the first of repeated keys (§3.3.2.3.7 allows repeats)
    return Inbound(
        content_type=getattr(properties, "ContentType", None),
        type=users.get(TYPE_PROPERTY, users.get("type")),
        idempotency_key=users.get(IDEMPOTENCY_PROPERTY),
        cursor=users.get(CURSOR_PROPERTY),
    )


def reason_of(exc: TidingsError) -> str:
    """The drop reason (the metric label) for a refusal; "invalid" for any other."""
    return refusal_reason(exc) or "invalid"


def _leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real error of a TaskGroup's group, for a readable ``status()["error"]``."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _deadline(task: asyncio.Task[None], stopping: asyncio.Event, grace: float) -> None:
    """Cancel ``task`` if it still runs ``grace`` seconds after ``stopping``: a batch waiting
    for PUBACKs and in-flight inbound messages get that long, then the connection is dropped
    (unconfirmed events go out again next time, unacknowledged messages come in again)."""
    await stopping.wait()
    _, running = await asyncio.wait((task,), timeout=grace)
    if running:
        task.cancel()


def _paho(client: aiomqtt.Client) -> paho.Client:
    """The paho client under aiomqtt: manual acks and CONNACK properties (aiomqtt#345)."""
    inner: paho.Client = client._client
    return inner


# -- the relay --------------------------------------------------------------------------------


class MQTTRelay:
    """Relays events to and from an MQTT broker as ``[mqtt]`` configures (docs/relays.md)."""

    name = "mqtt"

    def __init__(self, hub: Hub, settings: MQTTSettings, max_event_bytes: int) -> None:
        self.hub = hub
        self.settings = settings
        self.broker = parse_url(settings.url)
        self.v5 = settings.protocol == "5"
        for key in ("qos", "inbound_qos"):
            if getattr(settings, key) not in (0, 1):
                raise ConfigError(f"mqtt.{key} must be 0 or 1 (QoS 2 is not supported)")
        self.prefix = check_prefix("mqtt.prefix", settings.prefix)
        self.inbound_prefix = check_prefix("mqtt.inbound_prefix", settings.inbound_prefix)
        try:
            patterns = parse_patterns(settings.channels) if settings.channels else ()
            self.retain: tuple[Pattern, ...] = (
                parse_patterns(settings.retain) if settings.retain else ()
            )
            self.ingest = Ingest(hub, self.name, settings.inbound_publish, max_event_bytes)
        except InvalidPattern as exc:
            raise ConfigError(f"[mqtt]: {exc.detail}") from None
        if (not self.v5 and patterns and self.inbound_prefix
                and overlaps(self.prefix, self.inbound_prefix)):  # fmt: skip
            raise ConfigError(
                f"mqtt.prefix {self.prefix!r} and mqtt.inbound_prefix {self.inbound_prefix!r} "
                "overlap: under MQTT 3.1.1 messages carry no properties, so the relay could "
                "not tell its own messages from devices' and would loop them. Use separate "
                "topic trees, or mqtt.protocol = '5'"
            )
        if not patterns and not self.inbound_prefix:
            raise ConfigError("[mqtt] relays nothing: set mqtt.channels (outbound) or "
                              "mqtt.inbound_prefix (inbound), or leave mqtt.url empty")  # fmt: skip
        if settings.tls_ca_file and not self.broker.tls:
            raise ConfigError("mqtt.tls_ca_file is set but mqtt.url is not mqtts:// (no TLS)")
        self.tls: ssl.SSLContext | None = None
        if self.broker.tls:
            try:
                self.tls = ssl.create_default_context(cafile=settings.tls_ca_file or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"mqtt.tls_ca_file: cannot load {settings.tls_ca_file!r}: "
                                  f"{exc}") from None  # fmt: skip
        self.stable_id = bool(settings.client_id)
        self.client_id = settings.client_id or f"tidings-{secrets.token_hex(6)}"
        self.keepalive = min(65535, max(1, round(settings.keepalive)))
        self.max_packet = max_event_bytes + PACKET_HEADROOM
        self.outbound: OutboundRelay | None = None
        if patterns:
            self.outbound = OutboundRelay(self.name, hub.log, self._connect, patterns,
                                          hub.metrics)  # fmt: skip
            hub.log.listen(self.outbound.listen)
        self._resume = self.stable_id  # a random id's first connection starts clean
        self._connected = False  # the inbound-only loop's state (else the OutboundRelay's)
        self._error: str | None = None

    # -- running --------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tasks:
            if self.outbound is not None:  # its connection carries the inbound side too
                relaying = tasks.create_task(self.outbound.run(stopping))
            else:
                relaying = tasks.create_task(self._run_inbound(stopping))
            tasks.create_task(_deadline(relaying, stopping, STOP_GRACE))

    async def status(self) -> dict[str, object]:
        out = self.outbound
        if out is None:
            return {"connected": self._connected, "cursor": None, "lag": 0.0,
                    "error": self._error}  # fmt: skip
        return {"connected": out.connected, "cursor": f"{self.hub.log.epoch}:{out.cursor}",
                "lag": await out.lag(), "error": out.error}  # fmt: skip

    async def _run_inbound(self, stopping: asyncio.Event) -> None:
        """The connection loop when nothing goes out (the OutboundRelay's, otherwise)."""
        backoff = Backoff(initial=0.2, cap=30.0)
        gauge = self.hub.metrics.relay_connected.labels(self.name)
        while not stopping.is_set():
            try:
                async with self._connect():
                    self._connected, self._error = True, None
                    gauge.set(1)
                    logger.info("relay mqtt: connected to %s (inbound only)", self.broker.where)
                    backoff.reset()
                    await stopping.wait()
            except Exception as exc:  # paho and aiomqtt raise their own kinds: all mean retry
                self._error = f"{type(exc).__name__}: {exc}"[:300]
                logger.warning("relay mqtt: %s; reconnecting", self._error)
            finally:
                self._connected = False
                gauge.set(0)
            if not stopping.is_set():
                await sleep_unless(stopping, backoff.next())

    # -- one connection ----------------------------------------------------------------------

    def _client(self, window: list[int], packet: list[int | None]) -> aiomqtt.Client:
        inbound = bool(self.inbound_prefix)
        expiry = SESSION_EXPIRY if self.stable_id else RANDOM_SESSION_EXPIRY
        options: dict[str, Any] = {}
        if self.v5:
            connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect.ReceiveMaximum = INBOUND_WINDOW
            connect.MaximumPacketSize = self.max_packet
            if inbound:
                connect.SessionExpiryInterval = expiry
            options.update(protocol=aiomqtt.ProtocolVersion.V5, properties=connect,
                           clean_start=not (inbound and self._resume))  # fmt: skip
        else:
            options.update(protocol=aiomqtt.ProtocolVersion.V311,
                           clean_session=not (inbound and self.stable_id))  # fmt: skip
        client = aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            username=self.broker.username,
            password=self.broker.password,
            identifier=self.client_id,
            keepalive=self.keepalive,
            tls_context=self.tls,
            max_inflight_messages=0,  # the Link keeps the window; paho's queue scans per ack
            # No TCP_NODELAY here: against Mosquitto's default (Nagle on its side) it raised the
            # p99 of relay latency from ~5 to ~45 ms (benchmarks/mqttbench.py), and gained no
            # throughput against a broker with set_tcp_nodelay.
            **options,
        )
        client.pending_calls_threshold = MAX_WINDOW + INBOUND_WINDOW  # no warning per publish
        inner = _paho(client)
        inner.manual_ack_set(True)  # before connecting: a resumed session redelivers at once
        on_connect: Any = inner.on_connect  # aiomqtt's, typed by paho as either API version

        def connected(c: paho.Client, userdata: Any, flags: Any, reason: Any,
                      properties: Properties | None = None) -> None:  # fmt: skip
            limit = getattr(properties, "ReceiveMaximum", None) if self.v5 else None
            window[0] = min(MAX_WINDOW, limit or DEFAULT_WINDOW)
            packet[0] = getattr(properties, "MaximumPacketSize", None) if self.v5 else None
            if on_connect is not None:
                on_connect(c, userdata, flags, reason, properties)

        inner.on_connect = connected
        return client

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[MQTTLink]:
        """One broker connection: subscribed inbound, watched for loss, yielding the Link.

        A lost connection is noticed by the inbound reader (even with inbound off: aiomqtt's
        message iterator ends on disconnect), which fails the TaskGroup; that cancels whatever
        the relay is doing inside this context, and the connection's error comes out of it."""
        window: list[int] = [DEFAULT_WINDOW]
        packet: list[int | None] = [None]  # the broker's Maximum Packet Size (CONNACK), if any
        client = self._client(window, packet)
        async with client:
            self._resume = True  # the session exists now: reconnects resume it
            try:
                async with asyncio.TaskGroup() as tasks:
                    if self.inbound_prefix:
                        await self._subscribe(client)
                    inbound = _Receiver(self, client)
                    reader = tasks.create_task(inbound.run())
                    yield MQTTLink(self, client, window[0], packet[0])
                    await inbound.settle(within=STOP_GRACE)
                    reader.cancel()
            except BaseExceptionGroup as group:
                raise _leaf(group) from None

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        topic = f"{self.inbound_prefix}/#"
        qos = self.settings.inbound_qos
        if self.v5:
            options = SubscribeOptions(qos=qos, noLocal=True, retainHandling=2)
            granted = await client.subscribe(topic, options=options)
        else:
            granted = await client.subscribe(topic, qos)
        code = granted[0]
        value = code if isinstance(code, int) else code.value
        if value >= 0x80:  # §3.9.3 SUBACK: a failure code instead of the granted QoS
            raise ConnectionRefusedError(f"the broker refused the subscription to {topic!r} "
                                         f"({code})")  # fmt: skip

    # -- messages ------------------------------------------------------------------------------

    def properties(self, event: Event) -> Properties | None:
        return EncodedProperties(publish_properties(event)) if self.v5 else None

    def retained(self, channel: str) -> bool:
        return bool(self.retain) and matches_any(self.retain, channel)

    async def ingest_message(self, message: aiomqtt.Message) -> bool:
        """Publish one inbound message; True when it is settled (logged, dropped or skipped:
        acknowledge it), False when the hub is shutting down (leave it to be sent again)."""
        if message.retain:
            logger.debug("relay mqtt: skipped the retained message on %s", message.topic)
            return True
        if not self.inbound_prefix:
            return True  # a message of an old session's subscription
        fields = read_properties(message.properties)
        if fields.cursor is not None:
            self.ingest.skipped(f"topic {message.topic}, {CURSOR_PROPERTY} {fields.cursor}")
            return True
        try:
            channel = channel_of(self.inbound_prefix, message.topic.value)
            await self.ingest.publish(channel, message.payload, content_type=fields.content_type,
                                      type=fields.type,
                                      idempotency_key=fields.idempotency_key)  # fmt: skip
        except Unavailable:
            return False
        except TidingsError as exc:
            self.ingest.dropped(reason_of(exc), f"topic {message.topic}: {exc.detail}")
        return True


class MQTTLink:
    """Publishes batches of events on one connection (a ``relays.Link``)."""

    def __init__(
        self, relay: MQTTRelay, client: aiomqtt.Client, window: int, max_packet: int | None
    ) -> None:
        self.relay = relay
        self.client = client
        self.window = window
        self.max_packet = max_packet

    def fits(self, event: Event) -> bool:
        """Whether the broker takes ``event``'s PUBLISH (MQTT 5 §3.2.2.3.6: a larger packet is a
        protocol error, the broker would disconnect and the relay retry it forever). One it
        cannot take is skipped, counted and logged: a loss said plainly, not a stuck relay."""
        if self.max_packet is None:
            return True
        topic = topic_of(self.relay.prefix, event.channel).encode()
        properties = len(publish_properties(event)) if self.relay.v5 else 0
        body = 2 + len(topic) + (2 if self.relay.settings.qos else 0) + properties
        size = 1 + 4 + body + len(event.data)  # fixed header with the longest length field
        if size <= self.max_packet:
            return True
        self.relay.hub.metrics.relay_refused.labels(self.relay.name, "too_large").inc()
        logger.error(
            "relay mqtt: event %s not relayed: its PUBLISH is %d bytes, over the broker's "
            "Maximum Packet Size of %d", event.cursor, size, self.max_packet,
        )  # fmt: skip
        return False

    async def send(self, events: Sequence[Event]) -> None:
        relay, client, qos = self.relay, self.client, self.relay.settings.qos
        slots = asyncio.Semaphore(self.window)
        confirmed = 0
        events = [event for event in events if self.fits(event)]

        async def publish(event: Event) -> None:
            nonlocal confirmed
            try:
                await client.publish(topic_of(relay.prefix, event.channel), event.data, qos,
                                     relay.retained(event.channel), relay.properties(event),
                                     timeout=math.inf)  # fmt: skip
                confirmed += 1
            finally:
                slots.release()

        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT), asyncio.TaskGroup() as tasks:
                for event in events:
                    await slots.acquire()  # one loop issues them: they go out in log order
                    tasks.create_task(publish(event))
        except TimeoutError:
            raise TimeoutError(f"the broker confirmed {confirmed} of {len(events)} messages "
                               f"in {CONFIRM_TIMEOUT:.0f} s") from None  # fmt: skip
        except BaseExceptionGroup as group:
            raise _leaf(group) from None


class _Receiver:
    """One connection's inbound side: each message published as it comes (concurrently, in
    arrival order), acknowledged in that order once settled (MQTT 5 §4.6)."""

    def __init__(self, relay: MQTTRelay, client: aiomqtt.Client) -> None:
        self.relay = relay
        self.client = client
        self.pending: asyncio.Queue[tuple[aiomqtt.Message, asyncio.Task[bool]]] = asyncio.Queue(
            INBOUND_WINDOW
        )

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._acknowledge())
            try:
                async for message in self.client.messages:
                    # Tasks start in creation order and each reaches the log's queue before
                    # it first waits, so the log keeps the arrival order.
                    task = tasks.create_task(self.relay.ingest_message(message))
                    await self.pending.put((message, task))
            except aiomqtt.MqttError as exc:
                cause = exc.__cause__ or exc
                raise ConnectionError(f"lost the connection to {self.relay.broker.where}: "
                                      f"{cause}") from None  # fmt: skip

    async def settle(self, within: float) -> None:
        """Wait (up to ``within`` seconds) until the messages in flight are settled."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self.pending.join()

    async def _acknowledge(self) -> None:
        inner = _paho(self.client)
        acking = True  # after a message left unacknowledged, ack none: PUBACKs stay in order
        while True:
            message, task = await self.pending.get()
            try:
                settled = await task
                acking = acking and settled
                if acking and message.qos > 0:
                    inner.ack(message.mid, message.qos)
            finally:
                self.pending.task_done()
