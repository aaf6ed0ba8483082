"""SSRF protection for webhook deliveries: blocked ranges, literal notations, resolution at
connect time, allow-list, redirects, proxies and TLS, against real local receivers."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest

from tidings.exceptions import BadRequest
from tidings.webhooks.ssrf import (
    BLOCKED,
    AddressPolicy,
    BlockedAddress,
    InvalidEndpoint,
    SafeBackend,
    blocked_range,
    ip_literal,
    safe_client,
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


# -- the network backend, with a recording fake underneath ------------------------------------


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Records where it is asked to connect; connects nowhere."""

    def __init__(self, refuse: Iterable[str] = ()) -> None:
        self.calls: list[tuple[str, int]] = []
        self.refuse = set(refuse)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 — httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.calls.append((host, port))
        if host in self.refuse:
            raise httpcore.ConnectError(f"{host} refused")
        return httpcore.AsyncMockStream([])


class FakeResolver:
    def __init__(self, table: dict[str, Sequence[str]]) -> None:
        self.table = table
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[host]


async def test_backend_connects_to_the_checked_literal_after_one_lookup() -> None:
    inner = RecordingBackend()
    resolver = FakeResolver({"hooks.example.com": ["93.184.215.14"]})
    backend = SafeBackend(AddressPolicy(), inner, resolver)
    await backend.connect_tcp("hooks.example.com", 443)
    assert inner.calls == [("93.184.215.14", 443)]  # never the name: nothing left to rebind
    assert resolver.lookups == ["hooks.example.com"]


async def test_backend_refuses_a_name_resolving_inward_without_connecting() -> None:
    inner = RecordingBackend()
    backend = SafeBackend(
        AddressPolicy(), inner, FakeResolver({"hooks.example.com": ["127.0.0.1"]})
    )
    with pytest.raises(BlockedAddress, match=r"hooks\.example\.com resolves to 127\.0\.0\.1"):
        await backend.connect_tcp("hooks.example.com", 443)
    assert inner.calls == []


async def test_backend_refuses_a_mix_of_public_and_blocked_addresses() -> None:
    inner = RecordingBackend()
    resolver = FakeResolver({"rebind.example": ["93.184.215.14", "169.254.169.254"]})
    backend = SafeBackend(AddressPolicy(), inner, resolver)
    with pytest.raises(BlockedAddress, match="cloud metadata"):
        await backend.connect_tcp("rebind.example", 443)
    assert inner.calls == []  # not even the public one


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "::1", "::ffff:127.0.0.1"]
)
async def test_backend_normalises_literal_hosts_without_a_lookup(host: str) -> None:
    inner = RecordingBackend()
    resolver = FakeResolver({})
    with pytest.raises(BlockedAddress, match="loopback"):
        await SafeBackend(AddressPolicy(), inner, resolver).connect_tcp(host, 80)
    assert inner.calls == [] and resolver.lookups == []


async def test_backend_connects_to_the_ipv4_behind_a_mapped_address() -> None:
    inner = RecordingBackend()
    resolver = FakeResolver({"hooks.example.com": ["::ffff:93.184.215.14", "93.184.215.14"]})
    await SafeBackend(AddressPolicy(), inner, resolver).connect_tcp("hooks.example.com", 443)
    assert inner.calls == [("93.184.215.14", 443)]


async def test_backend_tries_the_next_checked_address_when_one_refuses() -> None:
    inner = RecordingBackend(refuse=["2606:4700::1"])
    resolver = FakeResolver({"hooks.example.com": ["2606:4700::1", "93.184.215.14"]})
    await SafeBackend(AddressPolicy(), inner, resolver).connect_tcp("hooks.example.com", 443)
    assert inner.calls == [("2606:4700::1", 443), ("93.184.215.14", 443)]


async def test_backend_reports_an_unresolvable_name_as_a_connect_error() -> None:
    backend = SafeBackend(AddressPolicy(), RecordingBackend(), FakeResolver({}))
    with pytest.raises(httpcore.ConnectError, match=r"cannot resolve nowhere\.example"):
        await backend.connect_tcp("nowhere.example", 443)


async def test_backend_never_connects_to_a_unix_socket() -> None:
    with pytest.raises(httpcore.ConnectError):
        await SafeBackend(AddressPolicy(), RecordingBackend()).connect_unix_socket("/run/x.sock")


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
    async with receiver() as target, safe_client(AddressPolicy(allow_http=True), 5) as client:
        with pytest.raises(BlockedAddress, match=r"^localhost resolves to .*, which is loopback$"):
            await client.post(f"http://localhost:{target.port}/hook", content=b"{}")
    assert target.connections == 0


async def test_hostname_resolving_to_loopback_is_refused() -> None:
    resolver = FakeResolver({"hooks.example.com": ["127.0.0.1"]})
    policy = AddressPolicy(allow_http=True)
    async with receiver() as target, safe_client(policy, 5, resolver=resolver) as client:
        with pytest.raises(BlockedAddress, match=r"resolves to 127\.0\.0\.1, which is loopback"):
            await client.post(f"http://hooks.example.com:{target.port}/", content=b"{}")
    assert target.connections == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "2130706433", "0x7f.1", "127.1", "[::ffff:7f00:1]"])
async def test_loopback_literal_is_refused_before_connecting(host: str) -> None:
    async with receiver() as target, safe_client(AddressPolicy(allow_http=True), 5) as client:
        with pytest.raises(BlockedAddress, match="loopback"):
            await client.post(f"http://{host}:{target.port}/", content=b"{}")
    assert target.connections == 0


async def test_allow_list_reaches_the_receiver_with_the_hostname_as_host() -> None:
    resolver = FakeResolver({"hooks.example.com": ["127.0.0.1"]})
    async with receiver() as target, safe_client(LOCAL, 5, resolver=resolver) as client:
        answer = await client.post(f"http://hooks.example.com:{target.port}/hook", content=b"{}")
    assert answer.status_code == 204
    [(method, path, headers)] = target.requests
    assert (method, path) == ("POST", "/hook")
    assert headers["host"] == f"hooks.example.com:{target.port}"


async def test_http_endpoint_is_refused_unless_allowed() -> None:
    policy = AddressPolicy(["127.0.0.0/8"])
    async with receiver() as target, safe_client(policy, 5) as client:
        with pytest.raises(InvalidEndpoint, match="scheme must be https"):
            await client.post(f"http://127.0.0.1:{target.port}/", content=b"{}")
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
            async with safe_client(policy, 5) as client:
                answer = await client.post(f"http://127.0.0.1:{public.port}/", content=b"{}")
                assert answer.status_code == 302 and answer.headers["location"] == location
                # Even a caller that asks to follow it cannot reach the inward address.
                with pytest.raises(BlockedAddress, match=r"127\.0\.0\.2 is loopback"):
                    await client.get(f"http://127.0.0.1:{public.port}/", follow_redirects=True)
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
        async with safe_client(LOCAL, 5) as client:
            answer = await client.post(f"http://127.0.0.1:{target.port}/", content=b"{}")
            assert answer.status_code == 204
            with pytest.raises(BlockedAddress):
                await client.post("http://10.0.0.1/", content=b"{}")
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
    client = safe_client(policy, 5, ssl_context=trust, resolver=resolver)
    async with receiver(tls=server) as target, client:
        answer = await client.post(f"https://localhost:{target.port}/hook", content=b"{}")
        assert answer.status_code == 204
        # The certificate does not name 127.0.0.1: verification really is by name.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.post(f"https://127.0.0.1:{target.port}/hook", content=b"{}")
    assert names[0] == "localhost"
    [(_, _, headers)] = target.requests
    assert headers["host"] == f"localhost:{target.port}"


async def test_backend_bounds_resolution_by_the_connect_timeout() -> None:
    async def slow(host: str, port: int) -> Sequence[str]:
        await asyncio.sleep(10)
        return ["93.184.215.14"]

    backend = SafeBackend(AddressPolicy(), RecordingBackend(), slow)
    with pytest.raises(httpcore.ConnectTimeout):
        await backend.connect_tcp("hooks.example.com", 443, timeout=0.05)
