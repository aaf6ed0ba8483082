"""The gRPC API against a real server, with real ``grpc.aio`` clients (docs/grpc.md)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import httpx
import orjson
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from websockets.asyncio.client import connect as ws_connect

from conftest import RunningServer, make_settings
from streaming import SSEClient, envelope
from test_access import SECRET, token
from tidings.exceptions import ConfigError
from tidings.server import Tidings
from tidings.v1 import tidings_pb2 as pb
from tidings.v1 import tidings_pb2_grpc as pb_grpc

TIMEOUT = 10
JSON = "application/json"


def target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.node.grpc_port}"


@pytest.fixture
async def stub(server: RunningServer) -> AsyncIterator[pb_grpc.TidingsStub]:
    async with grpc.aio.insecure_channel(target(server)) as channel:
        yield pb_grpc.TidingsStub(channel)


def as_envelope(event: pb.Event) -> dict[str, Any]:
    """The JSON envelope the other transports send for the same event."""
    body: dict[str, Any] = {
        "specversion": event.specversion,
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "channel": event.channel,
        "time": event.time.ToDatetime().isoformat(timespec="milliseconds") + "Z",
        "datacontenttype": event.datacontenttype,
    }
    if event.datacontenttype.startswith("application/json"):
        body["data"] = orjson.loads(event.data)
    elif event.datacontenttype.startswith("text/"):
        body["data"] = event.data.decode()
    else:
        body["data_base64"] = base64.b64encode(event.data).decode()
    return body


async def refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def error_code(error: grpc.aio.AioRpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get("tidings-error")


async def take(call: Any, count: int) -> list[pb.SubscribeResponse]:
    out = []
    while len(out) < count:
        message = await asyncio.wait_for(call.read(), TIMEOUT)
        assert message is not grpc.aio.EOF
        out.append(message)
    return out


# -- publish and subscribe across transports ---------------------------------------------------


async def test_publish_over_grpc_reaches_sse_websocket_and_long_poll_with_one_cursor(
    server: RunningServer, stub: pb_grpc.TidingsStub
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        start = (await http.get("/healthz")).json()["cursor"]
        ws_url = server.url.replace("http", "ws") + "/ws?channel=grpc/**"
        with SSEClient(server.url, "grpc/**") as sse:
            sse.subscribed()
            async with ws_connect(ws_url) as ws:
                assert orjson.loads(await ws.recv())["op"] == "subscribed"
                answer = await stub.Publish(
                    pb.PublishRequest(channel="grpc/a", type="made", data=b'{"n": 1}')
                )
                cursor = answer.event.id
                assert not answer.replayed and answer.event.datacontenttype == "application/json"
                message = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                [streamed] = await asyncio.to_thread(sse.events, 1)
        polled = (await http.get("/poll", params={"channel": "grpc/**", "since": start})).json()
    assert message["event"]["id"] == streamed.id == polled["events"][0]["id"] == cursor
    assert message["event"] == envelope(streamed) == polled["events"][0]
    assert as_envelope(answer.event) == message["event"]


async def test_http_publishes_stream_to_grpc_with_their_cursor_and_raw_data(
    server: RunningServer, stub: pb_grpc.TidingsStub
) -> None:
    call = stub.Subscribe(pb.SubscribeRequest(channels=["files/*", "notes"]))
    [opening] = await take(call, 1)
    assert opening.WhichOneof("kind") == "subscribed" and opening.subscribed.recovered
    blob = bytes(range(256))
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        published = []
        for channel, body, kind in (
            ("files/a", blob, "application/octet-stream"),
            ("other", b"1", "application/json"),
            ("notes", b"words", "text/plain"),
        ):
            response = await http.post(
                f"/channels/{channel}", content=body, headers={"content-type": kind}
            )
            published.append(response.json())
    got = await take(call, 2)
    call.cancel()
    assert [m.event.id for m in got] == [published[0]["id"], published[2]["id"]]
    assert got[0].event.data == blob and got[1].event.data == b"words"
    assert [as_envelope(m.event) for m in got] == [published[0], published[2]]


async def test_resume_with_since_delivers_exactly_the_missed_events(
    server: RunningServer, stub: pb_grpc.TidingsStub
) -> None:
    first = await stub.Publish(pb.PublishRequest(channel="r/1", data=b"0"))
    missed = [
        (await stub.Publish(pb.PublishRequest(channel=f"r/{i}", data=b"1"))).event.id
        for i in range(5)
    ]
    await stub.Publish(pb.PublishRequest(channel="elsewhere", data=b"2"))
    call = stub.Subscribe(pb.SubscribeRequest(channels=["r/*"], since=first.event.id))
    [opening] = await take(call, 1)
    assert opening.subscribed.cursor == first.event.id and opening.subscribed.recovered
    live = (await stub.Publish(pb.PublishRequest(channel="r/9", data=b"3"))).event.id
    got = await take(call, 6)
    call.cancel()
    assert [m.event.id for m in got] == [*missed, live]


async def test_a_cursor_outside_history_gets_recovered_false(
    stub: pb_grpc.TidingsStub,
) -> None:
    call = stub.Subscribe(pb.SubscribeRequest(channels=["x"], since="0ther:7"))
    [opening] = await take(call, 1)
    call.cancel()
    assert not opening.subscribed.recovered
    assert "another log epoch" in opening.subscribed.reason


async def test_history_pages_and_batches_are_atomic(stub: pb_grpc.TidingsStub) -> None:
    batch = pb.PublishBatchRequest(
        events=[pb.PublishRequest(channel="h", data=str(i).encode()) for i in range(5)]
    )
    stored = await stub.PublishBatch(batch)
    assert [e.data for e in stored.events] == [str(i).encode() for i in range(5)]
    page = await stub.History(pb.HistoryRequest(channels=["h"], limit=3))
    assert [e.id for e in page.events] == [e.id for e in stored.events[:3]] and page.more
    page = await stub.History(pb.HistoryRequest(channels=["h"], since=page.cursor))
    assert [e.id for e in page.events] == [e.id for e in stored.events[3:]] and not page.more
    bad = pb.PublishBatchRequest(
        events=[pb.PublishRequest(channel="h", data=b"1"), pb.PublishRequest(channel="h//")]
    )
    error = await refusal(stub.PublishBatch(bad))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "events[1]" in error.details()
    page = await stub.History(pb.HistoryRequest(channels=["h"], since=stored.events[-1].id))
    assert list(page.events) == []  # nothing of the refused batch was stored


async def test_idempotent_publish_replays(stub: pb_grpc.TidingsStub) -> None:
    request = pb.PublishRequest(channel="i", data=b"1", idempotency_key="k")
    first = await stub.Publish(request)
    again = await stub.Publish(request)
    assert again.replayed and again.event.id == first.event.id


# -- refusals ------------------------------------------------------------------------------------


async def test_bad_requests_get_invalid_argument_with_the_reason(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(http_max_event_bytes=100)
    async with grpc.aio.insecure_channel(target(server)) as channel:
        stub = pb_grpc.TidingsStub(channel)
        cases = [
            (stub.Publish(pb.PublishRequest(channel="a//b")), "invalid_channel", "empty segment"),
            (stub.Publish(pb.PublishRequest(channel="a", data=b"x" * 101)), "payload_too_large",
             "http.max_event_bytes"),
            (stub.Publish(pb.PublishRequest(channel="a", data=b"{", content_type=JSON)),
             "invalid_event", "not valid JSON"),
            (stub.History(pb.HistoryRequest(channels=["a"], since="nope")), "invalid_cursor",
             "epoch:sequence"),
            (stub.History(pb.HistoryRequest(channels=[])), "invalid_pattern", "at least one"),
            (stub.History(pb.HistoryRequest(channels=["a"], limit=5000)), "invalid_parameter",
             "http.max_limit"),
        ]  # fmt: skip
        for call, code, words in cases:
            error = await refusal(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (code, error)
            assert error_code(error) == code and words in error.details(), error
        stream = stub.Subscribe(pb.SubscribeRequest(channels=["a/**/b"]))
        error = await refusal(stream.read())
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_code(error) == "invalid_pattern"


async def test_credentials_and_grants(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(auth_jwt_algorithms="HS256", auth_jwt_secret=SECRET)
    good = token(subscribe=["orders/**"], publish=["orders/*"], sub="svc")
    async with grpc.aio.insecure_channel(target(server)) as channel:
        stub = pb_grpc.TidingsStub(channel)
        error = await refusal(stub.Publish(pb.PublishRequest(channel="orders/1", data=b"1")))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_code(error) == "unauthorized"
        bad = (("authorization", "Bearer not-a-jwt"),)
        error = await refusal(stub.Publish(pb.PublishRequest(channel="orders/1"), metadata=bad))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "malformed" in error.details()
        auth = (("authorization", f"Bearer {good}"),)
        answer = await stub.Publish(pb.PublishRequest(channel="orders/1", data=b"1"), metadata=auth)
        assert answer.event.id
        error = await refusal(stub.Publish(pb.PublishRequest(channel="users/1"), metadata=auth))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_code(error) == "forbidden" and "users/1" in error.details()
        stream = stub.Subscribe(pb.SubscribeRequest(channels=["users/**"]), metadata=auth)
        error = await refusal(stream.read())
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "users/**" in error.details()
        stream = stub.Subscribe(pb.SubscribeRequest(channels=["orders/**"]), metadata=auth)
        [opening] = await take(stream, 1)
        stream.cancel()
        assert opening.subscribed.recovered


async def test_rate_limits_are_resource_exhausted_with_retry_after(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(limits_publish_rate=1, limits_publish_burst=2)
    async with grpc.aio.insecure_channel(target(server)) as channel:
        stub = pb_grpc.TidingsStub(channel)
        for _ in range(2):
            await stub.Publish(pb.PublishRequest(channel="x", data=b"1"))
        error = await refusal(stub.Publish(pb.PublishRequest(channel="x", data=b"1")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    metadata = dict(error.trailing_metadata() or ())
    assert metadata["tidings-error"] == "rate_limited" and int(metadata["retry-after"]) >= 1


async def test_messages_over_the_size_limit_are_refused_by_grpc(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(grpc_max_message=2048)
    async with grpc.aio.insecure_channel(target(server)) as channel:
        stub = pb_grpc.TidingsStub(channel)
        error = await refusal(stub.Publish(pb.PublishRequest(channel="x", data=b"y" * 4096)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- streams --------------------------------------------------------------------------------------


async def test_a_subscriber_that_falls_behind_ends_as_lagged(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(hub_queue_size=16)
    async with (
        grpc.aio.insecure_channel(target(server)) as channel,
        httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http,
    ):
        stub = pb_grpc.TidingsStub(channel)
        slow = stub.Subscribe(pb.SubscribeRequest(channels=["flood"]))
        await take(slow, 1)
        events = [{"channel": "flood", "data": "x" * 30_000} for _ in range(8)]
        for _ in range(100):  # 24 MB: past any flow-control window; each batch within the queue
            assert (await http.post("/publish", json={"events": events})).status_code == 201
        metrics = server.hub.metrics
        deadline = time.monotonic() + TIMEOUT
        while metrics.lagged.labels("grpc")._value.get() < 1:
            assert time.monotonic() < deadline, "never lagged"
            await asyncio.sleep(0.05)
        assert server.hub.subscriber_count == 0  # the hub holds nothing for it any more
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while (await asyncio.wait_for(slow.read(), TIMEOUT)) is not grpc.aio.EOF:
                received += 1
        assert 0 < received < 800  # what the window took before the subscription lagged
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_code(info.value) == "lagged" and "resume" in info.value.details()


async def test_deadlines_end_streams_on_the_server_too(
    server: RunningServer, stub: pb_grpc.TidingsStub
) -> None:
    call = stub.Subscribe(pb.SubscribeRequest(channels=["d"]), timeout=0.5)
    await take(call, 1)
    error = await refusal(call.read())
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + TIMEOUT
    while server.hub.subscriber_count or server.node.context.limits.streams.total:
        assert time.monotonic() < deadline, "the server kept the subscription"
        await asyncio.sleep(0.05)


async def test_health_serving_then_not_serving_while_draining_and_streams_unavailable(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server()
    async with grpc.aio.insecure_channel(target(server)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "tidings.v1.Tidings"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service="tidings.v1.Tidings"))
        first = await asyncio.wait_for(watch.read(), TIMEOUT)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stream = pb_grpc.TidingsStub(channel).Subscribe(pb.SubscribeRequest(channels=["s"]))
        await take(stream, 1)
        server.call(server.node.request_shutdown)
        second = await asyncio.wait_for(watch.read(), TIMEOUT)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        error = await refusal(stream.read())
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "reconnect" in error.details()


# -- generic tools: reflection ---------------------------------------------------------------------


async def test_a_client_built_from_reflection_alone_can_publish(server: RunningServer) -> None:
    def discover_and_publish() -> tuple[list[str], bytes]:
        with grpc.insecure_channel(target(server)) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = list(database.get_services())
            pool = descriptor_pool.DescriptorPool(database)
            method = pool.FindServiceByName("tidings.v1.Tidings").methods_by_name["Publish"]
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            publish = channel.unary_unary(
                "/tidings.v1.Tidings/Publish",
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )
            answer = publish(request_class(channel="reflected", data=b'"hi"'), timeout=TIMEOUT)
            return services, answer.SerializeToString()

    services, raw = await asyncio.to_thread(discover_and_publish)
    assert {"tidings.v1.Tidings", "grpc.health.v1.Health"} <= set(services)
    answer = pb.PublishResponse.FromString(raw)  # the same wire format as the real stubs
    assert answer.event.channel == "reflected" and answer.event.id


# -- TLS -----------------------------------------------------------------------------------------


def self_signed(tmp_path: Any) -> tuple[str, str, bytes]:
    """A certificate for 127.0.0.1 and its key, as PEM files; and the certificate's bytes."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)
    return str(cert_file), str(key_file), cert_pem


async def test_tls_when_configured(
    make_server: Callable[..., RunningServer], tmp_path: Any
) -> None:
    cert_file, key_file, cert_pem = self_signed(tmp_path)
    server = make_server(grpc_tls_cert_file=cert_file, grpc_tls_key_file=key_file)
    credentials = grpc.ssl_channel_credentials(root_certificates=cert_pem)
    async with grpc.aio.secure_channel(target(server), credentials) as channel:
        answer = await pb_grpc.TidingsStub(channel).Publish(pb.PublishRequest(channel="tls"))
    assert answer.event.channel == "tls"
    async with grpc.aio.insecure_channel(target(server)) as channel:  # plaintext is refused
        error = await refusal(
            pb_grpc.TidingsStub(channel).Publish(pb.PublishRequest(channel="tls"), timeout=2)
        )
    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_grpc_can_be_turned_off(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(grpc_enabled=False)
    assert server.node.grpc is None
    assert httpx.get(f"{server.url}/healthz", timeout=TIMEOUT).status_code == 200


def test_a_public_grpc_address_without_auth_is_refused(tmp_path: Any) -> None:
    settings = make_settings(tmp_path, grpc_host="0.0.0.0")
    with pytest.raises(ConfigError, match=r"refusing to serve 0\.0\.0\.0 without authentication"):
        asyncio.run(Tidings(settings).run())


def test_a_grpc_port_in_use_is_a_config_error(server: RunningServer, tmp_path: Any) -> None:
    # SO_REUSEPORT is off: a second node must not share the port (and half the calls) silently.
    settings = make_settings(tmp_path / "second", grpc_port=server.node.grpc_port)
    with pytest.raises(ConfigError, match="cannot listen for gRPC"):
        asyncio.run(Tidings(settings).run())


async def test_a_silent_client_is_dropped_and_its_subscription_freed(
    make_server: Callable[..., RunningServer],
) -> None:
    from test_client_grpc import Proxy

    server = make_server(grpc_keepalive_interval="500ms", grpc_keepalive_timeout="500ms")
    proxy = Proxy(server.node.grpc_port)  # bytes stop flowing, no connection closes
    async with proxy as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.TidingsStub(channel).Subscribe(pb.SubscribeRequest(channels=["q"]))
        await take(call, 1)
        assert server.hub.subscriber_count == 1
        proxy.silent = True
        deadline = time.monotonic() + TIMEOUT
        while server.hub.subscriber_count or server.node.context.limits.streams.total:
            assert time.monotonic() < deadline, "the server held the subscription"
            await asyncio.sleep(0.1)
        call.cancel()
