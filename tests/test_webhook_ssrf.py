"""SSRF protection for webhook deliveries: blocked ranges, literal notations, resolution at
connect time, allow-list, redirects, proxies and TLS, against real local receivers; and the
sender over a safe session (a kept-alive connection the receiver closed, the body it reads)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tidings.exceptions import BadRequest
from tidings.webhooks.delivery import RESPONSE_HEAD, HttpSender, Response
from tidings.webhooks.ssrf import (
    BLOCKED,
    AddressPolicy,
    BlockedAddress,
    InvalidEndpoint,
    SafeResolver,
    blocked_range,
    ip_literal,
    safe_session,
)

LOCAL = AddressPolicy(["127.0.0.0/8", "::1/128"], allow_http=True)


# -- the range table --------------------------------------------------------------------------

# One address per blocked range, with the name it must be refused under.
SAMPLES = [
    ("0.0.0.0", "unspecified ('this network')"),
    ("0.1.2.3", "unspecified ('this network')"),
    ("10.1.2.3", "private (RFC 1918)"),
    ("100.64.0.1", "shared address space (CGNAT)"),
    ("100.100.100.200", "shared address space (cloud metadata)"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("169.254.1.1", "link-local"),
    ("169.254.169.254", "link-local (cloud metadata)"),
    ("172.16.0.1", "private (RFC 1918)"),
    ("172.31.255.255", "private (RFC 1918)"),
    ("192.0.0.8", "IETF protocol assignments"),
    ("192.0.2.1", "documentation (TEST-NET-1)"),
    ("192.88.99.1", "6to4 relay anycast"),
    ("192.168.1.1", "private (RFC 1918)"),
    ("198.19.0.1", "benchmarking (RFC 2544)"),
    ("198.51.100.1", "documentation (TEST-NET-2)"),
    ("203.0.113.1", "documentation (TEST-NET-3)"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "limited broadcast"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("::127.0.0.1", "reserved"),  # IPv4-compatible, deprecated
    ("::ffff:0:7f00:1", "reserved"),  # SIIT IPv4-translated
    ("::ffff:127.0.0.1", "IPv4-mapped 127.0.0.1, which is loopback"),
    ("::ffff:169.254.169.254", "IPv4-mapped 169.254.169.254, which is link-local (cloud metadata)"),
    ("::ffff:0.0.0.0", "IPv4-mapped 0.0.0.0, which is unspecified ('this network')"),
    ("64:ff9b::10.0.0.1", "NAT64 of 10.0.0.1, which is private (RFC 1918)"),
    ("64:ff9b::127.0.0.1", "NAT64 of 127.0.0.1, which is loopback"),
    ("64:ff9b:1::8.8.8.8", "NAT64 local-use"),
    ("100::1", "discard-only (RFC 6666)"),
    ("2001::1", "Teredo"),
    ("2001:2::1", "benchmarking (RFC 5180)"),
    ("2001:10::1", "ORCHID (deprecated)"),
    ("2001:db8::1", "documentation"),
    ("2002:7f00:1::1", "6to4 of 127.0.0.1, which is loopback"),
    ("3fff::1", "documentation (RFC 9637)"),
    ("5f00::1", "SRv6 SIDs (RFC 9602)"),
    ("fc00::1", "unique local (ULA)"),
    ("fd12:3456::1", "unique local (ULA)"),
    ("fd00:ec2::254", "unique local (cloud metadata)"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fec0::1", "site-local (deprecated)"),
    ("ff02::1", "multicast"),
]

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "100.63.255.255",  # just below CGNAT
    "100.128.0.0",  # just above
    "172.32.0.1",  # just above 172.16/12
    "2606:4700:4700::1111",
    "2a00:1450:4001::200e",
    "::ffff:8.8.8.8",  # mapped: judged by the IPv4 inside
    "64:ff9b::8.8.8.8",  # NAT64 (DNS64 on an IPv6-only host) of a public address
    "2002:808:808::1",  # 6to4 of a public address
]


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(("address", "name"), SAMPLES)
def test_blocked_address_is_refused_under_its_range_name(address: str, name: str) -> None:
    assert blocked_range(_address(address)) == name
    with pytest.raises(BlockedAddress) as caught:
        AddressPolicy().check_address(address)
    assert caught.value.reason == name
    assert str(caught.value) == f"{caught.value.address} is {name}"
    assert isinstance(caught.value, BadRequest)
    assert (caught.value.status, caught.value.code) == (400, "blocked_address")


def test_every_range_of_the_table_has_a_sample() -> None:
    samples = [_address(text.split("%")[0]) for text, _ in SAMPLES]
    for network, name in BLOCKED:
        assert any(address in network for address in samples), (network, name)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_address_passes(address: str) -> None:
    assert blocked_range(_address(address)) is None
    AddressPolicy().check_address(address)


def test_metadata_address_message_names_the_range() -> None:
    with pytest.raises(
        BlockedAddress, match=r"^169\.254\.169\.254 is link-local \(cloud metadata\)$"
    ):
        AddressPolicy().check_address("169.254.169.254")


def test_allow_list_opens_exceptions_only_for_its_networks() -> None:
    policy = AddressPolicy(["127.0.0.0/8", ipaddress.ip_network("fd00::/8")])
    policy.check_address("127.0.0.1")
    policy.check_address("127.9.9.9")
    policy.check_address("::ffff:127.0.0.1")  # the same host, on the wire
    policy.check_address("fd00:ec2::254")
    for address in ("10.0.0.1", "::1", "169.254.169.254", "64:ff9b::127.0.0.1"):
        with pytest.raises(BlockedAddress):
            policy.check_address(address)


# -- URLs and literal notations ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://2130706433/", "127.0.0.1 is loopback"),  # decimal
        ("https://0x7f000001/", "127.0.0.1 is loopback"),  # hex
        ("https://0X7F000001/", "127.0.0.1 is loopback"),
        ("https://0177.0.0.1/", "127.0.0.1 is loopback"),  # octal
        ("https://0177.0000.0000.0001/", "127.0.0.1 is loopback"),
        ("https://127.1/", "127.0.0.1 is loopback"),  # short form
        ("https://127.0.1/", "127.0.0.1 is loopback"),
        ("https://0x7f.1/", "127.0.0.1 is loopback"),  # mixed
        ("https://127.0.0.1./", "127.0.0.1 is loopback"),  # trailing dot
        ("https://127.0.0.1:8443/hook", "127.0.0.1 is loopback"),
        ("https://[::1]/", "::1 is loopback"),
        ("https://[::ffff:127.0.0.1]/", "IPv4-mapped 127.0.0.1, which is loopback"),
        ("https://[::ffff:7f00:1]/", "IPv4-mapped 127.0.0.1, which is loopback"),
        ("https://169.254.169.254/latest/meta-data/", "link-local (cloud metadata)"),
        ("https://2852039166/", "169.254.169.254 is link-local (cloud metadata)"),
        ("https://0xa9fea9fe/", "169.254.169.254 is link-local (cloud metadata)"),
        ("https://0251.0376.0251.0376/", "169.254.169.254 is link-local (cloud metadata)"),
        ("https://[64:ff9b::a9fe:a9fe]/", "NAT64 of 169.254.169.254, which is link-local"),
        ("https://[fd00:ec2::254]/", "unique local (cloud metadata)"),
        ("https://0/", "0.0.0.0 is unspecified"),
        ("https://[::]/", ":: is unspecified"),
        ("https://012.1/", "10.0.0.1 is private (RFC 1918)"),
        ("https://0xc0a80001/", "192.168.0.1 is private (RFC 1918)"),
        ("https://100.64.0.1/", "shared address space (CGNAT)"),
        ("https://[fe80::1%25eth0]/", "fe80::1 is link-local"),
        ("https://[FF02::1]/", "ff02::1 is multicast"),
    ],
)
def test_ip_literal_in_any_notation_is_normalised_and_refused(url: str, message: str) -> None:
    with pytest.raises(BlockedAddress, match=re.escape(message)):
        AddressPolicy().check_url(url)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f.0.1", "127.0.0.1"),
        ("0x", "0.0.0.0"),
        ("8.8.8.8", "8.8.8.8"),
        ("[::1]", "::1"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
    ],
)
def test_ip_literal_reads_the_notations_inet_aton_reads(host: str, address: str) -> None:
    assert ip_literal(host) == _address(address)


@pytest.mark.parametrize("host", ["example.com", "hooks.example.com.", "0x7f.example", "localhost"])
def test_names_are_not_literals(host: str) -> None:
    assert ip_literal(host) is None


@pytest.mark.parametrize(
    "url",
    [
        "https://1.2.3.4.5/",  # five parts
        "https://1.2.3.256/",
        "https://1.16777216/",  # the last part overflows its three bytes
        "https://08.0.0.1/",  # 8 is not an octal digit
        "https://1..2.3/",
        "https://example.123/",  # a name cannot end in a number
        "https://[::g]/",
    ],
)
def test_malformed_ip_literal_is_refused(url: str) -> None:
    with pytest.raises(InvalidEndpoint):
        AddressPolicy().check_url(url)


def test_http_is_refused_unless_allowed() -> None:
    with pytest.raises(InvalidEndpoint, match="scheme must be https"):
        AddressPolicy().check_url("http://hooks.example.com/")
    AddressPolicy(allow_http=True).check_url("http://hooks.example.com/")
    AddressPolicy().check_url("https://hooks.example.com/")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.example.com/",
        "file:///etc/passwd",
        "gopher://hooks.example.com/",
        "hooks.example.com/path",
        "https://user:secret@hooks.example.com/",
        "https://8.8.8.8@127.0.0.1/",
        "https:///path",
        "https://hooks.example.com:99999/",
        "https://hooks.example.com:port/",
    ],
)
def test_endpoint_url_of_the_wrong_shape_is_refused(url: str) -> None:
    with pytest.raises(InvalidEndpoint) as caught:
        AddressPolicy(allow_http=True).check_url(url)
    assert (caught.value.status, caught.value.code) == (400, "invalid_endpoint")


# -- the resolver, with the loop's connect recorded underneath -------------------------------


class Connects:
    """Records every address a socket is connected to (the loop's ``sock_connect``, which
    aiohttp's connector uses). Only loopback connects for real: others, and those in
    ``refuse``, are refused, so nothing leaves the machine."""

    def __init__(self, connect: Callable[[socket.socket, Any], Awaitable[None]]) -> None:
        self.calls: list[tuple[str, int]] = []
        self.refuse: set[str] = set()
        self._connect = connect

    async def __call__(self, sock: socket.socket, address: Any) -> None:
        host, port = address[0], address[1]
        self.calls.append((host, port))
        if host in self.refuse or not ipaddress.ip_address(host).is_loopback:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"{host} refused")
        await self._connect(sock, address)


@pytest.fixture
async def connects(monkeypatch: pytest.MonkeyPatch) -> Connects:
    loop = asyncio.get_running_loop()
    recorder = Connects(loop.sock_connect)
    monkeypatch.setattr(loop, "sock_connect", recorder)
    return recorder


class FakeResolver:
    def __init__(self, table: dict[str, Sequence[str]]) -> None:
        self.table = table
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[host]


async def test_resolver_connects_to_the_checked_literal_after_one_lookup(
    connects: Connects,
) -> None:
    resolver = FakeResolver({"hooks.example.com": ["93.184.215.14"]})
    [found] = await SafeResolver(AddressPolicy(), resolver).resolve("hooks.example.com", 443)
    assert (found["hostname"], found["host"], found["port"]) == ("hooks.example.com",
                                                                 "93.184.215.14", 443)  # fmt: skip
    async with safe_session(AddressPolicy(), 5, resolver=resolver) as session:
        with pytest.raises(aiohttp.ClientConnectorError):  # refused by the recorder
            await session.post("https://hooks.example.com/", data=b"{}")
    assert connects.calls == [("93.184.215.14", 443)]  # never the name: nothing left to rebind
    assert resolver.lookups == ["hooks.example.com"] * 2


async def test_resolver_refuses_a_name_resolving_inward_without_connecting(
    connects: Connects,
) -> None:
    resolver = FakeResolver({"hooks.example.com": ["127.0.0.1"]})
    with pytest.raises(BlockedAddress, match=r"hooks\.example\.com resolves to 127\.0\.0\.1"):
        await SafeResolver(AddressPolicy(), resolver).resolve("hooks.example.com", 443)
    async with safe_session(AddressPolicy(), 5, resolver=resolver) as session:
        with pytest.raises(BlockedAddress, match=r"hooks\.example\.com resolves to 127\.0\.0\.1"):
            await session.post("https://hooks.example.com/", data=b"{}")
    assert connects.calls == []


async def test_resolver_refuses_a_mix_of_public_and_blocked_addresses(connects: Connects) -> None:
    resolver = FakeResolver({"rebind.example": ["93.184.215.14", "169.254.169.254"]})
    with pytest.raises(BlockedAddress, match="cloud metadata"):
        await SafeResolver(AddressPolicy(), resolver).resolve("rebind.example", 443)
    async with safe_session(AddressPolicy(), 5, resolver=resolver) as session:
        with pytest.raises(BlockedAddress, match="cloud metadata"):
            await session.post("https://rebind.example/", data=b"{}")
    assert connects.calls == []  # not even the public one


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "::1", "::ffff:127.0.0.1"]
)
async def test_resolver_normalises_literal_hosts_without_a_lookup(
    host: str, connects: Connects
) -> None:
    resolver = FakeResolver({})
    with pytest.raises(BlockedAddress, match="loopback"):
        await SafeResolver(AddressPolicy(), resolver).resolve(host, 80)
    assert connects.calls == [] and resolver.lookups == []


async def test_resolver_connects_to_the_ipv4_behind_a_mapped_address(connects: Connects) -> None:
    resolver = FakeResolver({"hooks.example.com": ["::ffff:93.184.215.14", "93.184.215.14"]})
    found = await SafeResolver(AddressPolicy(), resolver).resolve("hooks.example.com", 443)
    assert [(f["host"], f["family"]) for f in found] == [("93.184.215.14", socket.AF_INET)]
    async with safe_session(AddressPolicy(), 5, resolver=resolver) as session:
        with pytest.raises(aiohttp.ClientConnectorError):
            await session.post("https://hooks.example.com/", data=b"{}")
    assert connects.calls == [("93.184.215.14", 443)]


async def test_the_next_checked_address_is_tried_when_one_refuses(connects: Connects) -> None:
    # aiohttp's connector (happy eyeballs, one address after another) does this itself.
    resolver = FakeResolver({"hooks.example.com": ["2606:4700::1", "127.0.0.1"]})
    async with receiver() as target, safe_session(LOCAL, 5, resolver=resolver) as session:
        answer = await session.post(f"http://hooks.example.com:{target.port}/", data=b"{}")
        assert answer.status == 204
        answer.release()
    assert connects.calls == [("2606:4700::1", target.port), ("127.0.0.1", target.port)]
    assert len(target.requests) == 1


async def test_an_unresolvable_name_is_a_clear_connection_error(connects: Connects) -> None:
    with pytest.raises(OSError, match=r"cannot resolve nowhere\.example"):
        await SafeResolver(AddressPolicy(), FakeResolver({})).resolve("nowhere.example", 443)
    async with safe_session(AddressPolicy(), 5, resolver=FakeResolver({})) as session:
        with pytest.raises(
            aiohttp.ClientConnectorDNSError, match=r"\[cannot resolve nowhere\.example: Name"
        ):
            await session.post("https://nowhere.example/", data=b"{}")
    assert connects.calls == []


async def test_a_name_resolving_to_nothing_is_a_clear_connection_error() -> None:
    resolver = FakeResolver({"empty.example": []})
    async with safe_session(AddressPolicy(), 5, resolver=resolver) as session:
        with pytest.raises(aiohttp.ClientConnectorDNSError, match="resolves to no address"):
            await session.post("https://empty.example/", data=b"{}")


async def test_the_session_never_connects_to_a_unix_socket() -> None:
    async with safe_session(AddressPolicy(allow_http=True), 5) as session:
        assert isinstance(session.connector, aiohttp.TCPConnector)
        assert not isinstance(session.connector, aiohttp.UnixConnector)
        with pytest.raises(aiohttp.NonHttpUrlClientError):  # before our URL check, even
            await session.post("unix:///run/x.sock", data=b"{}")


async def test_resolution_is_bounded_by_the_request_timeout(connects: Connects) -> None:
    async def slow(host: str, port: int) -> Sequence[str]:
        await asyncio.sleep(10)
        return ["93.184.215.14"]

    async with safe_session(AddressPolicy(), 0.05, resolver=slow) as session:
        with pytest.raises(TimeoutError):  # the session's timeout
            await session.post("https://hooks.example.com/", data=b"{}")
        with pytest.raises(TimeoutError):  # a request's own
            timeout = aiohttp.ClientTimeout(total=0.05)
            await session.post("https://hooks.example.com/", data=b"{}", timeout=timeout)
    async with safe_session(AddressPolicy(), 10, resolver=slow) as session:
        assert await HttpSender(session)("https://hooks.example.com/", b"{}", {}, 0.05) == (
            Response(None, "timeout")
        )
    assert connects.calls == []


# -- through a real client, against real receivers --------------------------------------------


class Receiver:
    """A tiny HTTP/1.1 server that records every connection and request it gets."""

    def __init__(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        self.status = status
        self.headers = headers
        self.connections = 0
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            fields = dict(line.split(":", 1) for line in lines[1:] if line)
            headers = {name.strip().lower(): value.strip() for name, value in fields.items()}
            await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append((method, target, headers))
            extra = "".join(f"{name}: {value}\r\n" for name, value in self.headers)
            writer.write(
                f"HTTP/1.1 {self.status} Answer\r\ncontent-length: 0\r\n"
                f"connection: close\r\n{extra}\r\n".encode()
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def receiver(
    status: int = 204,
    headers: Sequence[tuple[str, str]] = (),
    host: str = "127.0.0.1",
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[Receiver]:
    answer = Receiver(status, headers)
    server = await asyncio.start_server(answer.serve, host, 0, ssl=tls)
    answer.port = server.sockets[0].getsockname()[1]
    try:
        yield answer
    finally:
        server.close()
        await server.wait_closed()


async def test_localhost_is_refused_and_no_request_reaches_the_receiver() -> None:
    async with receiver() as target, safe_session(AddressPolicy(allow_http=True), 5) as session:
        with pytest.raises(BlockedAddress, match=r"^localhost resolves to .*, which is loopback$"):
            await session.post(f"http://localhost:{target.port}/hook", data=b"{}")
    assert target.connections == 0


async def test_hostname_resolving_to_loopback_is_refused() -> None:
    resolver = FakeResolver({"hooks.example.com": ["127.0.0.1"]})
    policy = AddressPolicy(allow_http=True)
    async with receiver() as target, safe_session(policy, 5, resolver=resolver) as session:
        with pytest.raises(BlockedAddress, match=r"resolves to 127\.0\.0\.1, which is loopback"):
            await session.post(f"http://hooks.example.com:{target.port}/", data=b"{}")
    assert target.connections == 0


# aiohttp skips the resolver for hosts that look numeric (``is_ip_address``: digits and dots, or
# a colon) and yarl reads some spellings its own way ("１２７" is 127, "[::ffff:127.0.0.1]" is
# "::ffff:7f00:1"): each must be refused before any connection, and without a lookup.
@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "2130706433", "0x7f000001", "0177.0.0.1", "0x7f.1", "127.1", "127.0.0.1.",
     "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::1]", "１２７.0.0.1"],
)  # fmt: skip
async def test_loopback_literal_is_refused_before_connecting(host: str, connects: Connects) -> None:
    resolver = FakeResolver({})
    policy = AddressPolicy(allow_http=True)
    async with receiver() as target, safe_session(policy, 5, resolver=resolver) as session:
        with pytest.raises(BlockedAddress, match="loopback"):
            await session.post(f"http://{host}:{target.port}/", data=b"{}")
        sender = HttpSender(session)
        answer = await sender(f"http://{host}:{target.port}/", b"{}", {}, 5)
        assert answer.status is None and answer.error is not None
        assert answer.error.startswith("blocked_address: ") and "loopback" in answer.error
    assert target.connections == 0 and connects.calls == [] and resolver.lookups == []


async def test_allow_list_reaches_the_receiver_with_the_hostname_as_host(
    connects: Connects,
) -> None:
    resolver = FakeResolver({"hooks.example.com": ["127.0.0.1"]})
    async with receiver() as target, safe_session(LOCAL, 5, resolver=resolver) as session:
        url = f"http://hooks.example.com:{target.port}/hook"
        async with session.post(url, data=b"{}") as answer:
            assert answer.status == 204
    [(method, path, headers)] = target.requests
    assert (method, path) == ("POST", "/hook")
    assert headers["host"] == f"hooks.example.com:{target.port}"
    assert connects.calls == [("127.0.0.1", target.port)]


async def test_http_endpoint_is_refused_unless_allowed() -> None:
    policy = AddressPolicy(["127.0.0.0/8"])
    async with receiver() as target, safe_session(policy, 5) as session:
        with pytest.raises(InvalidEndpoint, match="scheme must be https"):
            await session.post(f"http://127.0.0.1:{target.port}/", data=b"{}")
    assert target.connections == 0


async def test_redirect_inward_is_not_followed() -> None:
    try:
        inward_ctx = receiver(host="127.0.0.2")
        inward = await inward_ctx.__aenter__()
    except OSError:
        pytest.skip("cannot listen on 127.0.0.2")
    try:
        location = f"http://127.0.0.2:{inward.port}/internal"
        # The "public" endpoint is the only allowed address; it answers with a redirect inward.
        policy = AddressPolicy(["127.0.0.1/32"], allow_http=True)
        async with receiver(302, [("location", location)]) as public:
            async with safe_session(policy, 5) as session:
                sender = HttpSender(session)
                answer = await sender(f"http://127.0.0.1:{public.port}/", b"{}", {}, 5)
                assert answer.status == 302 and answer.error is None
                # Even a caller that asks to follow it cannot reach the inward address.
                with pytest.raises(BlockedAddress, match=r"127\.0\.0\.2 is loopback"):
                    await session.get(f"http://127.0.0.1:{public.port}/", allow_redirects=True)
            assert len(public.requests) == 2
        assert inward.connections == 0
    finally:
        await inward_ctx.__aexit__(None, None, None)


async def test_proxies_from_the_environment_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    async with receiver() as proxy, receiver() as target:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        async with safe_session(LOCAL, 5) as session:
            async with session.post(f"http://127.0.0.1:{target.port}/", data=b"{}") as answer:
                assert answer.status == 204
            with pytest.raises(BlockedAddress):
                await session.post("http://10.0.0.1/", data=b"{}")
            # Nor one a caller names.
            with pytest.raises(InvalidEndpoint, match="proxy"):
                await session.post(f"http://127.0.0.1:{target.port}/", data=b"{}",
                                   proxy=f"http://127.0.0.1:{proxy.port}")  # fmt: skip
    assert len(target.requests) == 1
    assert proxy.connections == 0


def _certificate_for_localhost(directory: Path) -> Path:
    """A self-signed certificate for the name ``localhost`` only (no IP address in it)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / "localhost.pem"
    path.write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


async def test_tls_uses_the_hostname_for_sni_and_verification(tmp_path: Path) -> None:
    pem = _certificate_for_localhost(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pem)
    names: list[str | None] = []

    def sni(_socket: Any, name: str | None, _context: ssl.SSLContext) -> None:
        names.append(name)

    server.sni_callback = sni
    trust = ssl.create_default_context(cafile=str(pem))
    resolver = FakeResolver({"localhost": ["127.0.0.1"]})
    policy = AddressPolicy(["127.0.0.0/8"])
    session = safe_session(policy, 5, ssl_context=trust, resolver=resolver)
    async with receiver(tls=server) as target, session:
        url = f"https://localhost:{target.port}/hook"
        async with session.post(url, data=b"{}") as answer:
            assert answer.status == 204
        # The certificate does not name 127.0.0.1: verification really is by name.
        with pytest.raises(aiohttp.ClientConnectorCertificateError, match="CERTIFICATE_VERIFY"):
            await session.post(f"https://127.0.0.1:{target.port}/hook", data=b"{}")
    assert names[0] == "localhost"
    [(_, _, headers)] = target.requests
    assert headers["host"] == f"localhost:{target.port}"


async def test_the_default_context_verifies_certificates(tmp_path: Path) -> None:
    pem = _certificate_for_localhost(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pem)
    resolver = FakeResolver({"localhost": ["127.0.0.1"]})
    session = safe_session(AddressPolicy(["127.0.0.0/8"]), 5, resolver=resolver)
    async with receiver(tls=server) as target, session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError, match="CERTIFICATE_VERIFY"):
            await session.post(f"https://localhost:{target.port}/hook", data=b"{}")
    assert target.requests == []


async def test_every_new_connection_resolves_and_checks_again() -> None:
    resolver = FakeResolver({"hooks.example.com": ["127.0.0.1"]})
    policy = AddressPolicy(["127.0.0.1/32"], allow_http=True)
    async with receiver() as target, safe_session(policy, 5, resolver=resolver) as session:
        url = f"http://hooks.example.com:{target.port}/"
        async with session.post(url, data=b"{}") as answer:  # the receiver closes after it
            assert answer.status == 204
        resolver.table["hooks.example.com"] = ["127.0.0.2"]  # re-bound inward
        with pytest.raises(BlockedAddress, match=r"resolves to 127\.0\.0\.2, which is loopback"):
            await session.post(url, data=b"{}")
    assert resolver.lookups == ["hooks.example.com"] * 2
    assert len(target.requests) == 1


# -- the sender over a safe session -----------------------------------------------------------


class KeepAlive:
    """A keep-alive HTTP/1.1 server answering each request with ``answer(connection, request)``
    (both counted from 1): bytes to write, and whether to close after them."""

    def __init__(self, answer: Callable[[int, int], tuple[bytes, bool]]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[tuple[int, int]] = []
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection, number = self.connections, 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                await reader.readexactly(int(length[1]) if length else 0)
                number += 1
                self.requests.append((connection, number))
                data, close = self.answer(connection, number)
                writer.write(data)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def keep_alive(
    answer: Callable[[int, int], tuple[bytes, bool]],
) -> AsyncIterator[KeepAlive]:
    server = KeepAlive(answer)
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}/hook"
    try:
        yield server
    finally:
        listening.close()
        await listening.wait_closed()


NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"


async def test_a_kept_alive_connection_closed_before_any_answer_is_retried_once() -> None:
    def answer(connection: int, number: int) -> tuple[bytes, bool]:
        # The first connection's second request finds it closing: no byte comes back.
        return (b"", True) if (connection, number) == (1, 2) else (NO_CONTENT, False)

    async with keep_alive(answer) as server, safe_session(LOCAL, 5) as session:
        send, url = HttpSender(session), server.url
        assert (await send(url, b"{}", {}, 5)).status == 204
        assert (await send(url, b"{}", {}, 5)).status == 204  # sent again, on a new connection
    assert server.requests == [(1, 1), (1, 2), (2, 1)]


async def test_a_connection_closed_twice_before_any_answer_fails_the_attempt() -> None:
    def answer(connection: int, number: int) -> tuple[bytes, bool]:
        return (NO_CONTENT, False) if (connection, number) == (1, 1) else (b"", True)

    async with keep_alive(answer) as server, safe_session(LOCAL, 5) as session:
        send, url = HttpSender(session), server.url
        assert (await send(url, b"{}", {}, 5)).status == 204
        failed = await send(url, b"{}", {}, 5)
    assert failed == Response(None, "ServerDisconnectedError: Server disconnected")
    assert server.requests == [(1, 1), (1, 2), (2, 1)]  # once more, not more


async def test_a_connection_closed_after_part_of_an_answer_is_not_retried() -> None:
    def answer(connection: int, number: int) -> tuple[bytes, bool]:
        return (b"HTTP/1.1 2", True) if number == 2 else (NO_CONTENT, False)

    async with keep_alive(answer) as server, safe_session(LOCAL, 5) as session:
        send, url = HttpSender(session), server.url
        assert (await send(url, b"{}", {}, 5)).status == 204
        failed = await send(url, b"{}", {}, 5)
    assert failed.status is None and failed.error is not None
    assert failed.error.startswith("ServerDisconnectedError: ")
    assert server.requests == [(1, 1), (1, 2)]


async def test_the_sender_keeps_the_head_of_the_body_and_drops_a_connection_left_unread() -> None:
    big = b"x" * (RESPONSE_HEAD * 200)
    small = b'{"ok":true}'

    def answer(connection: int, number: int) -> tuple[bytes, bool]:
        body = big if (connection, number) == (1, 2) else small
        head = f"HTTP/1.1 429 Slow Down\r\nretry-after: 7\r\ncontent-length: {len(body)}\r\n\r\n"
        return head.encode() + body, False

    async with keep_alive(answer) as server, safe_session(LOCAL, 5) as session:
        send, url = HttpSender(session), server.url
        assert await send(url, b"{}", {}, 5) == Response(429, None, "7", small)
        assert await send(url, b"{}", {}, 5) == Response(429, None, "7", big[:RESPONSE_HEAD])
        assert await send(url, b"{}", {}, 5) == Response(429, None, "7", small)
    # The small body was read to its end, so its connection was reused; the big one was not.
    assert server.requests == [(1, 1), (1, 2), (2, 1)]
