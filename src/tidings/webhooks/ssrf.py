"""Outbound HTTP for webhooks that cannot reach what it must not (SSRF protection).

Rules:

- An address is refused when it lies in a blocked range (``BLOCKED``, most specific name wins,
  then ``ipaddress``'s own properties as a safety net) unless an allowed network holds it.
- Addresses that embed an IPv4 address (IPv4-mapped, NAT64 ``64:ff9b::/96``, 6to4) are judged
  by the embedded address: that is where the packets end up.
- IP literals are read the way ``inet_aton`` and the WHATWG URL parser read them (decimal
  ``2130706433``, hex ``0x7f000001``, octal ``0177.0.0.1``, short ``127.1``), so a spelling
  cannot hide an address.
- The host is resolved once per new connection, by ``SafeResolver`` (aiohttp's DNS cache is
  off); every resolved address is checked and the socket connects to a checked IP literal, so
  no second lookup can rebind. TLS (SNI, certificate verification) and the ``Host`` header
  still use the hostname. Resolving counts against the request's timeout.
- aiohttp skips the resolver for hosts it takes for IP literals (all digits and dots, or a
  colon), so ``safe_session`` also checks every request's URL, as aiohttp parsed it, before
  connecting: a literal in any notation is refused there. Redirects are not followed
  (``HttpSender``); one a caller follows is checked the same way.
- No proxy from the environment, no decompression, no cookies, no unix sockets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeAlias
from urllib.parse import urlsplit

import aiohttp
from aiohttp import ClientHandlerType, ClientMiddlewareType, ClientRequest, ClientResponse
from aiohttp.abc import AbstractResolver, ResolveResult

from tidings.exceptions import BadRequest

Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver: TypeAlias = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> addresses`` as strings (an IPv6 one may carry a ``%zone``)."""


class BlockedAddress(BadRequest):
    """An endpoint's address (literal or resolved) lies in a blocked range."""

    code = "blocked_address"

    def __init__(self, address: Address, reason: str, host: str | None = None) -> None:
        shown = f"{host} resolves to {address}, which" if host else str(address)
        super().__init__(f"{shown} is {reason}")
        self.address = address
        self.reason = reason
        self.host = host


class InvalidEndpoint(BadRequest):
    """An endpoint URL that is malformed or not allowed in shape (scheme, userinfo, host)."""

    code = "invalid_endpoint"


def _net(text: str) -> Network:
    return ipaddress.ip_network(text)


# Blocked ranges, IANA IPv4/IPv6 Special-Purpose Address Registries (RFC 6890 and updates).
# Lookup takes the longest matching prefix, so a specific entry names its address better.
BLOCKED: tuple[tuple[Network, str], ...] = (
    # 0/8 "this network": connecting to 0.0.0.0 reaches the local host on Linux (RFC 1122 §3.2.1.3)
    (_net("0.0.0.0/8"), "unspecified ('this network')"),
    (_net("10.0.0.0/8"), "private (RFC 1918)"),
    # Carrier-grade NAT; also where Alibaba Cloud serves instance metadata (RFC 6598)
    (_net("100.64.0.0/10"), "shared address space (CGNAT)"),
    (_net("100.100.100.200/32"), "shared address space (cloud metadata)"),
    (_net("127.0.0.0/8"), "loopback"),
    (_net("169.254.0.0/16"), "link-local"),
    # AWS, GCP, Azure, OpenStack... instance metadata and credentials (RFC 3927 range)
    (_net("169.254.169.254/32"), "link-local (cloud metadata)"),
    (_net("172.16.0.0/12"), "private (RFC 1918)"),
    # IETF protocol assignments, incl. DS-Lite 192.0.0.0/29 and NAT64 discovery (RFC 6890)
    (_net("192.0.0.0/24"), "IETF protocol assignments"),
    (_net("192.0.2.0/24"), "documentation (TEST-NET-1)"),
    # 6to4 relay anycast, deprecated (RFC 7526)
    (_net("192.88.99.0/24"), "6to4 relay anycast"),
    (_net("192.168.0.0/16"), "private (RFC 1918)"),
    (_net("198.18.0.0/15"), "benchmarking (RFC 2544)"),
    (_net("198.51.100.0/24"), "documentation (TEST-NET-2)"),
    (_net("203.0.113.0/24"), "documentation (TEST-NET-3)"),
    (_net("224.0.0.0/4"), "multicast"),
    (_net("240.0.0.0/4"), "reserved"),
    (_net("255.255.255.255/32"), "limited broadcast"),
    # IPv6. ::/8 holds ::, ::1, IPv4-compatible ::a.b.c.d (deprecated, RFC 4291 §2.5.5.1) and
    # SIIT ::ffff:0:a.b.c.d; the IPv4-mapped ::ffff:0:0/96 and NAT64 64:ff9b::/96 inside it
    # are judged by their embedded IPv4 address before this table is read (see _embedded).
    (_net("::/8"), "reserved"),
    (_net("::/128"), "unspecified"),
    (_net("::1/128"), "loopback"),
    # NAT64 local-use prefix (RFC 8215): a translator inside the operator's network, and the
    # embedded IPv4's position depends on a prefix length we cannot know.
    (_net("64:ff9b:1::/48"), "NAT64 local-use"),
    (_net("100::/64"), "discard-only (RFC 6666)"),
    # From 2001::/23 the ranges that are not globally reachable (the rest, e.g. PCP/TURN
    # anycast, AMT, AS112, ORCHIDv2, are ordinary public services, though Python before
    # 3.12.4 counts all of 2001::/23 private and the safety net below then refuses them).
    # Teredo embeds an obfuscated client IPv4 and needs a local relay (RFC 4380)
    (_net("2001::/32"), "Teredo"),
    (_net("2001:2::/48"), "benchmarking (RFC 5180)"),
    (_net("2001:10::/28"), "ORCHID (deprecated)"),
    (_net("2001:db8::/32"), "documentation"),
    (_net("3fff::/20"), "documentation (RFC 9637)"),
    (_net("5f00::/16"), "SRv6 SIDs (RFC 9602)"),
    (_net("fc00::/7"), "unique local (ULA)"),
    # AWS Nitro instance metadata over IPv6
    (_net("fd00:ec2::254/128"), "unique local (cloud metadata)"),
    (_net("fe80::/10"), "link-local"),
    (_net("fec0::/10"), "site-local (deprecated)"),
    (_net("ff00::/8"), "multicast"),
)

_MAPPED = _net("::ffff:0:0/96")
_NAT64 = _net("64:ff9b::/96")  # RFC 6052 well-known prefix, IPv4 in the last 32 bits
_SIXTOFOUR = _net("2002::/16")  # RFC 3056, IPv4 in bits 16..47


def _embedded(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The kind and IPv4 address an IPv6 address carries packets to, if it embeds one."""
    if address in _MAPPED:
        return "IPv4-mapped", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _NAT64:
        return "NAT64 of", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIXTOFOUR:
        return "6to4 of", ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)
    return None


def blocked_range(address: Address) -> str | None:
    """Why ``address`` must not be connected to, or ``None`` when it is globally reachable."""
    address = _unscoped(address)
    if isinstance(address, ipaddress.IPv6Address) and (embedded := _embedded(address)):
        kind, inner = embedded
        reason = blocked_range(inner)
        return None if reason is None else f"{kind} {inner}, which is {reason}"
    best: tuple[int, str] | None = None
    for network, name in BLOCKED:
        if address in network and (best is None or network.prefixlen > best[0]):
            best = network.prefixlen, name
    if best is not None:
        return best[1]
    # A safety net for what the table misses (ranges registered after it was written).
    for flag, name in (
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (address.is_unspecified, "unspecified"),
        (address.is_reserved, "reserved"),
        (address.is_private, "private"),
        (not address.is_global, "not globally reachable"),
    ):
        if flag:
            return name
    return None


def _unscoped(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return ipaddress.IPv6Address(int(address))
    return address


_DIGITS = {8: frozenset("01234567"), 10: frozenset("0123456789"),
           16: frozenset("0123456789abcdefABCDEF")}  # fmt: skip


def _ipv4_number(label: str) -> int | None:
    """One part of an IPv4 literal as ``inet_aton`` reads it (WHATWG URL "IPv4 number parser")."""
    if label[:2] in ("0x", "0X"):
        digits, base = label[2:], 16
        if not digits:
            return 0  # "0x" alone is zero to WHATWG
    elif len(label) > 1 and label[0] == "0":
        digits, base = label[1:], 8
    else:
        digits, base = label, 10
    if not digits or not set(digits) <= _DIGITS[base]:
        return None
    return int(digits, base)


def _ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """``host`` read as an IPv4 literal in any notation; ``None`` when it is a name.

    Like WHATWG's host parser, a host whose last label is a number is an IPv4 literal, and
    an invalid one is an error rather than a name: no public name ends in a number.
    """
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()  # one trailing dot, as in a fully qualified name
    if _ipv4_number(labels[-1]) is None:
        return None
    numbers = [_ipv4_number(label) for label in labels]
    if len(numbers) > 4 or any(n is None for n in numbers):
        raise InvalidEndpoint(f"{host!r} is not a valid IPv4 address")
    *head, last = [n for n in numbers if n is not None]
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        raise InvalidEndpoint(f"{host!r} is not a valid IPv4 address")
    value = last
    for index, number in enumerate(head):
        value |= number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def ip_literal(host: str) -> Address | None:
    """``host`` (brackets optional for IPv6) as an address, or ``None`` when it is a name."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            # A zone (fe80::1%eth0, %25 in URLs) only matters to link-local, which is blocked.
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise InvalidEndpoint(f"{host!r} is not a valid IPv6 address") from None
    return _ipv4_literal(host)


class AddressPolicy:
    """Which endpoint URLs and addresses webhooks may reach."""

    def __init__(self, allowed: Iterable[Network | str] = (), *, allow_http: bool = False) -> None:
        self.allowed: tuple[Network, ...] = tuple(
            ipaddress.ip_network(network, strict=False) if isinstance(network, str) else network
            for network in allowed
        )
        self.allow_http = allow_http

    def is_allowed(self, address: Address) -> bool:
        """Whether an allowed network holds ``address`` (or the IPv4 address it maps to)."""
        address = _unscoped(address)
        candidates: list[Address] = [address]
        # ::ffff:a.b.c.d *is* a.b.c.d on the wire; NAT64 and 6to4 go through a gateway, so
        # allowing their embedded IPv4 would not describe where the connection goes.
        if isinstance(address, ipaddress.IPv6Address) and address in _MAPPED:
            candidates.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        return any(a in network for a in candidates for network in self.allowed)

    def check_address(self, address: Address | str, host: str | None = None) -> None:
        """Raise ``BlockedAddress`` unless ``address`` may be connected to."""
        if isinstance(address, str):
            address = ipaddress.ip_address(address.split("%", 1)[0])
        if self.is_allowed(address):
            return
        reason = blocked_range(address)
        if reason is not None:
            raise BlockedAddress(address, reason, host)

    def check_url(self, url: str) -> None:
        """Refuse an endpoint URL by its shape, and by its host when that is an IP literal.

        A hostname is only checked once resolved, by ``SafeResolver`` at every connection.
        """
        try:
            parts = urlsplit(url)
            _ = parts.port  # a bad port raises ValueError
        except ValueError as exc:
            raise InvalidEndpoint(f"invalid endpoint URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme != "https" and not (scheme == "http" and self.allow_http):
            allowed = "https" if not self.allow_http else "http or https"
            raise InvalidEndpoint(f"endpoint URL scheme must be {allowed}, not {scheme!r}")
        if "@" in parts.netloc:
            raise InvalidEndpoint("endpoint URL must not carry credentials (user:password@)")
        host = parts.hostname
        if not host:
            raise InvalidEndpoint("endpoint URL has no host")
        address = ip_literal(host)
        if address is not None:
            self.check_address(address)

    async def check_endpoint(self, url: str, resolver: Resolver | None = None) -> None:
        """``check_url``, then, for a hostname, its addresses as resolved now: a name that
        resolves into a blocked range is refused at registration. A name that does not resolve
        yet is accepted; every connection checks again anyway."""
        self.check_url(url)
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ip_literal(host) is not None:
            return
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        try:
            async with asyncio.timeout(5):
                found = await (resolver or resolve)(host, port)
        except (OSError, TimeoutError):
            return
        for text in found:
            self.check_address(text, host)


async def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to for a TCP connection, in the resolver's order."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


class SafeResolver(AbstractResolver):
    """An aiohttp resolver that resolves once, checks every address and returns IP literals.

    If ANY resolved address is blocked, the name is refused, rather than tried on the allowed
    ones only: a name that mixes public and internal addresses is a rebinding or split-horizon
    setup, the outcome would depend on which address is tried first, and a clear refusal is
    easier to act on (allow the internal network to accept it on purpose).
    """

    def __init__(self, policy: AddressPolicy, resolver: Resolver = resolve) -> None:
        self.policy = policy
        self.resolver = resolver

    async def addresses(self, host: str, port: int) -> list[str]:
        """The checked addresses to connect to for ``host``, each an IP literal."""
        literal = ip_literal(host)  # aiohttp passes names like "0x7f000001" here
        if literal is not None:
            found = [str(literal)]
            host_named: str | None = None
        else:
            try:
                found = list(await self.resolver(host, port))
            except OSError as exc:
                # aiohttp reports an OSError as ClientConnectorDNSError, with this strerror.
                raise OSError(exc.errno, f"cannot resolve {host}: {exc.strerror or exc}") from exc
            host_named = host
        if not found:
            raise OSError(socket.EAI_NONAME, f"{host} resolves to no address")
        targets: list[str] = []
        for text in found:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            self.policy.check_address(address, host_named)
            if isinstance(address, ipaddress.IPv6Address) and address in _MAPPED:
                text = str(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
            if text not in targets:
                targets.append(text)
        return targets

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        # Called inside the request's timeout (``ClientTimeout.total``), which bounds it.
        # ``hostname`` stays the name: aiohttp uses the URL's host for SNI, certificate
        # checks and ``Host``, and connects to ``host``, the checked literal.
        flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        return [
            ResolveResult(hostname=host, host=target, port=port, proto=0, flags=flags,
                          family=socket.AF_INET6 if ":" in target else socket.AF_INET)
            for target in await self.addresses(host, port)
        ]  # fmt: skip

    async def close(self) -> None:
        pass


def _checking(policy: AddressPolicy) -> ClientMiddlewareType:
    """A session middleware that checks the URL of every request aiohttp sends."""

    async def check(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        # ``request.url`` is what aiohttp connects to, as yarl normalised it (yarl reads
        # "１２７.0.0.1" as 127.0.0.1, where urlsplit sees a name). aiohttp skips the resolver
        # for hosts that look numeric, so literals are checked here, on this form.
        policy.check_url(str(request.url))
        if request.proxy is not None:  # it would connect, on our behalf, where it likes
            raise InvalidEndpoint("webhook requests never go through a proxy")
        literal = ip_literal(request.url.raw_host or "")
        if literal is not None:
            policy.check_address(literal)
        return await handler(request)

    return check


def safe_session(
    policy: AddressPolicy,
    timeout: float,
    *,
    ssl_context: ssl.SSLContext | None = None,
    resolver: Resolver = resolve,
) -> aiohttp.ClientSession:
    """An aiohttp session for webhook deliveries: checked addresses only.

    Every request's URL is checked (a middleware, so redirects a caller follows are checked
    too; tidings never follows them; a request's own ``middlewares=`` would replace it, so
    pass none). Besides:

    - no pool-wide connection cap: the endpoints' own concurrency bounds what is in flight, and
      a request queued behind other endpoints' would time out unsent and be logged as the
      receiver's timeout;
    - no DNS cache: every new connection resolves and checks again;
    - idle connections are kept 4 s, under the 5 s after which Node, uvicorn and Apache close
      theirs, so a request rarely goes out on a connection the receiver is closing;
    - ``trust_env=False``: a proxy from the environment would connect on our behalf, to
      addresses we never checked;
    - no decompression (the attempt log keeps the raw bytes; no decompression bombs), no
      cookie jar, no unix sockets (``TCPConnector`` only).
    """
    connector = aiohttp.TCPConnector(
        resolver=SafeResolver(policy, resolver),
        use_dns_cache=False,
        limit=0,
        limit_per_host=0,
        keepalive_timeout=4.0,
        # True: aiohttp's verifying context, ssl.create_default_context() (the system's CAs)
        ssl=ssl_context if ssl_context is not None else True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        trust_env=False,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        raise_for_status=False,
        middlewares=(_checking(policy),),
    )
