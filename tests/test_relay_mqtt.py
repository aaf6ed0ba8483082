"""The MQTT relay against the real Mosquitto on 127.0.0.1:1883, with real clients: Debian's
``mosquitto_sub``/``mosquitto_pub`` and aiomqtt.

Every test owns unique topic prefixes, so tests never see each other's messages on the shared
broker. Without the broker the broker tests skip with the reason, and fail under ``CI=true``
(tests/brokers.py); so do the tests that need the Mosquitto command-line tools or the broker
binary. Faults come from a test-owned TCP proxy between tidings and Mosquitto, and from a
private Mosquitto on a free port that the test stops and starts; the shared broker is never
touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import brokers
from brokers import (
    DEADLINE,
    TCPProxy,
    counter,
    history,
    history_until,
    publish,
    require_service,
    service_listening,
    until,
    until_serving,
)
from conftest import RunningServer, make_settings
from serving import Serve, free_port
from streaming import SSEClient, envelope
from tidings.brokers.memory import MemoryBroker
from tidings.config import MQTTSettings
from tidings.events import Cursor, Event
from tidings.exceptions import (
    ConfigError,
    Forbidden,
    InvalidChannel,
    InvalidEvent,
    PayloadTooLarge,
    Unavailable,
)
from tidings.hub import Hub
from tidings.log.memory import MemoryLog
from tidings.relays import CURSOR_PROPERTY
from tidings.relays.mqtt import (
    STOP_GRACE,
    EncodedProperties,
    MQTTRelay,
    channel_of,
    overlaps,
    parse_url,
    publish_properties,
    read_properties,
    reason_of,
    topic_of,
)

HOST, PORT = "127.0.0.1", 1883
BROKER = f"mqtt://{HOST}:{PORT}"
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
)
MOSQUITTO_SUB = shutil.which("mosquitto_sub")
MOSQUITTO_PUB = shutil.which("mosquitto_pub")


def require_tool(path: str | None, name: str, package: str) -> str:
    if path is not None:
        return path
    reason = f"{name} is not installed (Debian: apt-get install {package})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the MQTT tests with it", pytrace=False)
    pytest.skip(reason)


# -- the pure part (no broker) -----------------------------------------------------------------


def event(**overrides: Any) -> Event:
    fields: dict[str, Any] = {"epoch": "e1", "seq": 7, "channel": "orders/42",
                              "type": "order.paid", "data": b'{"a":1}',
                              "content_type": "application/json", "time": 1.7e9}  # fmt: skip
    fields.update(overrides)
    return Event(**fields)


def test_publish_properties_are_what_paho_encodes_for_cursor_type_and_content_type() -> None:
    for e in (event(), event(content_type="text/plain; charset=utf-8", type="t" * 128)):
        expected = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        expected.PayloadFormatIndicator = 1
        expected.ContentType = e.content_type
        expected.UserProperty = [(CURSOR_PROPERTY, e.cursor), ("tidings-type", e.type)]
        assert publish_properties(e) == expected.pack()  # type: ignore[no-untyped-call]


def test_binary_events_carry_no_payload_format_indicator() -> None:
    encoded = publish_properties(event(data=b"\xff", content_type="application/octet-stream"))
    decoded = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    decoded.unpack(encoded)  # type: ignore[no-untyped-call]
    assert not hasattr(decoded, "PayloadFormatIndicator")
    assert decoded.ContentType == "application/octet-stream"
    assert decoded.UserProperty == [(CURSOR_PROPERTY, "e1:7"), ("tidings-type", "order.paid")]
    assert not hasattr(decoded, "MessageExpiryInterval")
    assert EncodedProperties(encoded).pack() == encoded
    assert "bytes of properties" in str(EncodedProperties(encoded))


def test_inbound_properties_give_type_content_type_key_and_the_relayed_cursor() -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = "application/json"
    props.UserProperty = [("type", "reading"), ("idempotency-key", "k1"), ("type", "later")]
    assert read_properties(props).type == "reading"
    assert read_properties(props).content_type == "application/json"
    assert read_properties(props).idempotency_key == "k1"
    assert read_properties(props).cursor is None
    props.UserProperty = [("tidings-type", "first"), ("type", "second"), (CURSOR_PROPERTY, "e:1")]
    fields = read_properties(props)
    assert (fields.type, fields.cursor) == ("first", "e:1")
    assert read_properties(None) == read_properties(Properties(PacketTypes.PUBLISH))  # type: ignore[no-untyped-call]


def test_topics_map_to_channels_under_the_prefixes() -> None:
    assert topic_of("tidings", "a/b") == "tidings/a/b"
    assert topic_of("", "a/b") == "a/b"
    assert channel_of("in", "in/a/b") == "a/b"
    assert channel_of("site/in", "site/in/x") == "x"
    for topic in ("in", "in/", "other/a", "inx/a"):
        with pytest.raises(InvalidChannel):
            channel_of("in", topic)


def test_prefixes_overlap_when_one_topic_tree_contains_the_other() -> None:
    assert overlaps("t", "t")
    assert overlaps("t", "t/in")
    assert overlaps("t/out", "t")
    assert overlaps("", "in")
    assert not overlaps("t", "tin")
    assert not overlaps("out", "in")
    assert not overlaps("site/out", "site/in")


def test_broker_urls_give_host_port_credentials_and_tls() -> None:
    plain = parse_url("mqtt://dev%40ice:p%3Ass@broker.example")
    assert (plain.host, plain.port, plain.tls) == ("broker.example", 1883, False)
    assert (plain.username, plain.password) == ("dev@ice", "p:ss")
    assert "p:ss" not in plain.where
    secure = parse_url("mqtts://broker.example/")
    assert (secure.port, secure.tls, secure.username) == (8883, True, None)
    assert parse_url("mqtt://[::1]:1884").host == "::1"
    for bad in ("http://x", "mqtt://", "mqtt://x:99999", "mqtt://x/path", "mqtt://x?a=1"):
        with pytest.raises(ConfigError):
            parse_url(bad)


def test_refusals_map_to_drop_reasons() -> None:
    assert reason_of(PayloadTooLarge("x")) == "too_large"
    assert reason_of(InvalidChannel("x")) == "invalid_channel"
    assert reason_of(InvalidEvent("x")) == "invalid_event"
    assert reason_of(Forbidden("x")) == "forbidden"
    assert reason_of(Unavailable("x")) == "invalid"  # never asked: Unavailable is not a drop


def relay(**overrides: Any) -> MQTTRelay:
    settings = dataclasses.replace(MQTTSettings(url=BROKER), **overrides)
    return MQTTRelay(Hub(MemoryLog(), MemoryBroker()), settings, 1024)


def test_mqtt_3_refuses_overlapping_prefixes_and_mqtt_5_takes_them() -> None:
    with pytest.raises(ConfigError, match="overlap"):
        relay(protocol="3.1.1", prefix="t", inbound_prefix="t")
    with pytest.raises(ConfigError, match="overlap"):
        relay(protocol="3.1.1", prefix="t", inbound_prefix="t/in")
    relay(protocol="3.1.1", prefix="t/out", inbound_prefix="t/in")
    relay(protocol="3.1.1", prefix="t", inbound_prefix="")  # no inbound: nothing to loop
    relay(protocol="3.1.1", prefix="t", inbound_prefix="t", channels=())  # no outbound
    relay(protocol="5", prefix="t", inbound_prefix="t")


def test_bad_settings_are_config_errors() -> None:
    for overrides in ({"prefix": "a/#"}, {"inbound_prefix": "+/x"}, {"prefix": "$SYS"},
                      {"prefix": "t/"}, {"qos": 2}, {"inbound_qos": 2},
                      {"channels": ("a/**/b",)}, {"retain": ("*x",)},
                      {"inbound_publish": ("",)}, {"tls_ca_file": "/etc/hostname"},
                      {"url": "mqtts://h", "tls_ca_file": "/nonexistent.pem"},
                      {"channels": (), "inbound_prefix": ""}):  # fmt: skip
        with pytest.raises(ConfigError):
            relay(**overrides)


def test_a_random_client_id_is_made_unless_one_is_configured() -> None:
    a, b = relay(), relay()
    assert a.client_id.startswith("tidings-") and a.client_id != b.client_id
    assert relay(client_id="plant-7").client_id == "plant-7"


# -- fixtures against the broker ---------------------------------------------------------------


@pytest.fixture
def mosquitto() -> None:
    require_service(HOST, PORT, "Mosquitto")


def unique(name: str) -> str:
    return f"t{secrets.token_hex(4)}/{name}"


@pytest.fixture
def servers(mosquitto: None, tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start tidings nodes with the MQTT relay; overrides as in ``make_server``."""
    started: list[RunningServer] = []

    def start(**overrides: Any) -> RunningServer:
        settings = make_settings(tmp_path, **{"mqtt_url": BROKER, **overrides})
        node = RunningServer(settings).start()
        started.append(node)
        return node

    yield start
    for node in reversed(started):
        node.stop()


@asynccontextmanager
async def http(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE) as client:
        await until_connected(client)
        yield client


relay_status = partial(brokers.relay_status, relay="mqtt")
until_connected = partial(brokers.until_connected, relay="mqtt")


@dataclass
class Received:
    topic: str
    payload: bytes
    cursor: str | None
    properties: Any
    retain: bool


@dataclass
class Subscriber:
    """An aiomqtt client subscribed at QoS 1 that keeps what arrives."""

    client: aiomqtt.Client
    messages: list[Received] = field(default_factory=list)

    async def until(self, count: int) -> list[Received]:
        async def enough() -> list[Received] | None:
            return self.messages if len(self.messages) >= count else None

        got: list[Received] = await until(enough, f"{count} messages at the subscriber")
        return got


def received(message: aiomqtt.Message) -> Received:
    cursor = read_properties(message.properties).cursor
    return Received(message.topic.value, message.payload, cursor, message.properties,
                    message.retain)  # fmt: skip


@asynccontextmanager
async def subscriber(topic: str, port: int = PORT, **options: Any) -> AsyncIterator[Subscriber]:
    client = aiomqtt.Client(HOST, port, protocol=aiomqtt.ProtocolVersion.V5, **options)
    async with client:
        await client.subscribe(topic, qos=1)
        sub = Subscriber(client)

        async def read() -> None:
            with contextlib.suppress(aiomqtt.MqttError):  # the broker went away (fault tests)
                async for message in client.messages:
                    sub.messages.append(received(message))

        reader = asyncio.create_task(read())
        try:
            yield sub
        finally:
            reader.cancel()


async def mosquitto_pub(*args: str, port: int = PORT, payload: bytes | None = None) -> None:
    tool = require_tool(MOSQUITTO_PUB, "mosquitto_pub", "mosquitto-clients")
    command = [tool, "-h", HOST, "-p", str(port), "-q", "1", *args]
    if payload is not None:
        command.append("-s")  # the message from stdin, byte for byte
    process = await asyncio.create_subprocess_exec(
        *command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(payload), DEADLINE)
    assert process.returncode == 0, (command, out, err)


async def forget_session(client_id: str, *nodes: RunningServer) -> None:
    """Stop the nodes relaying as ``client_id`` (they would resume it), then end its session on
    the shared broker: Clean Start, no Session Expiry."""
    for node in nodes:
        await asyncio.to_thread(node.stop)
    async with aiomqtt.Client(HOST, PORT, identifier=client_id, clean_start=True,
                              protocol=aiomqtt.ProtocolVersion.V5):  # fmt: skip
        pass


# -- outbound ------------------------------------------------------------------------------------


async def test_http_publish_reaches_mosquitto_sub_and_aiomqtt_with_cursor_properties(
    servers: Callable[..., RunningServer],
) -> None:
    tool = require_tool(MOSQUITTO_SUB, "mosquitto_sub", "mosquitto-clients")
    prefix = unique("out")
    node = servers(mqtt_prefix=prefix, mqtt_inbound_prefix=unique("in"))
    # Line-buffered, so its "Subscribed" debug line comes through before any message does.
    unbuffered = [stdbuf, "-oL"] if (stdbuf := shutil.which("stdbuf")) else []
    sub_process = await asyncio.create_subprocess_exec(
        *unbuffered, tool, "-d", "-h", HOST, "-p", str(PORT), "-V", "mqttv5", "-q", "1",
        "-t", f"{prefix}/#", "-C", "3", "-W", str(int(DEADLINE)), "-F", "MSG|%t|%C|%P|%p",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert sub_process.stdout is not None
    async with asyncio.timeout(DEADLINE):
        while b"Subscribed (mid" not in await sub_process.stdout.readline():
            pass
    async with http(node) as client, subscriber(f"{prefix}/#") as sub:
        cursors = [
            await publish(client, "orders/42", {"total": 9.5}),
            await publish(client, "note", None, content="hello", headers={
                "content-type": "text/plain", "ce-type": "note.added"}),
            await publish(client, "orders/42", None, content=b"\x00\xff",
                          headers={"content-type": "application/octet-stream"}),
        ]  # fmt: skip
        got = await sub.until(3)
        out, _ = await asyncio.wait_for(sub_process.communicate(), DEADLINE)

    assert [m.topic for m in got] == [
        f"{prefix}/orders/42",
        f"{prefix}/note",
        f"{prefix}/orders/42",
    ]
    assert [m.payload for m in got] == [b'{"total":9.5}', b"hello", b"\x00\xff"]
    assert [m.cursor for m in got] == cursors
    assert [m.properties.ContentType for m in got] == [
        "application/json", "text/plain", "application/octet-stream"]  # fmt: skip
    assert dict(got[1].properties.UserProperty)["tidings-type"] == "note.added"
    assert [getattr(m.properties, "PayloadFormatIndicator", 0) for m in got] == [1, 1, 0]
    assert not any(m.retain for m in got)

    lines = [line for line in out.split(b"\n") if line.startswith(b"MSG|")]
    assert lines[:2] == [
        f"MSG|{prefix}/orders/42|application/json|{CURSOR_PROPERTY}:{cursors[0]} "
        'tidings-type:message|{"total":9.5}'.encode(),
        f"MSG|{prefix}/note|text/plain|{CURSOR_PROPERTY}:{cursors[1]} "
        "tidings-type:note.added|hello".encode(),
    ]
    assert lines[2].startswith(f"MSG|{prefix}/orders/42|application/octet-stream|".encode())


async def test_only_channels_matching_the_patterns_go_out_and_retain_rules_hold(
    servers: Callable[..., RunningServer],
) -> None:
    prefix = unique("out")
    node = servers(mqtt_prefix=prefix, mqtt_inbound_prefix="", mqtt_channels="state/**,log",
                   mqtt_retain="state/**")  # fmt: skip
    async with http(node) as client, subscriber(f"{prefix}/#") as sub:
        await publish(client, "ignored/x", 0)
        await publish(client, "log", 1)
        state = await publish(client, "state/lamp", {"on": True})
        got = await sub.until(2)
        await asyncio.sleep(0.3)
        assert [m.topic for m in got] == [f"{prefix}/log", f"{prefix}/state/lamp"]
    try:
        # A device that connects later gets the retained last value.
        async with subscriber(f"{prefix}/#") as late:
            [last] = await late.until(1)
            assert (last.topic, last.cursor, last.retain) == (f"{prefix}/state/lamp", state, True)
    finally:  # leave no retained message on the shared broker
        await mosquitto_pub("-r", "-n", "-t", f"{prefix}/state/lamp")


async def test_mqtt_3_1_1_relays_payloads_without_properties_both_ways(
    servers: Callable[..., RunningServer],
) -> None:
    prefix, inbound = unique("out"), unique("in")
    node = servers(mqtt_prefix=prefix, mqtt_inbound_prefix=inbound, mqtt_protocol="3.1.1")
    async with http(node) as client, subscriber(f"{prefix}/#") as sub:
        await publish(client, "a", {"n": 1})
        [message] = await sub.until(1)
        assert message.payload == b'{"n":1}' and message.cursor is None
        await mosquitto_pub("-V", "mqttv311", "-t", f"{inbound}/dev/1", "-m", '{"t":21}')
        [ingested] = await history_until(client, "dev/**", 1)
    assert ingested["datacontenttype"] == "application/json"  # sniffed, as over HTTP
    assert ingested["data"] == {"t": 21}


# -- relay status --------------------------------------------------------------------------------


async def test_healthz_shows_the_relay_connected_with_its_confirmed_cursor(
    servers: Callable[..., RunningServer],
) -> None:
    prefix = unique("out")
    node = servers(mqtt_prefix=prefix)
    async with http(node) as client, subscriber(f"{prefix}/#") as sub:
        status = await relay_status(client)
        assert status["connected"] is True and "error" not in status
        assert Cursor.parse(status["cursor"]).epoch == node.hub.log.epoch
        cursor = await publish(client, "h", 1)
        await sub.until(1)

        async def confirmed() -> bool:
            return (await relay_status(client))["cursor"] == cursor

        await until(confirmed, "the relay cursor reached the published event")
        status = await relay_status(client)
        assert isinstance(status["lag"], float) and status["lag"] == 0.0
        assert await counter(client, "tidings_relay_connected", relay="mqtt") == 1.0
        assert await counter(client, "tidings_relay_events_total", relay="mqtt",
                             direction="out") == 1.0  # fmt: skip


async def test_an_unreachable_broker_is_reported_and_not_fatal(
    servers: Callable[..., RunningServer],
) -> None:
    node = servers(mqtt_url=f"mqtt://{HOST}:{free_port()}", mqtt_prefix=unique("out"))
    async with httpx.AsyncClient(base_url=node.url, timeout=DEADLINE) as client:
        await publish(client, "while/down", 1)  # publishing never waits for the relay

        async def failed() -> dict[str, Any] | None:
            [relay] = node.node.context.relays
            status: dict[str, Any] = node.run_coroutine(relay.status())
            return status if status["error"] else None

        status = await until(failed, "the relay reported its connection error")
        assert status["connected"] is False and "refused" in status["error"]
        public = await relay_status(client)
        assert public["connected"] is False and "error" not in public
        assert public["lag"] > 0.0


async def test_the_server_stops_promptly_when_the_broker_never_answers(
    servers: Callable[..., RunningServer],
) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind((HOST, 0))
        silent.listen(8)
        node = servers(mqtt_url=f"mqtt://{HOST}:{silent.getsockname()[1]}")
        await asyncio.sleep(0.5)  # the relay is waiting for a CONNACK that never comes
        started = time.monotonic()
        await asyncio.to_thread(node.stop)
        assert time.monotonic() - started < STOP_GRACE + 2.0


# -- faults ------------------------------------------------------------------------------------


def check_in_order(got: list[Received], sent: dict[str, list[tuple[str, bytes]]], prefix: str
                   ) -> int:  # fmt: skip
    """Every event arrived, first copies in order per channel; repeats carry the same cursor
    and payload. Returns how many repeats there were."""
    by_cursor: dict[str, bytes] = {}
    firsts: dict[str, list[tuple[str, bytes]]] = {}
    repeats = 0
    for message in got:
        assert message.cursor is not None
        if message.cursor in by_cursor:
            assert by_cursor[message.cursor] == message.payload
            repeats += 1
            continue
        by_cursor[message.cursor] = message.payload
        channel = channel_of(prefix, message.topic)
        firsts.setdefault(channel, []).append((message.cursor, message.payload))
    assert firsts.keys() == sent.keys()
    for channel, events in sent.items():
        assert firsts[channel] == events, channel
    return repeats


async def publish_during(
    client: httpx.AsyncClient, channels: list[str], fault: Callable[[], Awaitable[None]]
) -> dict[str, list[tuple[str, bytes]]]:
    """Publish numbered events round-robin on ``channels`` before, while and after ``fault``."""
    sent: dict[str, list[tuple[str, bytes]]] = {c: [] for c in channels}
    n = 0
    stop = asyncio.Event()

    async def keep_publishing() -> None:
        nonlocal n
        while not stop.is_set():
            channel = channels[n % len(channels)]
            data = orjson.dumps({"n": n})
            sent[channel].append((await publish(client, channel, None, content=data,
                                                headers={"content-type": "application/json"}),
                                  data))  # fmt: skip
            n += 1
            await asyncio.sleep(0.005)

    publisher = asyncio.create_task(keep_publishing())
    await asyncio.sleep(0.5)
    await fault()
    await asyncio.sleep(0.5)
    stop.set()
    await publisher
    return sent


async def test_events_published_while_the_broker_path_is_cut_all_arrive_in_order(
    servers: Callable[..., RunningServer],
) -> None:
    prefix = unique("out")
    proxy = TCPProxy(HOST, PORT).start()
    try:
        node = servers(mqtt_url=f"mqtt://{proxy.address}", mqtt_prefix=prefix)
        async with http(node) as client, subscriber(f"{prefix}/#") as sub:

            async def cut_and_heal() -> None:
                proxy.cut()
                await until(lambda: _disconnected(client), "the relay saw the cut")
                await asyncio.sleep(1.5)  # keep publishing into the outage
                proxy.heal()

            sent = await publish_during(client, ["a", "b/c", "d"], cut_and_heal)
            await sub.until(sum(len(v) for v in sent.values()))
            await until_connected(client)
            await asyncio.sleep(0.3)  # let stragglers (resent copies) in
            check_in_order(sub.messages, sent, prefix)
        assert proxy.cuts == 1
    finally:
        proxy.stop()


async def _disconnected(client: httpx.AsyncClient) -> bool:
    return not (await relay_status(client))["connected"]


class PrivateMosquitto:
    """``mosquitto`` on a free port with persistence in ``directory`` (and ``settings`` added
    to its configuration): stop() is SIGTERM (the broker saves its sessions), start() brings it
    back on the same port. Its log is ``directory/mosquitto.log``."""

    def __init__(self, directory: Path, settings: str = "allow_anonymous true\n") -> None:
        self.binary = require_tool(MOSQUITTO, "mosquitto", "mosquitto")
        self.port = free_port()
        self.config = directory / "mosquitto.conf"
        self.log = directory / "mosquitto.log"
        self.config.write_text(
            f"listener {self.port} {HOST}\npersistence true\npersistence_location {directory}/\n"
            f"autosave_interval 1\nuser root\n{settings}"
        )  # "user root": do not switch to the mosquitto user, who cannot write the directory
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([self.binary, "-c", str(self.config)],
                                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 10
        while not service_listening(HOST, self.port, 0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)
        self.process = None


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    directory = tmp_path / "mosquitto"
    directory.mkdir()
    broker = PrivateMosquitto(directory)
    broker.start()
    yield broker
    broker.stop()


async def test_events_published_while_the_broker_is_down_reach_a_persistent_subscriber(
    servers: Callable[..., RunningServer], private_broker: PrivateMosquitto
) -> None:
    prefix = unique("out")
    url = f"mqtt://{HOST}:{private_broker.port}"
    node = servers(mqtt_url=url, mqtt_prefix=prefix, mqtt_inbound_prefix="")
    # The device: a persistent session (Clean Start 0, a long Session Expiry), QoS 1. The
    # broker keeps queueing for it while it is away, and it comes back with the session.
    session = {"identifier": f"device-{secrets.token_hex(4)}", "clean_start": False,
               "properties": _session_expiry(3600), "port": private_broker.port}  # fmt: skip
    got: list[Received] = []
    async with http(node) as client:
        async with subscriber(f"{prefix}/#", **session) as sub:

            async def stop_and_restart() -> None:
                private_broker.stop()
                await until(lambda: _disconnected(client), "the relay saw the broker go")
                await asyncio.sleep(1.5)  # keep publishing into the outage
                private_broker.start()

            sent = await publish_during(client, ["x", "y/z"], stop_and_restart)
            got.extend(sub.messages)
        total = sum(len(v) for v in sent.values())
        await until_connected(client)

        async def everything() -> bool:
            async with subscriber(f"{prefix}/#", **session) as again:
                await asyncio.sleep(0.5)
                got.extend(again.messages)
            return len({m.cursor for m in got}) >= total

        await until(everything, f"all {total} events at the subscriber")
    check_in_order(got, sent, prefix)


def _session_expiry(seconds: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = seconds
    return props


# -- inbound -------------------------------------------------------------------------------------


async def test_mosquitto_pub_and_aiomqtt_publishes_arrive_over_sse_with_type_and_content_type(
    servers: Callable[..., RunningServer],
) -> None:
    inbound = unique("in")
    node = servers(mqtt_prefix=unique("out"), mqtt_inbound_prefix=inbound)
    async with http(node):
        with SSEClient(node.url, "dev/**", timeout=DEADLINE) as sse:
            sse.subscribed()
            await mosquitto_pub("-V", "mqttv5", "-t", f"{inbound}/dev/1/temp", "-m", '{"c":21.5}',
                                "-D", "publish", "content-type", "application/json",
                                "-D", "publish", "user-property", "type", "reading")  # fmt: skip
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ContentType = "application/octet-stream"
            props.UserProperty = [("tidings-type", "blob")]
            async with aiomqtt.Client(HOST, PORT, protocol=aiomqtt.ProtocolVersion.V5) as device:
                await device.publish(f"{inbound}/dev/2", b"\x00\x01", qos=1, properties=props)
            await mosquitto_pub("-V", "mqttv311", "-t", f"{inbound}/dev/3", "-m", "plain words")
            first, second, third = [
                (e.id, envelope(e)) for e in await asyncio.to_thread(sse.events, 3)
            ]
    assert first[1]["channel"] == "dev/1/temp" and first[1]["type"] == "reading"
    assert first[1]["datacontenttype"] == "application/json" and first[1]["data"] == {"c": 21.5}
    assert second[1]["channel"] == "dev/2" and second[1]["type"] == "blob"
    assert second[1]["datacontenttype"] == "application/octet-stream"
    assert second[1]["data_base64"] == "AAE="
    assert third[1]["channel"] == "dev/3" and third[1]["type"] == "message"
    assert third[1]["datacontenttype"].startswith("text/plain")
    assert third[1]["data"] == "plain words"
    for cursor, body in (first, second, third):
        assert cursor == body["id"] and Cursor.parse(cursor).epoch == node.hub.log.epoch


async def test_a_burst_of_inbound_messages_is_logged_in_arrival_order(
    servers: Callable[..., RunningServer],
) -> None:
    inbound = unique("in")
    node = servers(mqtt_prefix=unique("out"), mqtt_inbound_prefix=inbound)
    async with http(node) as client:
        async with aiomqtt.Client(HOST, PORT, protocol=aiomqtt.ProtocolVersion.V5,
                                  max_inflight_messages=100) as device:  # fmt: skip
            device.pending_calls_threshold = 1000
            await asyncio.gather(*(device.publish(f"{inbound}/seq", b"%d" % i, qos=1)
                                   for i in range(300)))  # fmt: skip
        events = await history_until(client, "seq", 300)
        assert [e["data"] for e in events] == list(range(300))
        assert await counter(client, "tidings_relay_events_total", relay="mqtt",
                             direction="in") == 300.0  # fmt: skip


async def test_messages_queued_while_tidings_was_away_arrive_with_a_stable_client_id(
    servers: Callable[..., RunningServer],
) -> None:
    inbound, client_id = unique("in"), f"tidings-test-{secrets.token_hex(4)}"
    nodes = [servers(mqtt_prefix=unique("out"), mqtt_inbound_prefix=inbound,
                     mqtt_client_id=client_id)]  # fmt: skip
    try:
        async with http(nodes[0]):
            pass
        await asyncio.to_thread(nodes[0].stop)
        # tidings is away: the broker keeps its session and queues what devices publish
        await mosquitto_pub("-V", "mqttv5", "-t", f"{inbound}/while/away", "-m", '"queued"')
        nodes.append(servers(mqtt_prefix=unique("out"), mqtt_inbound_prefix=inbound,
                             mqtt_client_id=client_id))  # fmt: skip
        async with http(nodes[1]) as client:
            [event] = await history_until(client, "while/away", 1)
            assert event["data"] == "queued"
    finally:
        await forget_session(client_id, *nodes)


# -- loops ---------------------------------------------------------------------------------------


async def test_one_publish_makes_one_event_when_inbound_overlaps_outbound(
    servers: Callable[..., RunningServer],
) -> None:
    prefix = unique("both")
    node = servers(mqtt_prefix=prefix, mqtt_inbound_prefix=prefix, mqtt_channels="**")
    async with http(node) as client, subscriber(f"{prefix}/#") as sub:
        cursor = await publish(client, "loop/http", {"once": True})
        [out] = await sub.until(1)
        assert out.cursor == cursor
        await mosquitto_pub("-V", "mqttv5", "-t", f"{prefix}/loop/device", "-m", '{"d":1}')
        await sub.until(3)  # the device's own message, and tidings relaying its event
        # Another tidings relay's message (it carries a cursor) is not ingested either.
        await mosquitto_pub("-V", "mqttv5", "-t", f"{prefix}/loop/other", "-m", "{}",
                            "-D", "publish", "user-property", CURSOR_PROPERTY, "zz:1")  # fmt: skip
        await asyncio.sleep(1.0)  # a loop would have shown by now
        events = await history(client, "loop/**")
        assert [e["channel"] for e in events] == ["loop/http", "loop/device"]
        assert sorted(m.topic for m in sub.messages) == sorted(
            [f"{prefix}/loop/http", f"{prefix}/loop/device", f"{prefix}/loop/device",
             f"{prefix}/loop/other"])  # fmt: skip
        assert await counter(client, "tidings_relay_events_total", relay="mqtt",
                             direction="in") == 1.0  # fmt: skip


# -- bad input -----------------------------------------------------------------------------------


async def test_bad_inbound_messages_are_dropped_with_a_metric_and_the_relay_goes_on(
    servers: Callable[..., RunningServer],
) -> None:
    inbound = unique("in")
    node = servers(mqtt_prefix=unique("out"), mqtt_inbound_prefix=inbound,
                   mqtt_inbound_publish="ok/**", http_max_event_bytes=1024)  # fmt: skip
    json5 = ("-V", "mqttv5", "-D", "publish", "content-type", "application/json")
    async with http(node) as client:
        await mosquitto_pub(*json5, "-t", f"{inbound}/ok/json", payload=b'{"a":"\xff"}')
        await mosquitto_pub(*json5, "-t", f"{inbound}/ok/json", "-m", "{not json")
        await mosquitto_pub("-t", f"{inbound}/ok/big", payload=b"x" * 1025)
        await mosquitto_pub("-t", f"{inbound}/ok//b", "-m", "1")
        await mosquitto_pub("-t", f"{inbound}/ok/a b", "-m", "1")
        await mosquitto_pub("-t", f"{inbound}", "-m", "1")
        await mosquitto_pub("-t", f"{inbound}/secret/x", "-m", "1")
        await mosquitto_pub("-V", "mqttv5", "-t", f"{inbound}/ok/typed", "-m", "1",
                            "-D", "publish", "user-property", "type", "tidings.x")  # fmt: skip
        await mosquitto_pub("-t", f"{inbound}/ok/good", "-m", '"fine"')
        [good] = await history_until(client, "ok/**", 1)
        assert good["channel"] == "ok/good" and good["data"] == "fine"

        expected = {"invalid_event": 3, "too_large": 1, "invalid_channel": 3, "forbidden": 1}

        async def counted() -> dict[str, float] | None:
            got = {r: await counter(client, "tidings_relay_dropped_messages_total",
                                    relay="mqtt", reason=r) for r in expected}  # fmt: skip
            return got if got == expected else None

        await until(counted, f"drops counted as {expected}")
        assert len(await history(client, "**")) == 1


# -- a crash -------------------------------------------------------------------------------------


def serve(db: Path, tmp_path: Path, environ: dict[str, str]) -> Serve:
    """``tidings serve --mqtt`` as a process, for kill -9; not waited for."""
    return Serve(db, tmp_path, "--grpc-port", "0", "--mqtt", BROKER, env=environ, wait=False)


def send_numbered(device: aiomqtt.Client, topic: str, key: str, total: int) -> Awaitable[Any]:
    """Publish ``0`` … ``total - 1`` to ``topic`` at QoS 1 all at once, each with the
    idempotency key ``{key}{i}``; the gathered sends."""
    device.pending_calls_threshold = total

    async def send(i: int) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [("idempotency-key", f"{key}{i}")]
        await device.publish(topic, b"%d" % i, qos=1, properties=props)

    return asyncio.gather(*(send(i) for i in range(total)))


async def test_inbound_messages_survive_kill_9_once_each_with_idempotency_keys(
    mosquitto: None, tmp_path: Path
) -> None:
    inbound, client_id = unique("in"), f"tidings-test-{secrets.token_hex(4)}"
    environ = {"TIDINGS_MQTT_CLIENT_ID": client_id, "TIDINGS_MQTT_INBOUND_PREFIX": inbound,
               "TIDINGS_MQTT_PREFIX": unique("out")}  # fmt: skip
    db = tmp_path / "relay.db"
    processes = [serve(db, tmp_path, environ)]
    total = 600  # under Mosquitto's max_queued_messages (1000) for one session
    try:
        await until_serving(processes[0], "mqtt")
        async with aiomqtt.Client(HOST, PORT, protocol=aiomqtt.ProtocolVersion.V5,
                                  max_inflight_messages=20) as device:  # fmt: skip
            sending = send_numbered(device, f"{inbound}/crash", "m", total)
            async with httpx.AsyncClient(base_url=processes[0].url, timeout=10) as client:
                await history_until(client, "crash", 20)
            processes[0].kill()  # mid-stream: some logged and acked, some logged only, some not
            await sending  # the rest wait at the broker, in tidings' session
        processes.append(serve(db, tmp_path, environ))
        await until_serving(processes[1], "mqtt")
        async with httpx.AsyncClient(base_url=processes[1].url, timeout=10) as client:
            await history_until(client, "crash", total)
            await asyncio.sleep(0.5)  # a duplicate would show up now
            seen = [e["data"] for e in await history(client, "crash")]
        assert sorted(seen) == list(range(total)), "lost or duplicated inbound messages"
        assert seen == list(range(total)), "inbound order changed"
    finally:
        for process in processes:
            process.kill()
        await forget_session(client_id)


async def test_stopping_the_server_leaves_unlogged_messages_to_the_session_once_each(
    servers: Callable[..., RunningServer],
) -> None:
    inbound, client_id = unique("in"), f"tidings-test-{secrets.token_hex(4)}"
    settings = {"mqtt_prefix": unique("out"), "mqtt_inbound_prefix": inbound,
                "mqtt_client_id": client_id}  # fmt: skip
    total = 600
    first = servers(**settings)
    nodes = [first]
    try:
        async with (
            http(first) as client,
            aiomqtt.Client(
                HOST, PORT, protocol=aiomqtt.ProtocolVersion.V5, max_inflight_messages=20
            ) as device,
        ):
            sending = send_numbered(device, f"{inbound}/stop", "s", total)
            await history_until(client, "stop", 20)
            await asyncio.to_thread(first.stop)  # the hub refuses (Unavailable) while it drains
            await sending
        nodes.append(servers(**settings))
        async with http(nodes[1]) as client:
            await history_until(client, "stop", total)
            await asyncio.sleep(0.5)  # a duplicate would show up now
            seen = [e["data"] for e in await history(client, "stop")]
        assert seen == list(range(total)), "lost, duplicated or reordered inbound messages"
    finally:
        await forget_session(client_id, *nodes)


# -- TLS and credentials -------------------------------------------------------------------------


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signs for IP 127.0.0.1: (ca, cert, key) PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tidings test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return paths


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[PrivateMosquitto, Path]]:
    """A private Mosquitto with TLS (a test CA) and a password file: user ``relay``, password
    ``p@ss:word``. Yields the broker and the CA file."""
    passwd = require_tool(shutil.which("mosquitto_passwd"), "mosquitto_passwd", "mosquitto")
    directory = tmp_path / "tls"
    directory.mkdir()
    ca, cert, key = make_certificates(directory)
    subprocess.run([passwd, "-c", "-b", str(directory / "passwd"), "relay", "p@ss:word"],
                   check=True, capture_output=True)  # fmt: skip
    broker = PrivateMosquitto(directory, f"allow_anonymous false\ncertfile {cert}\n"
                              f"keyfile {key}\npassword_file {directory / 'passwd'}\n")  # fmt: skip
    broker.start()
    yield broker, ca
    broker.stop()


async def test_mqtts_with_a_ca_file_and_url_credentials(
    servers: Callable[..., RunningServer], tls_broker: tuple[PrivateMosquitto, Path]
) -> None:
    broker, ca = tls_broker
    prefix = unique("out")
    good = servers(mqtt_url=f"mqtts://relay:p%40ss%3Aword@{HOST}:{broker.port}",
                   mqtt_tls_ca_file=str(ca), mqtt_prefix=prefix)  # fmt: skip
    tls = aiomqtt.TLSParameters(ca_certs=str(ca))
    async with http(good) as client, subscriber(f"{prefix}/#", port=broker.port,
                                                tls_params=tls, username="relay",
                                                password="p@ss:word") as sub:  # fmt: skip
        cursor = await publish(client, "secure", {"ok": True})
        [message] = await sub.until(1)
        assert message.cursor == cursor
    refused = servers(mqtt_url=f"mqtts://relay:wrong@{HOST}:{broker.port}",
                      mqtt_tls_ca_file=str(ca), mqtt_prefix=prefix)  # fmt: skip
    [relay] = refused.node.context.relays

    async def failed() -> str | None:
        error: str | None = refused.run_coroutine(relay.status())["error"]
        return error

    error = await until(failed, "the relay reported the refused credentials")
    assert "Not authorized" in error and "wrong" not in error
    untrusted = servers(
        mqtt_url=f"mqtts://relay:p%40ss%3Aword@{HOST}:{broker.port}", mqtt_prefix=prefix
    )  # the system's CAs do not know the test CA
    [relay] = untrusted.node.context.relays

    async def unverified() -> str | None:
        error: str | None = untrusted.run_coroutine(relay.status())["error"]
        return error

    assert "CERTIFICATE_VERIFY_FAILED" in await until(unverified, "the TLS refusal")


async def test_an_event_over_the_brokers_packet_size_is_skipped_not_a_stuck_relay(
    servers: Callable[..., RunningServer], tmp_path: Path
) -> None:
    directory = tmp_path / "small"
    directory.mkdir()
    broker = PrivateMosquitto(directory, "allow_anonymous true\nmax_packet_size 2000\n")
    broker.start()
    try:
        prefix = unique("out")
        node = servers(mqtt_url=f"mqtt://{HOST}:{broker.port}", mqtt_prefix=prefix,
                       mqtt_inbound_prefix="")  # fmt: skip
        async with http(node) as client, subscriber(f"{prefix}/#", port=broker.port) as sub:
            big = await client.post("/channels/big", content=b"x" * 3000)
            small = await client.post("/channels/small", content=b"ok")
            assert big.status_code == small.status_code == 201
            [message] = await sub.until(1)
            assert message.cursor == small.json()["id"]  # the one after it still goes out
            metrics = (await client.get("/metrics")).text
            assert 'tidings_relay_refused_events_total{reason="too_large",relay="mqtt"} 1.0' in (
                metrics
            )
            assert (await relay_status(client))["connected"]
    finally:
        broker.stop()
