"""Limits: request rates per client address and per credential, open streams, client addresses.

Rules:
- The core is pure: a token bucket and a keyed rate limiter are arithmetic on a clock reading
  passed in, so tests step time by hand and never sleep.
- Limits are checked once per request or connection, never per delivered event: a check is one
  dict lookup and a few float operations.
- Memory is bounded: a limiter keeps at most ``MAX_KEYS`` buckets, least recently used first out,
  and drops buckets that have refilled (a full bucket is the same as no bucket); the stream
  counter only holds addresses with a stream open; parsed proxy hops are memoised, 4096 at most.
- The client address is the socket's peer. ``X-Forwarded-For`` counts only when that peer is a
  trusted proxy, and then the rightmost address that is not a trusted proxy is the client.
- IPv6 clients are limited per /64 network: one host usually holds a whole /64, so limiting
  single addresses would let it pick a fresh address for every request.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from starlette.types import Scope

from .config import LimitsSettings
from .exceptions import ConfigError, TooManyConnections, TooManyRequests

MAX_KEYS = 100_000  # buckets per limiter; ~180 bytes each with its key: under 20 MB
_EPSILON = 1e-9  # float error of summing 1/rate many times must not refuse the burst's last token

Action = Literal["publish", "subscribe"]
Kind = Literal["address", "credential"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; a request takes one.

    The state is one number, the time at which the bucket is full again (the "theoretical arrival
    time" of GCRA, ITU-T I.371): ``full_at <= now`` means a full bucket, and each token taken
    pushes it ``1 / rate`` seconds later. The bucket refuses when that would put it more than
    ``burst / rate`` seconds ahead of ``now``.
    """

    rate: float  # tokens per second, > 0
    burst: int  # tokens when full, >= 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0) or self.burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, not {self!r}")

    def take(self, full_at: float, now: float, cost: int = 1) -> tuple[float, float]:
        """``(new full_at, 0.0)`` if ``cost`` tokens are there at ``now``; else ``(full_at,
        seconds until they are)``, and nothing is taken."""
        start = full_at if full_at > now else now
        after = start + cost / self.rate
        excess = after - now - self.burst / self.rate
        if excess > _EPSILON:
            return full_at, excess
        return after, 0.0

    def tokens(self, full_at: float, now: float) -> float:
        """Tokens in the bucket at ``now``."""
        return self.burst - max(0.0, full_at - now) * self.rate


class RateLimiter:
    """A token bucket per key (an address, a credential), in bounded memory."""

    __slots__ = ("_buckets", "bucket", "max_keys")

    def __init__(self, rate: float, burst: int, max_keys: int = MAX_KEYS) -> None:
        self.bucket = TokenBucket(rate, burst)
        self.max_keys = max_keys
        # key -> full_at, least recently used first.
        self._buckets: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: str) -> bool:
        return key in self._buckets

    def take(self, key: str, now: float) -> float:
        """0.0 if ``key`` may go ahead (a token is taken), else the seconds until it may."""
        buckets = self._buckets
        full_at = buckets.get(key)
        if full_at is None:
            self._evict(now)
            full_at = now
        else:
            buckets.move_to_end(key)
        full_at, wait = self.bucket.take(full_at, now)
        buckets[key] = full_at
        return wait

    def _evict(self, now: float) -> None:
        """Make room for one more key: drop up to two refilled buckets from the old end (so
        idle keys drain as new ones come), and the least recently used beyond ``max_keys``."""
        buckets = self._buckets
        for _ in range(2):
            oldest = next(iter(buckets.items()), None)
            if oldest is None or oldest[1] > now:
                break
            del buckets[oldest[0]]
        while len(buckets) >= self.max_keys:
            buckets.popitem(last=False)


class Slot:
    """One held connection counted by :class:`OpenStreams`; ``release`` gives it back (once)."""

    __slots__ = ("_streams", "address")

    def __init__(self, streams: OpenStreams, address: str) -> None:
        self._streams: OpenStreams | None = streams
        self.address = address

    def release(self) -> None:
        if self._streams is not None:
            self._streams._release(self.address)
            self._streams = None

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class OpenStreams:
    """Connections held open (SSE streams, held long polls), per client address and in all.

    ``per_address`` or ``total`` of 0 means no limit; counting goes on either way.
    """

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.limit = total
        self.total = 0
        self._counts: dict[str, int] = {}  # only addresses with a connection open

    def count(self, address: str) -> int:
        return self._counts.get(address, 0)

    @property
    def addresses(self) -> int:
        return len(self._counts)

    def acquire(self, address: str) -> Slot:
        """Count one more connection from ``address``, or refuse it."""
        count = self._counts.get(address, 0)
        if self.per_address and count >= self.per_address:
            raise TooManyConnections(
                f"too many open streams from {address} (limit {self.per_address}, "
                "limits.max_streams_per_address); close one before opening another"
            )
        if self.limit and self.total >= self.limit:
            raise TooManyConnections(
                f"this server holds its limit of {self.limit} open streams (limits.max_streams); "
                "try again later or another node",
                total=True,
            )
        self._counts[address] = count + 1
        self.total += 1
        return Slot(self, address)

    def _release(self, address: str) -> None:
        count = self._counts[address] - 1
        if count:
            self._counts[address] = count
        else:
            del self._counts[address]
        self.total -= 1


# -- client addresses ----------------------------------------------------------------------------


def parse_networks(
    values: Iterable[str], setting: str = "limits.trusted_proxies"
) -> tuple[IPNetwork, ...]:
    """IP addresses and CIDR networks (``10.0.0.0/8``, ``::1``), or ConfigError naming one."""
    networks: list[IPNetwork] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"{setting}: {value!r} is not an IP address or a CIDR network like 10.0.0.0/8"
            ) from None
    return tuple(networks)


def _ip(text: str) -> IPAddress | None:
    """An address as a socket or a proxy writes it (``[::1]:8080`` and ``1.2.3.4:80`` too)."""
    text = text.strip()
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        if text.startswith("[") and "]" in text:
            text = text[1 : text.index("]")]
        elif text.count(":") == 1:
            text = text.partition(":")[0]
        else:
            return None
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    return ip


def client_key(host: str) -> str:
    """The name limits count a client by: IPv4 as is, IPv6 by its /64 network."""
    if ":" not in host:
        return host  # IPv4 as the socket reports it (already canonical), or not an address
    ip = _ip(host)
    if ip is None:
        return host
    if ip.version == 4 or ip.is_loopback:
        return str(ip)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class Proxies:
    """The trusted proxies (``limits.trusted_proxies``), and who a request's client is."""

    def __init__(self, networks: Sequence[IPNetwork]) -> None:
        self.networks = tuple(networks)
        # Parsing an address costs more than all the rest of a limit check, and the same proxies
        # and clients come back again and again: remember the last few thousand (bounded).
        self._hop = functools.lru_cache(maxsize=4096)(self._parse_hop)

    def _parse_hop(self, text: str) -> tuple[str, bool] | None:
        """``(client key, is a trusted proxy)`` for an address, None if ``text`` is not one."""
        ip = _ip(text)
        if ip is None:
            return None
        return client_key(str(ip)), any(ip in net for net in self.networks)

    def client(self, peer: str, forwarded: Sequence[str]) -> str:
        """Who the client is, as :func:`client_key` names it.

        ``forwarded`` are the ``X-Forwarded-For`` field values in order. Each proxy appends the
        address it received the request from, so reading right to left, every hop up to the
        first untrusted one was written by a proxy we trust; anything left of that is the
        client's own say. An entry that is not an address ends the walk at the proxy that wrote
        it.
        """
        if not self.networks:
            return client_key(peer)
        hop = self._hop(peer)
        if hop is None or not hop[1]:
            return client_key(peer)
        client = hop[0]
        for text in reversed([h for value in forwarded for h in value.split(",")]):
            hop = self._hop(text.strip())
            if hop is None:
                break
            client = hop[0]
            if not hop[1]:
                break
        return client


# -- the limits of one server --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rule:
    """One configured rate limit and the words its refusal uses."""

    limiter: RateLimiter
    action: Action
    kind: Kind
    setting: str

    def check(self, key: str, now: float) -> None:
        wait = self.limiter.take(key, now)
        if wait:
            bucket = self.limiter.bucket
            who = key if self.kind == "address" else repr(key[:80])
            raise TooManyRequests(
                f"{self.action} rate limit for {self.kind} {who}: {bucket.rate:g} requests per "
                f"second, burst {bucket.burst} ({self.setting}); "
                f"retry in {math.ceil(wait * 1000) / 1000:g} s",
                retry_after=wait,
            )


def _rule(settings: LimitsSettings, action: Action, kind: Kind) -> _Rule | None:
    """The rule for ``limits.[credential_]<action>_rate`` and its burst; None when it is 0."""
    name = f"{action}_rate" if kind == "address" else f"credential_{action}_rate"
    rate: int = getattr(settings, name)
    burst: int = getattr(settings, name.replace("_rate", "_burst"))
    return _Rule(RateLimiter(rate, burst), action, kind, f"limits.{name}") if rate > 0 else None


class Limits:
    """The ``[limits]`` of one server: its rate limiters, its open-stream count, its proxies."""

    def __init__(self, settings: LimitsSettings) -> None:
        self.settings = settings
        self.proxies = Proxies(parse_networks(settings.trusted_proxies))
        actions: tuple[Action, ...] = ("publish", "subscribe")
        self.by_address = {a: _rule(settings, a, "address") for a in actions}
        self.by_credential = {a: _rule(settings, a, "credential") for a in actions}
        self.streams = OpenStreams(settings.max_streams_per_address, settings.max_streams)

    def address(self, scope: Scope) -> str:
        """The client address of an ASGI connection."""
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        if not self.proxies.networks:
            return client_key(peer)
        forwarded = [v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"]
        return self.proxies.client(peer, forwarded)

    def check_address(self, action: Action, address: str, now: float) -> None:
        rule = self.by_address[action]
        if rule is not None:
            rule.check(address, now)

    def check_credential(self, action: Action, subject: str, now: float) -> None:
        rule = self.by_credential[action]
        if rule is not None:
            rule.check(subject, now)
