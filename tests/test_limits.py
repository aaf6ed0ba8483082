"""Limits: the pure token bucket, limiter, stream counter and client address with a fake clock,
then rates, open streams, channels per subscription and deadlines against a real server.

No test here sleeps to make a limit refill or measures how long anything took: the server tests
use rates of 1 per second and stop at the first refusal, so a slow machine only takes longer.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest

from conftest import RunningServer
from streaming import DEADLINE, SSEClient, envelope, wait_for
from tidings import config
from tidings.exceptions import ConfigError, TooManyConnections, TooManyRequests
from tidings.limits import (
    MAX_KEYS,
    OpenStreams,
    Proxies,
    RateLimiter,
    TokenBucket,
    client_key,
    parse_networks,
)

ServerFactory = Callable[..., RunningServer]

# -- the token bucket ----------------------------------------------------------------------------


def take_all(bucket: TokenBucket, full_at: float, now: float) -> tuple[float, int]:
    """Take tokens at ``now`` until refused; the new state and how many were taken."""
    taken = 0
    while True:
        full_at, wait = bucket.take(full_at, now)
        if wait:
            return full_at, taken
        taken += 1


def test_a_full_bucket_gives_its_burst_at_once_then_refuses_with_the_wait() -> None:
    bucket = TokenBucket(rate=10, burst=5)
    state, taken = take_all(bucket, 0.0, 100.0)
    assert taken == 5
    assert bucket.tokens(state, 100.0) == pytest.approx(0)
    _, wait = bucket.take(state, 100.0)
    assert wait == pytest.approx(0.1)  # one token comes every 1/rate seconds


def test_large_rates_give_exactly_the_burst_despite_float_error() -> None:
    bucket = TokenBucket(rate=1000, burst=2000)
    assert take_all(bucket, 0.0, 5.0)[1] == 2000


def test_tokens_come_back_at_the_rate_and_never_above_the_burst() -> None:
    bucket = TokenBucket(rate=2, burst=4)
    state, _ = take_all(bucket, 0.0, 10.0)
    assert take_all(bucket, state, 10.5)[1] == 1  # half a second: one token
    assert bucket.tokens(state, 11.0) == pytest.approx(2)
    assert bucket.tokens(state, 1000.0) == 4  # idle for long: full, not more
    assert take_all(bucket, state, 1000.0)[1] == 4


def test_a_refused_take_takes_nothing() -> None:
    bucket = TokenBucket(rate=1, burst=1)
    state, _ = bucket.take(0.0, 0.0)
    for _ in range(100):
        assert bucket.take(state, 0.5) == (state, pytest.approx(0.5))
    assert bucket.take(state, 1.0)[1] == 0.0


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (float("inf"), 1)])
def test_a_bucket_needs_a_positive_rate_and_burst(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


# -- the keyed limiter ---------------------------------------------------------------------------


def test_each_key_has_its_own_bucket() -> None:
    limiter = RateLimiter(rate=1, burst=2)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]
    assert limiter.take("b", 0.0) == 0.0
    assert limiter.take("a", 1.0) == 0.0  # refilled one


def test_the_limiter_keeps_at_most_max_keys_dropping_the_least_recently_used() -> None:
    limiter = RateLimiter(rate=1, burst=1, max_keys=3)
    for key in ("a", "b", "c"):
        limiter.take(key, 0.0)
    limiter.take("a", 0.0)  # "a" used again: "b" is now the least recent
    limiter.take("d", 0.0)
    assert len(limiter) == 3
    assert "b" not in limiter and {"a", "c", "d"} <= {k for k in "abcd" if k in limiter}


def test_memory_stays_bounded_under_a_flood_of_keys() -> None:
    limiter = RateLimiter(rate=1, burst=1, max_keys=1000)
    for i in range(20_000):
        limiter.take(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 0.0)
    assert len(limiter) == 1000
    assert MAX_KEYS == 100_000


def test_refilled_buckets_are_dropped_as_new_keys_arrive() -> None:
    limiter = RateLimiter(rate=1, burst=1, max_keys=1000)
    for i in range(100):
        limiter.take(f"old{i}", 0.0)
    for i in range(100):  # a second later every old bucket is full again: worth nothing
        limiter.take(f"new{i}", 1.0)
    assert len(limiter) == 100


def test_a_bucket_still_refilling_is_kept_while_there_is_room() -> None:
    limiter = RateLimiter(rate=1, burst=1, max_keys=1000)
    limiter.take("busy", 0.0)
    limiter.take("other", 0.5)
    assert "busy" in limiter
    assert limiter.take("busy", 0.5) == pytest.approx(0.5)


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert TooManyRequests("x", retry_after=0.003).retry_after_header == "1"
    assert TooManyRequests("x", retry_after=1.0).retry_after_header == "1"
    assert TooManyRequests("x", retry_after=2.2).retry_after_header == "3"


# -- open streams --------------------------------------------------------------------------------


def test_open_streams_are_limited_per_address_with_429() -> None:
    streams = OpenStreams(per_address=2, total=10)
    slots = [streams.acquire("10.0.0.1") for _ in range(2)]
    with pytest.raises(TooManyConnections) as refused:
        streams.acquire("10.0.0.1")
    assert refused.value.status == 429
    assert "too many open streams from 10.0.0.1 (limit 2" in refused.value.detail
    other = streams.acquire("10.0.0.2")
    assert (streams.count("10.0.0.1"), streams.count("10.0.0.2"), streams.total) == (2, 1, 3)
    for slot in [*slots, other]:
        slot.release()
    assert (streams.total, streams.addresses) == (0, 0)


def test_the_total_limit_refuses_with_503() -> None:
    streams = OpenStreams(per_address=0, total=2)
    streams.acquire("a")
    streams.acquire("b")
    with pytest.raises(TooManyConnections) as refused:
        streams.acquire("c")
    assert refused.value.status == 503
    assert "limits.max_streams" in refused.value.detail


def test_a_slot_is_given_back_once_however_often_it_is_released() -> None:
    streams = OpenStreams(per_address=5, total=5)
    keep = streams.acquire("a")
    with streams.acquire("a") as slot:
        assert streams.count("a") == 2
    slot.release()
    slot.release()
    assert streams.count("a") == 1
    keep.release()
    assert streams.total == 0


def test_zero_means_no_stream_limit_but_streams_are_still_counted() -> None:
    streams = OpenStreams(per_address=0, total=0)
    for _ in range(1000):
        streams.acquire("a")
    assert streams.count("a") == streams.total == 1000


# -- client addresses ----------------------------------------------------------------------------

PROXY = Proxies(parse_networks(["127.0.0.1", "10.1.0.0/16"]))


def test_without_trusted_proxies_the_peer_is_the_client_whatever_x_forwarded_for_says() -> None:
    assert Proxies(()).client("203.0.113.9", ["198.51.100.1"]) == "203.0.113.9"


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    assert PROXY.client("203.0.113.9", ["198.51.100.1"]) == "203.0.113.9"


def test_behind_trusted_proxies_the_rightmost_untrusted_address_is_the_client() -> None:
    # The client wrote "6.6.6.6" itself; our proxies appended what they saw, right to left.
    hops = ["6.6.6.6, 198.51.100.7", "10.1.2.3"]
    assert PROXY.client("127.0.0.1", hops) == "198.51.100.7"


def test_when_every_hop_is_trusted_the_leftmost_is_the_client() -> None:
    assert PROXY.client("127.0.0.1", ["10.1.0.5, 10.1.0.6"]) == "10.1.0.5"
    assert PROXY.client("127.0.0.1", []) == "127.0.0.1"


def test_a_hop_that_is_not_an_address_stops_at_the_proxy_that_wrote_it() -> None:
    assert PROXY.client("127.0.0.1", ["unknown, 10.1.0.9"]) == "10.1.0.9"


def test_forwarded_addresses_may_carry_ports_and_brackets() -> None:
    assert PROXY.client("127.0.0.1", ["198.51.100.7:5555"]) == "198.51.100.7"
    assert PROXY.client("127.0.0.1", ["[2001:db8::1]:443"]) == "2001:db8::/64"


def test_ipv6_clients_are_counted_by_their_64_network_and_mapped_ipv4_as_ipv4() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("::1") == "::1"
    assert client_key("192.0.2.1") == "192.0.2.1"


def test_a_trusted_proxy_that_is_not_an_address_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=re.escape("limits.trusted_proxies: 'proxy.local'")):
        parse_networks(["proxy.local"])


# -- configuration -------------------------------------------------------------------------------


def test_limits_have_generous_defaults() -> None:
    limits = config.load(None, environ={}).limits
    assert (limits.publish_rate, limits.publish_burst) == (1000, 2000)
    assert (limits.subscribe_rate, limits.subscribe_burst) == (1000, 2000)
    assert (limits.credential_publish_rate, limits.credential_publish_burst) == (1000, 2000)
    assert (limits.credential_subscribe_rate, limits.credential_subscribe_burst) == (100, 200)
    assert (limits.max_streams_per_address, limits.max_streams) == (1000, 10_000)
    assert limits.max_channels == 64
    assert limits.trusted_proxies == ()
    assert (limits.header_timeout, limits.idle_timeout) == (10.0, 30.0)


def test_limits_come_from_the_environment() -> None:
    env = {"TIDINGS_LIMITS_PUBLISH_RATE": "0", "TIDINGS_LIMITS_TRUSTED_PROXIES": "10.0.0.0/8, ::1",
           "TIDINGS_LIMITS_IDLE_TIMEOUT": "1m"}  # fmt: skip
    limits = config.load(None, environ=env).limits
    assert limits.publish_rate == 0
    assert limits.trusted_proxies == ("10.0.0.0/8", "::1")
    assert limits.idle_timeout == 60


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TIDINGS_LIMITS_PUBLISH_RATE", "-1", "must be 0 (no limit) or more"),
        ("TIDINGS_LIMITS_MAX_STREAMS", "-5", "must be 0 (no limit) or more"),
        ("TIDINGS_LIMITS_SUBSCRIBE_BURST", "0", "subscribe_burst must be at least 1"),
        ("TIDINGS_LIMITS_MAX_CHANNELS", "0", "greater than 0"),
        ("TIDINGS_LIMITS_HEADER_TIMEOUT", "0", "greater than 0"),
        ("TIDINGS_LIMITS_IDLE_TIMEOUT", "0s", "greater than 0"),
        ("TIDINGS_LIMITS_TRUSTED_PROXIES", "10.0.0.0/8,lb", "'lb' is not an IP address"),
    ],
)
def test_bad_limits_are_refused_with_the_setting_named(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(None, environ={variable: value})


def test_a_zero_rate_needs_no_burst() -> None:
    env = {"TIDINGS_LIMITS_PUBLISH_RATE": "0", "TIDINGS_LIMITS_PUBLISH_BURST": "0"}
    assert config.load(None, environ=env).limits.publish_burst == 0


# -- rates against a real server -----------------------------------------------------------------


def until_refused(send: Callable[[], httpx.Response], allowed: int) -> httpx.Response:
    """Send ``allowed`` requests that must pass, then more until one is refused (bounded)."""
    for _ in range(allowed):
        response = send()
        assert response.status_code in (200, 201), response.text
    for _ in range(50):  # at 1 token per second, only a very slow machine needs more than one
        response = send()
        if response.status_code == 429:
            return response
    raise AssertionError("no request was refused")


def forwarded(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


@pytest.fixture
def client() -> Iterator[Callable[[RunningServer], httpx.Client]]:
    clients: list[httpx.Client] = []

    def make(server: RunningServer) -> httpx.Client:
        clients.append(httpx.Client(base_url=server.url, timeout=DEADLINE))
        return clients[-1]

    yield make
    for c in clients:
        c.close()


def test_past_the_publish_rate_a_client_gets_429_with_retry_after_and_the_reason(
    make_server: ServerFactory, client: Callable[[RunningServer], httpx.Client]
) -> None:
    server = make_server(limits_publish_rate=1, limits_publish_burst=2)
    c = client(server)
    refused = until_refused(lambda: c.post("/channels/a", json=1), allowed=2)
    assert refused.headers["retry-after"] == "1"
    body = refused.json()
    assert body["error"] == "rate_limited"
    detail = body["detail"]
    assert "publish rate limit for address 127.0.0.1: 1 requests per second, burst 2" in detail
    assert "(limits.publish_rate); retry in " in detail and detail.endswith(" s")
    batch = c.post("/publish", json={"events": [{"channel": "a", "data": 1}]})
    assert batch.status_code == 429  # a batch is one publish request
    # Subscribing has its own budget.
    assert c.get("/poll", params={"channel": "a"}).status_code == 200


def test_a_page_on_an_allowed_origin_can_read_retry_after(
    make_server: ServerFactory, client: Callable[[RunningServer], httpx.Client]
) -> None:
    app = "https://app.example.com"
    server = make_server(limits_publish_rate=1, limits_publish_burst=1, http_origins=app)
    c = client(server)
    refused = until_refused(lambda: c.post("/channels/a", json=1, headers={"Origin": app}), 1)
    assert refused.headers["access-control-allow-origin"] == app
    assert "Retry-After" in refused.headers["access-control-expose-headers"]


def test_a_limited_address_does_not_affect_another_behind_a_trusted_proxy(
    make_server: ServerFactory, client: Callable[[RunningServer], httpx.Client]
) -> None:
    server = make_server(
        limits_publish_rate=1, limits_publish_burst=2, limits_trusted_proxies="127.0.0.1"
    )
    c = client(server)
    first = forwarded("198.51.100.1")
    refused = until_refused(lambda: c.post("/channels/a", json=1, headers=first), allowed=2)
    assert "for address 198.51.100.1:" in refused.json()["detail"]
    other = c.post("/channels/a", json=1, headers=forwarded("198.51.100.2"))
    assert other.status_code == 201, other.text


@pytest.mark.parametrize("trusted", ["", "10.9.9.9"])
def test_x_forwarded_for_is_ignored_when_the_peer_is_not_a_trusted_proxy(
    make_server: ServerFactory, client: Callable[[RunningServer], httpx.Client], trusted: str
) -> None:
    server = make_server(
        limits_publish_rate=1, limits_publish_burst=2, limits_trusted_proxies=trusted
    )
    c = client(server)
    first = forwarded("198.51.100.1")
    until_refused(lambda: c.post("/channels/a", json=1, headers=first), allowed=2)
    spoofed = c.post("/channels/a", json=1, headers=forwarded("198.51.100.2"))
    assert spoofed.status_code == 429
    assert "for address 127.0.0.1:" in spoofed.json()["detail"]


def test_streams_polls_and_history_reads_share_the_subscribe_rate(
    make_server: ServerFactory, client: Callable[[RunningServer], httpx.Client]
) -> None:
    server = make_server(limits_subscribe_rate=1, limits_subscribe_burst=3)
    c = client(server)
    assert c.get("/history", params={"channel": "a"}).status_code == 200
    assert c.get("/poll", params={"channel": "a"}).status_code == 200
    with SSEClient(server.url, "a") as stream:
        assert stream.response.status_code == 200

    def open_stream() -> httpx.Response:
        with c.stream("GET", "/sse", params={"channel": "a"}) as response:
            if response.status_code != 200:
                response.read()
            return response  # a stream that opened is closed again here

    refused = until_refused(open_stream, allowed=0)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == "rate_limited"
    assert "(limits.subscribe_rate)" in refused.json()["detail"]
    assert c.post("/channels/a", json=1).status_code == 201  # publishing is not affected


def test_with_auth_each_credential_has_its_own_rate(
    make_server: ServerFactory, client: Callable[[RunningServer], httpx.Client]
) -> None:
    secret = "a-secret-for-the-limits-tests-32-bytes-long"
    server = make_server(
        auth_jwt_algorithms="HS256",
        auth_jwt_secret=secret,
        limits_credential_publish_rate=1,
        limits_credential_publish_burst=2,
    )

    def token(subject: str) -> dict[str, str]:
        claims = {"sub": subject, "exp": int(time.time()) + 600,
                  "tidings": {"publish": ["**"], "subscribe": ["**"]}}  # fmt: skip
        return {"Authorization": f"Bearer {jwt.encode(claims, secret, algorithm='HS256')}"}

    c = client(server)
    alice = token("alice")
    refused = until_refused(lambda: c.post("/channels/a", json=1, headers=alice), allowed=2)
    detail = refused.json()["detail"]
    assert "publish rate limit for credential 'alice'" in detail
    assert "(limits.credential_publish_rate)" in detail
    assert c.post("/channels/a", json=1, headers=token("bob")).status_code == 201


def test_a_zero_rate_turns_the_limit_off(
    make_server: ServerFactory, client: Callable[[RunningServer], httpx.Client]
) -> None:
    server = make_server(limits_publish_rate=0, limits_publish_burst=0)
    c = client(server)
    for _ in range(20):
        assert c.post("/channels/a", json=1).status_code == 201


# -- open streams against a real server ----------------------------------------------------------


def open_streams(server: RunningServer) -> OpenStreams:
    streams: OpenStreams = server.node.context.limits.streams
    return streams


def sse_refusal(server: RunningServer, address: str) -> httpx.Response:
    with (
        httpx.Client(base_url=server.url, timeout=DEADLINE) as c,
        c.stream("GET", "/sse", params={"channel": "a"}, headers=forwarded(address)) as r,
    ):
        r.read()
        return r


def test_open_streams_per_address_are_limited_and_counted_back_to_zero(
    make_server: ServerFactory,
) -> None:
    server = make_server(limits_max_streams_per_address=2, limits_trusted_proxies="127.0.0.1")
    first = forwarded("198.51.100.1")
    streams = [SSEClient(server.url, "a", headers=first) for _ in range(2)]
    try:
        for stream in streams:
            stream.subscribed()
        subscribers = server.hub.subscriber_count
        refused = sse_refusal(server, "198.51.100.1")
        assert refused.status_code == 429
        body = refused.json()
        assert body["error"] == "too_many_connections"
        assert "too many open streams from 198.51.100.1 (limit 2" in body["detail"]
        assert server.hub.subscriber_count == subscribers  # refused before subscribing
        with SSEClient(server.url, "a", headers=forwarded("198.51.100.2")) as other:
            other.subscribed()
        assert open_streams(server).count("198.51.100.1") == 2
    finally:
        for stream in streams:
            stream.close()
    wait_for(lambda: open_streams(server).total == 0, what="open streams to be released")
    assert open_streams(server).addresses == 0
    with SSEClient(server.url, "a", headers=first) as again:
        assert again.response.status_code == 200
        again.subscribed()


def test_a_held_long_poll_counts_as_an_open_stream_and_a_short_poll_does_not(
    make_server: ServerFactory, client: Callable[[RunningServer], httpx.Client]
) -> None:
    server = make_server(limits_max_streams_per_address=1)
    c = client(server)
    held: dict[str, Any] = {}

    def long_poll() -> None:
        held["response"] = c.get("/poll", params={"channel": "held", "wait": "30"})

    thread = threading.Thread(target=long_poll)
    thread.start()
    try:
        wait_for(lambda: open_streams(server).total == 1, what="the long poll to be held")
        wait_for(lambda: server.hub.subscriber_count == 1, what="the long poll to subscribe")
        refused = sse_refusal(server, "198.51.100.1")  # no trusted proxy: counted as 127.0.0.1
        assert refused.status_code == 429 and "(limit 1" in refused.json()["detail"]
        with httpx.Client(base_url=server.url, timeout=DEADLINE) as other:
            assert other.get("/poll", params={"channel": "a"}).status_code == 200
            assert other.get("/poll", params={"channel": "a", "wait": "1"}).status_code == 429
            assert other.post("/channels/held", json=1).status_code == 201  # ends the wait
    finally:
        thread.join(DEADLINE)
    assert held["response"].status_code == 200
    wait_for(lambda: open_streams(server).total == 0, what="the long poll to be released")


def test_the_server_wide_stream_limit_refuses_with_503(make_server: ServerFactory) -> None:
    server = make_server(limits_max_streams=1, limits_trusted_proxies="127.0.0.1")
    with SSEClient(server.url, "a", headers=forwarded("198.51.100.1")) as stream:
        stream.subscribed()
        refused = sse_refusal(server, "198.51.100.2")
        assert refused.status_code == 503
        assert refused.json()["error"] == "too_many_connections"
        assert "limits.max_streams" in refused.json()["detail"]
    wait_for(lambda: open_streams(server).total == 0, what="the stream to be released")


# -- channels per subscription -------------------------------------------------------------------


def test_channels_per_subscription_follow_max_channels(
    make_server: ServerFactory, client: Callable[[RunningServer], httpx.Client]
) -> None:
    server = make_server(limits_max_channels=2)
    c = client(server)
    assert c.get("/poll", params=[("channel", "a"), ("channel", "b")]).status_code == 200
    for path in ("/poll", "/history", "/sse"):
        response = c.get(path, params=[("channel", x) for x in "abc"])
        assert response.status_code == 400
        assert "at most 2 channel parameters (limits.max_channels), not 3" in response.text


def test_by_default_64_channels_are_allowed_and_65_are_not(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, timeout=DEADLINE) as c:
        many = [("channel", f"c{i}") for i in range(65)]
        assert c.get("/poll", params=many[:64]).status_code == 200
        assert c.get("/poll", params=many).status_code == 400


# -- deadlines -----------------------------------------------------------------------------------


def connect(server: RunningServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.node.port), timeout=DEADLINE)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_headers_that_do_not_arrive_in_time_get_408_and_the_connection_closes(
    make_server: ServerFactory,
) -> None:
    server = make_server(limits_header_timeout="200ms")
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: tidings\r\nX-Slow: ")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b'"error":"request_timeout"' in answer and b"limits.header_timeout" in answer


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    make_server: ServerFactory,
) -> None:
    server = make_server(limits_header_timeout="200ms")
    with connect(server) as sock:
        assert read_until_closed(sock) == b""


def test_the_header_deadline_restarts_for_each_request_on_a_kept_alive_connection(
    make_server: ServerFactory,
) -> None:
    server = make_server(limits_header_timeout="200ms")
    request = b"GET /healthz HTTP/1.1\r\nHost: tidings\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(request)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 OK")
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408")


def test_a_stalled_request_behind_a_stream_closes_the_connection_without_a_stray_408(
    make_server: ServerFactory,
) -> None:
    server = make_server(limits_header_timeout="200ms")
    with connect(server) as sock:
        sock.sendall(b"GET /sse?channel=a HTTP/1.1\r\nHost: tidings\r\n\r\n")
        received = b""
        while b"tidings.subscribed" not in received:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # pipelined, and never finished
        rest = read_until_closed(sock)
    assert b"408" not in rest


def test_an_idle_kept_alive_connection_is_closed_after_idle_timeout(
    make_server: ServerFactory,
) -> None:
    server = make_server(limits_idle_timeout="1s", limits_header_timeout="60s")
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: tidings\r\n\r\n")
        answer = read_until_closed(sock)  # the response, then the close after 1 s idle
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"}")


def test_a_stream_outlives_the_header_deadline(make_server: ServerFactory) -> None:
    server = make_server(limits_header_timeout="200ms")
    with SSEClient(server.url, "a") as stream:
        stream.subscribed()
        time.sleep(0.5)  # past the header deadline: it ended with the headers
        with httpx.Client(base_url=server.url, timeout=DEADLINE) as c:
            assert c.post("/channels/a", json="still here").status_code == 201
        assert envelope(stream.events(1)[0])["data"] == "still here"
