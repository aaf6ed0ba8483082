"""``tidings bench``: its pure parts (percentiles, tallies, payloads, byte accounting, the
table) by plain calls, and one smoke run of the command with tiny parameters."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tidings.bench import report
from tidings.bench.amqp import AMQPConnection
from tidings.bench.amqp import method as amqp_method
from tidings.bench.amqp import shortstr as amqp_shortstr
from tidings.bench.grpc import GRPCConnection, subscribe_request
from tidings.bench.mqtt import MQTTConnection
from tidings.bench.mqtt import packet as mqtt_packet
from tidings.bench.mqtt import utf8 as mqtt_utf8
from tidings.bench.mqtt import walk as mqtt_walk
from tidings.bench.runner import Options, choose
from tidings.bench.sse import SSEConnection
from tidings.bench.stats import Meter, Tally, latency_summary, per_delivery, percentile
from tidings.bench.subscriber import Subscriber
from tidings.bench.webhooks import NO_CONTENT, UNAVAILABLE, Hook, Receiver
from tidings.bench.wire import N_OFFSET, HTTPConnection, payload, request, stamps
from tidings.bench.workload import spread
from tidings.bench.ws import PING, PONG, WS_ACCEPT, WSConnection, walk

# -- statistics ---------------------------------------------------------------------------------


def test_percentile_is_nearest_rank_and_always_a_measured_value() -> None:
    values = [float(v) for v in range(1, 101)]  # 1 .. 100
    assert percentile(values, 50) == 50
    assert percentile(values, 90) == 90
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([7.0], 99) == 7
    assert percentile([1.0, 2.0, 3.0], 50) == 2
    assert math.isnan(percentile([], 50))


def test_latency_summary_reports_milliseconds_and_a_101_point_cdf() -> None:
    summary = latency_summary([ms * 1_000_000 for ms in range(1, 1001)])
    assert summary["p50_ms"] == 500
    assert summary["p99_ms"] == 990
    assert summary["max_ms"] == 1000
    assert summary["samples"] == 1000
    cdf = summary["cdf_ms"]
    assert isinstance(cdf, list) and len(cdf) == 101
    assert cdf[0] == 1 and cdf[-1] == 1000 and cdf == sorted(cdf)
    assert latency_summary([])["p50_ms"] is None


def test_tally_counts_losses_duplicates_and_strangers() -> None:
    tally = Tally(5)
    for n in (0, 1, 1, 3, 9, -1):
        tally.add(n)
    assert (tally.received, tally.missing, tally.duplicates, tally.unexpected) == (3, 2, 1, 2)
    assert not tally.complete
    tally.add(2)
    tally.add(4)
    assert tally.complete


def test_payload_has_the_exact_size_whatever_its_stamp() -> None:
    small, big = payload(256), payload(256, 1_790_000_000_123_456_789, 123_456)
    assert len(small) == len(big) == 256
    assert json.loads(big)["t"] == 1_790_000_000_123_456_789
    assert json.loads(big)["n"] == 123_456 + N_OFFSET
    assert stamps(b"x" + big + big) == [(b"1790000000123456789", b"1000123456")] * 2
    with pytest.raises(ValueError, match="too small"):
        payload(10)


def test_spread_takes_an_evenly_spaced_tenth() -> None:
    assert spread(200, 0.1) == list(range(0, 200, 10))
    assert spread(5, 0.1) == [0]
    assert spread(1, 0.1) == []


def test_bytes_per_delivery() -> None:
    assert per_delivery(5120, 10) == 512.0
    assert per_delivery(100, 0) is None


# -- byte accounting in the lean protocols ------------------------------------------------------


class FakeTransport:
    """Collects what a protocol writes, as a socket would."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def sse_block(cursor: str, data: bytes, event: str = "") -> bytes:
    head = f"id: {cursor}\n" + (f"event: {event}\n" if event else "")
    return head.encode() + b"data: " + data + b"\n\n"


async def test_sse_counts_every_byte_and_each_event_once_across_split_reads() -> None:
    meter = Meter()
    sub = Subscriber(0, "bench/x", meter)
    request = b"GET /sse?channel=bench/x HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
    conn = SSEConnection(sub, request)
    sub.conn, sub.closed = conn, False
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    envelope = (
        b'{"specversion":"1.0","id":"e1:%d","data":' + payload(64, 1_700_000_000_000_000_000) + b"}"
    )
    stream = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"
        + b"retry: 2000\n"
        + sse_block("e1:0", b'{"cursor":"e1:0","recovered":true}', "tidings.subscribed")
        + sse_block("e1:1", envelope % 1)
        + b": ping\n\n"
        + sse_block("e1:2", envelope % 2)
    )
    sub.tally = Tally(1)
    for i in range(0, len(stream), 7):  # reads split anywhere, even inside a marker
        conn.data_received(stream[i : i + 7])
    assert conn.opened.done() and conn.opened.exception() is None
    assert meter.received == len(stream)
    assert meter.sent == len(request) == len(b"".join(transport.written))
    assert sub.count == 2
    assert sub.cursor == "e1:2"
    assert sub.tally.received == 1 and sub.tally.duplicates == 1  # both carried n = 0


def ws_server_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    n = len(payload)
    head = bytes((0x80 | opcode, n)) if n < 126 else bytes((0x80 | opcode, 126)) + n.to_bytes(2)
    return head + payload


def test_walk_finds_complete_frames_and_leaves_the_rest() -> None:
    big = ws_server_frame(b"x" * 300)
    frames, rest = walk(ws_server_frame(b"hi") + big[:100])
    assert frames == [(0x1, True, 2, 4)] and rest == 4
    frames, rest = walk(big)
    assert frames == [(0x1, True, 4, 304)] and rest == 304
    with pytest.raises(ValueError, match="masked"):
        walk(b"\x81\x82abcdxy")


async def test_ws_counts_handshake_events_and_the_pong_it_sends() -> None:
    meter = Meter()
    sub = Subscriber(0, "bench/x", meter)
    conn = WSConnection(sub, b"GET /ws HTTP/1.1\r\n\r\n")
    sub.conn, sub.closed = conn, False
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    handshake = b"HTTP/1.1 101 Switching Protocols\r\nsec-websocket-accept: " + WS_ACCEPT
    event = b'{"op":"event","sub":"url","event":{"specversion":"1.0","id":"e1:%d"}}'
    stream = (
        handshake
        + b"\r\n\r\n"
        + ws_server_frame(b'{"op":"subscribed","id":"url","cursor":"e1:0","recovered":true}')
        + ws_server_frame(event % 1)
        + ws_server_frame(b"are you there", PING)
        + ws_server_frame(event % 2)
    )
    conn.data_received(stream[:60])
    conn.data_received(stream[60:])
    assert sub.count == 2 and sub.cursor == "e1:2"
    assert meter.received == len(stream)
    pong = transport.written[-1]
    assert pong[0] == 0x80 | PONG and len(pong) == 2 + 4 + len(b"are you there")
    assert meter.sent == sum(len(w) for w in transport.written)


async def test_http_connection_meters_requests_and_pipelined_answers() -> None:
    meter = Meter()
    conn = HTTPConnection(meter)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    raw = request("GET", "/poll?channel=a&limit=1000")
    first, second = conn.send(raw), conn.send(raw)
    page = b'{"events":[],"cursor":"e1:0","recovered":true,"more":false}'
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(page) + page
    conn.data_received(answer + answer[:10])
    conn.data_received(answer[10:])
    assert (await first) == (200, page) and (await second) == (200, page)
    assert meter.sent == 2 * len(raw) and meter.received == 2 * len(answer)


async def test_grpc_counts_events_and_takes_the_cursor_from_real_protobuf() -> None:
    from tidings.v1 import tidings_pb2 as pb

    meter = Meter()
    sub = Subscriber(0, "bench/x", meter)
    conn = GRPCConnection(sub, b"127.0.0.1:1", subscribe_request("bench/x", "e1:4"))
    sub.conn, sub.closed = conn, False
    request_message = pb.SubscribeRequest()
    request_message.ParseFromString(subscribe_request("bench/x", "e1:4"))
    assert list(request_message.channels) == ["bench/x"] and request_message.since == "e1:4"

    def message(response: object) -> bytes:
        body = response.SerializeToString()  # type: ignore[attr-defined]
        return b"\x00" + len(body).to_bytes(4, "big") + body

    opening = pb.SubscribeResponse(subscribed=pb.Subscribed(cursor="e1:4", recovered=True))
    events = [
        pb.SubscribeResponse(event=pb.Event(id=f"e1:{i}", channel="bench/x", data=payload(300)))
        for i in (5, 6)
    ]
    stream = message(opening) + b"".join(message(e) for e in events)
    conn.on_data(stream[:50])  # a message split across DATA frames
    assert conn.opened.done() and sub.cursor == "e1:4" and sub.count == 0
    conn.on_data(stream[50:])
    assert sub.count == 2 and sub.cursor == "e1:6" and sub.unrecovered == 0


def test_webhook_receiver_counts_deliveries_and_refuses_a_dropped_endpoint() -> None:
    meter = Meter()
    receiver = Receiver(meter)
    sub = Subscriber(0, "bench/x", meter)
    receiver.paths[b"/hook/a"] = sub
    hook = Hook(receiver)
    transport = FakeTransport()
    hook.connection_made(transport)  # type: ignore[arg-type]
    body = b'{"specversion":"1.0","id":"e1:1"}'
    req = (
        b"POST /hook/a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nwebhook-id: e1:1\r\n\r\n"
        % len(body)
        + body
    )
    hook.data_received(req + req[:20])
    hook.data_received(req[20:])
    assert sub.count == 2 and transport.written == [NO_CONTENT, NO_CONTENT]
    receiver.down.add(b"/hook/a")
    hook.data_received(req)
    assert sub.count == 2 and transport.written[-1] == UNAVAILABLE and receiver.refused == 1
    assert meter.received == 3 * len(req)
    assert meter.sent == 2 * len(NO_CONTENT) + len(UNAVAILABLE)


async def test_mqtt_acknowledges_each_qos1_publish_in_one_write() -> None:
    meter = Meter()
    sub = Subscriber(0, "bench/x", meter)
    conn = MQTTConnection(sub, b"hello", "tidings/bench/x")
    sub.conn, sub.closed = conn, False
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]

    def publish(packet_id: int, data: bytes) -> bytes:
        body = mqtt_utf8("tidings/bench/x") + packet_id.to_bytes(2, "big") + b"\x00" + data
        return mqtt_packet(3, 0x2, body)  # QoS 1

    stream = b"\x20\x03\x00\x00\x00" + b"\x90\x04\x00\x01\x00\x01"  # CONNACK, SUBACK
    stream += publish(7, payload(300, 1_700_000_000_000_000_000, 0)) + publish(8, b"{}")
    conn.data_received(stream[:9])
    conn.data_received(stream[9:])
    assert conn.opened.done() and sub.count == 2
    assert transport.written[-1] == b"\x40\x02\x00\x07\x40\x02\x00\x08"
    assert meter.received == len(stream)
    assert meter.sent == sum(len(w) for w in transport.written)
    packets, rest = mqtt_walk(stream[:-3])
    assert [p[0] for p in packets] == [2, 9, 3] and rest == len(stream) - len(publish(8, b"{}"))


async def test_amqp_counts_complete_deliveries_and_acks_them_together() -> None:
    meter = Meter()
    sub = Subscriber(0, "bench/x", meter)
    conn = AMQPConnection(sub, b"", "guest", "guest", "/")
    sub.conn, sub.closed = conn, False
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]

    def delivery(tag: int, body: bytes) -> bytes:
        deliver = amqp_shortstr("ctag") + tag.to_bytes(8, "big") + b"\x00"
        deliver += amqp_shortstr("tidings") + amqp_shortstr("bench.x")
        header = struct.pack(">HHQH", 60, 0, len(body), 0)
        frame = struct.Struct(">BHI")
        return (
            amqp_method(1, 60, 60, deliver)
            + frame.pack(2, 1, len(header)) + header + b"\xce"
            + frame.pack(3, 1, len(body)) + body + b"\xce"
        )  # fmt: skip

    stream = delivery(1, b'{"a":1}') + delivery(2, payload(256))
    conn.data_received(stream[:-40])
    assert sub.count == 1 and transport.written[-1].endswith(b"\x00" * 7 + b"\x01\x01\xce")
    conn.data_received(stream[-40:])
    assert sub.count == 2 and transport.written[-1].endswith(b"\x00" * 7 + b"\x02\x01\xce")
    assert meter.received == len(stream)
    assert meter.sent == sum(len(w) for w in transport.written)


# -- the table ----------------------------------------------------------------------------------


def fake_result(p50: float, p99: float, per_event: float, one: int, many: int) -> dict[str, Any]:
    return {
        "status": "ok",
        "params": {"poll_interval": 1.0},
        "memory": {"kb_per_idle_subscriber": 11.25, "held_by": "hub"},
        "paced": {
            "latency": {"p50_ms": p50, "p99_ms": p99},
            "bytes_per_delivery": per_event,
            "losses": 0,
            "duplicates": 0,
            "dropped_and_resumed": 20,
            "generator_cpu_util": 0.05,
        },
        "throughput_one_channel": {
            "deliveries_per_s": one,
            "server_cpu_s_per_1000_deliveries": 0.0021,
            "generator_cpu_util": 0.4,
        },
        "throughput_n_channels": {"deliveries_per_s": many, "generator_cpu_util": 0.3},
    }


RESULTS = {
    "ws": fake_result(1.2, 4.8, 516.4, 412_000, 26_400),
    "poll": fake_result(480.0, 990.0, 3100.0, 51_000, 9_000),
    "grpc": fake_result(2.0, 7.5, 380.0, 90_000, 15_000),
    "mqtt": {"status": "skipped", "reason": "no MQTT broker answers at mqtt://127.0.0.1:1883"},
}


def test_markdown_puts_the_measure_beside_the_seeds_word() -> None:
    table = report.markdown(RESULTS)
    lines = table.splitlines()
    assert lines[0] == "| | WebSocket | Short polling (1 s) | gRPC |"
    assert "| **Latency** | Very Low — p50 1.20 ms / p99 4.80 ms | Moderate — p50 480 ms" in table
    assert "High — 3,100 B/event" in table  # polling's bandwidth word is the seed's "High"
    assert "| 380 B/event |" in table  # gRPC is not in the seed's table: no word
    assert "High — 1 ch: 412k/s / N ch: 26.4k/s" in table
    assert "| **Server CPU per 1,000 deliveries** | 2.10 ms |" in table
    assert "11.2 KiB" in table and "0 / 0 (20 resumed)" in table
    assert "MQTT" not in table
    assert report.skipped(RESULTS) == [
        "skipped MQTT relay: no MQTT broker answers at mqtt://127.0.0.1:1883"
    ]


def test_text_table_splits_columns_to_fit_the_width() -> None:
    wide = report.text(RESULTS, width=400)
    assert "\n\n" not in wide  # one grid
    assert "Very Low" in wide and "p50 1.20 ms" in wide and "1 ch: 412k/s" in wide
    narrow = report.text(RESULTS, width=90)
    blocks = narrow.split("\n\n")
    assert len(blocks) > 1
    for block in blocks:
        assert max(len(line) for line in block.splitlines()) <= 90


def test_relays_without_a_broker_are_skipped_with_the_reason() -> None:
    options = Options(transports=["ws", "mqtt", "amqp"], mqtt="mqtt://127.0.0.1:9",
                      amqp="amqp://guest:secret@127.0.0.1:9/")  # fmt: skip
    chosen = dict(choose(options))
    assert chosen["ws"] == ""
    assert chosen["mqtt"].startswith("no MQTT broker answers at mqtt://127.0.0.1:9")
    assert "127.0.0.1:9" in chosen["amqp"] and "secret" not in chosen["amqp"]


# -- the command, end to end --------------------------------------------------------------------

SMOKE = ["ws", "sse", "longpoll", "poll", "grpc"]


def test_bench_runs_every_transport_with_zero_losses_and_writes_json_and_png(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    command = [sys.executable, "-m", "tidings", "bench", "--transports", ",".join(SMOKE),
               "--subscribers", "12", "--rate", "20", "--duration", "1.5",
               "--poll-interval", "0.3", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Latency" in done.stdout and "Very Low" in done.stdout
    document = json.loads((out / "bench.json").read_text())
    assert document["losses"] == 0 and document["duplicates"] == 0
    assert document["machine"]["cores"] and document["machine"]["python"]
    for transport in SMOKE:
        r = document["transports"][transport]
        assert r["status"] == "ok", r
        paced = r["paced"]
        assert paced["losses"] == paced["duplicates"] == paced["unexpected"] == 0
        assert paced["received"] == paced["expected"] > 0
        assert paced["dropped_and_resumed"] >= 1 and paced["resumes_not_recovered"] == 0
        for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
            assert paced["latency"][key] > 0, (transport, key)
        assert paced["bytes_per_delivery"] > 256
        for phase in ("throughput_one_channel", "throughput_n_channels"):
            assert r[phase]["deliveries_per_s"] > 0
            assert r[phase]["missing"] == r[phase]["extra"] == 0
            assert r[phase]["server_cpu_s_per_1000_deliveries"] > 0
            assert 0 <= r[phase]["generator_cpu_util"] < 2
        assert r["memory"]["kb_per_idle_subscriber"] is not None
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "bench.md").read_text().startswith("| | ")


def test_bench_refuses_a_payload_too_small_for_its_stamp() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tidings", "bench", "--payload", "20"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and done.stderr.startswith("tidings: --payload 20 is too small")


def test_bench_against_an_unreachable_url_says_so_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tidings", "bench", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("tidings: cannot reach http://127.0.0.1:9")
    assert len(done.stderr.strip().splitlines()) == 1
