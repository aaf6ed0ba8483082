"""Keys for JWT verification: which algorithms a key serves, PEM loading, and the JWKS cache.

The JWKS document is fetched only by :meth:`JWKSCache.refresh` (at start-up and then in the
background), never while a request is being authenticated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import httpx
import jwt
import orjson
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from ..exceptions import ConfigError

log = logging.getLogger("tidings.auth")

MAX_JWKS_BYTES = 1024 * 1024
MIN_RSA_BITS = 2048  # NIST SP 800-131A

# RFC 7518 §3.2: an HMAC key must be at least as long as the hash output.
HMAC_ALGORITHMS = {"HS256": 32, "HS384": 48, "HS512": 64}
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_CURVE_ALGORITHMS: dict[type[ec.EllipticCurve], frozenset[str]] = {
    ec.SECP256R1: frozenset({"ES256"}),
    ec.SECP384R1: frozenset({"ES384"}),
    ec.SECP521R1: frozenset({"ES512", "ES521"}),
    ec.SECP256K1: frozenset({"ES256K"}),
}
ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS.union({"EdDSA"}, *_CURVE_ALGORITHMS.values())
ALGORITHMS = ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS.keys()

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


def key_algorithms(key: PublicKey) -> frozenset[str]:
    """The JWS algorithms (RFC 7518 §3.1, RFC 8037) this public key can verify."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _CURVE_ALGORITHMS.get(type(key.curve), frozenset())
    return frozenset({"EdDSA"})


def describe_key(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"an RSA-{key.key_size} key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC {key.curve.name} key"
    return "an Ed25519 key" if isinstance(key, ed25519.Ed25519PublicKey) else "an Ed448 key"


def as_public_key(key: object, what: str) -> PublicKey:
    if not isinstance(key, PublicKey):
        raise ConfigError(f"{what} is a {type(key).__name__}: JWTs use RSA, EC or Ed25519 keys")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ConfigError(f"{what} is an RSA-{key.key_size} key; use {MIN_RSA_BITS} bits or more")
    return key


def load_public_key(pem: str, what: str = "public key") -> PublicKey:
    """A PEM public key (or the key of a PEM certificate); ConfigError saying what is wrong."""
    data = pem.strip().encode()
    if b"PRIVATE KEY-----" in data:
        raise ConfigError(
            f"{what} is a private key: configure its public half (openssl pkey -pubout)"
        )
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return as_public_key(x509.load_pem_x509_certificate(data).public_key(), what)
        return as_public_key(serialization.load_pem_public_key(data), what)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{what} is not a PEM public key or certificate") from None


def load_private_key(pem: str, what: str = "private key") -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.strip().encode(), password=None)
    except TypeError:
        raise ConfigError(f"{what} is encrypted; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{what} is not a PEM private key") from None
    if not isinstance(key, PrivateKey):
        raise ConfigError(f"{what} is a {type(key).__name__}: JWTs use RSA, EC or Ed25519 keys")
    as_public_key(key.public_key(), what)
    return key


@dataclass(frozen=True, slots=True)
class JWK:
    """One signing key of a JWKS document (RFC 7517 §4)."""

    kid: str | None
    key: PublicKey
    alg: str | None  # the key's own "alg", if it names one: then only that algorithm may use it

    def fits(self, alg: str) -> bool:
        return alg in key_algorithms(self.key) and self.alg in (None, alg)


def parse_jwks(document: object) -> tuple[list[JWK], list[str]]:
    """The usable signing keys of a JWKS document, and why the others were skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JWK Set: expected {"keys": [...]}')
    keys: list[JWK] = []
    skipped: list[str] = []
    for i, entry in enumerate(document["keys"]):
        name = f"key {i}" if not isinstance(entry, dict) else f"key {entry.get('kid', i)!r}"
        if not isinstance(entry, dict):
            skipped.append(f"{name}: not an object")
            continue
        kid, alg = entry.get("kid"), entry.get("alg")
        if entry.get("use", "sig") != "sig" or entry.get("kty") == "oct":
            continue  # encryption keys and shared secrets are not ours to verify with
        if not isinstance(kid, str | None) or not isinstance(alg, str | None):
            skipped.append(f"{name}: kid and alg must be strings")
            continue
        if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
            skipped.append(f"{name}: algorithm {alg!r} is not supported")
            continue
        try:
            key = as_public_key(jwt.PyJWK(entry).key, name)
        except (jwt.PyJWTError, ConfigError, TypeError, ValueError) as exc:
            skipped.append(f"{name}: {exc}")
            continue
        keys.append(JWK(kid, key, alg))
    return keys, skipped


class JWKSCache:
    """The keys of a remote JWK Set (RFC 7517 §5), fetched by :meth:`refresh` or :meth:`run`.

    :meth:`key_for` only looks in memory. Asking it for an unknown key id marks the set stale, so
    :meth:`run` fetches it early (at most once per ``min_refresh`` seconds) when keys rotate.
    A failed fetch keeps the keys we had and is retried every ``min_refresh`` seconds.
    """

    def __init__(self, url: str, *, min_refresh: float = 60, timeout: float = 10) -> None:
        self.url = url
        self.min_refresh = min_refresh
        self.timeout = timeout
        self.keys: tuple[JWK, ...] = ()
        self.last_error: str | None = None
        self.fetched_at: float | None = None  # time.monotonic() of the last good fetch
        self._by_kid: dict[str, JWK] = {}
        self._attempted_at: float | None = None
        self._stale = False

    def key_for(self, kid: str | None) -> JWK | None:
        if kid is None:  # no kid: only unambiguous when the set has one key
            return self.keys[0] if len(self.keys) == 1 else None
        found = self._by_kid.get(kid)
        if found is None:
            self._stale = True
        return found

    async def _fetch(self) -> object:
        async with (
            httpx.AsyncClient(timeout=self.timeout, follow_redirects=True) as client,
            client.stream("GET", self.url, headers={"Accept": "application/json"}) as response,
        ):
            response.raise_for_status()
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"the document is over {MAX_JWKS_BYTES} bytes")
        return orjson.loads(body)

    async def refresh(self) -> None:
        """Fetch the set now. On any failure keep the old keys and set ``last_error``."""
        self._attempted_at = time.monotonic()
        try:
            keys, skipped = parse_jwks(await self._fetch())
            if not keys:
                raise ValueError(
                    "no usable signing key" + (f" ({'; '.join(skipped)})" if skipped else "")
                )
        except Exception as exc:  # a bad fetch must never take the server down with it
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning(
                "JWKS %s: keeping %d known keys: %s", self.url, len(self.keys), self.last_error
            )
            return
        for reason in skipped:
            log.warning("JWKS %s: skipped %s", self.url, reason)
        self.keys = tuple(keys)
        self._by_kid = {k.kid: k for k in keys if k.kid is not None}
        self.fetched_at = time.monotonic()
        self.last_error = None
        self._stale = False

    async def _refresh_unless(self, stopping: asyncio.Event) -> None:
        """Refresh, but give up at once when ``stopping`` is set: shutdown never waits for a
        slow key server."""
        async with asyncio.TaskGroup() as tasks:
            fetch = tasks.create_task(self.refresh())
            stop = tasks.create_task(stopping.wait())
            await asyncio.wait((fetch, stop), return_when=asyncio.FIRST_COMPLETED)
            fetch.cancel()
            stop.cancel()

    def _due_in(self, interval: float) -> float:
        if self._attempted_at is None:
            return 0.0
        since = time.monotonic() - self._attempted_at
        if self._stale or self.last_error is not None or not self.keys:
            return min(self.min_refresh, interval) - since
        return interval - since

    async def run(self, stopping: asyncio.Event, interval: float = 300) -> None:
        """Refresh every ``interval`` seconds (sooner when stale) until ``stopping`` is set."""
        while not stopping.is_set():
            due = self._due_in(interval)
            if due <= 0:
                await self._refresh_unless(stopping)
                continue
            # Wake at least every min_refresh to notice a stale mark set meanwhile.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), min(due, max(self.min_refresh, 0.01)))
