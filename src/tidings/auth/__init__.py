"""Who may do what: bearer-token (JWT) verification and the grants a token carries.

Rules:
- Verification is pure: keys are parsed once, at construction; JWKS keys are fetched only by
  :meth:`JWKSCache.refresh`, never while a request is being authenticated.
- The accepted algorithms come from configuration only; a token's ``alg`` header merely picks
  one of them (RFC 8725 §2.1, §3.1). ``none`` is never accepted. An HS* token is checked with
  the HMAC secret only and any other token with the public keys only, so a public key can never
  be used as an HMAC secret (algorithm confusion).
- Every refusal names the check that failed and never quotes a secret.
- A grant is a list of subscribe patterns and a list of publish patterns. Subscribing to a
  pattern is allowed iff every channel it can match is matched by a granted pattern; the
  containment test is exact (segment by segment), not textual.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from jwt.types import Options

from ..events import Pattern
from ..exceptions import ConfigError, Forbidden, InvalidPattern, Unauthorized
from .apikeys import PREFIX as API_KEY_PREFIX
from .apikeys import KeyStore
from .grants import ANONYMOUS, Grant, contains, covers, quote
from .keys import (
    ALGORITHMS,
    ASYMMETRIC_ALGORITHMS,
    HMAC_ALGORITHMS,
    JWK,
    JWKSCache,
    PrivateKey,
    PublicKey,
    as_public_key,
    describe_key,
    key_algorithms,
    load_private_key,
    load_public_key,
)

__all__ = [
    "ANONYMOUS",
    "JWK",
    "Authenticator",
    "Forbidden",
    "Grant",
    "JWKSCache",
    "JWTSettings",
    "KeyStore",
    "Unauthorized",
    "contains",
    "covers",
]

NO_CREDENTIAL = (
    "no credential: send Authorization: Bearer <token> "
    "(GET endpoints also take a token query parameter or the auth cookie)"
)
MAX_TOKEN_LENGTH = 16 * 1024  # far above any real JWT; bounds the work a stranger can cause


@dataclass(frozen=True)
class JWTSettings:
    """How tokens are verified: plain data, mapped from the configuration."""

    algorithms: tuple[str, ...] = ()
    secret: str | None = None  # HMAC key for HS256/384/512
    public_keys: tuple[str, ...] = ()  # PEM public keys or certificates (RS/PS/ES/EdDSA)
    audience: str | None = None
    issuer: str | None = None
    leeway: float = 5.0  # seconds, for exp/nbf/iat
    claim: str = "tidings"  # {"subscribe": [...], "publish": [...], "admin": false}


def _rfc3339(t: float) -> str:
    try:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return f"{t:g} (unix time)"


def _numeric(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 §2): a JSON number, not a string or a boolean."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Unauthorized(f"malformed token: {name} claim is not a number")
    return float(value)


class Authenticator:
    """Turns a bearer token into a :class:`Grant`, or refuses it with :class:`Unauthorized`."""

    def __init__(
        self,
        jwt: JWTSettings | None,
        *,
        jwks: JWKSCache | None = None,
        api_keys: KeyStore | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.settings = jwt if jwt is not None else JWTSettings()
        self.jwks = jwks
        self.api_keys = api_keys
        self._now = now
        self._jwt = jwks is not None or self.settings != JWTSettings()
        self._enabled = self._jwt or api_keys is not None
        self._keys: list[PublicKey] = []
        if self._jwt:
            self._check_settings()

    @property
    def enabled(self) -> bool:
        return self._enabled

    def _check_settings(self) -> None:
        s = self.settings
        if not s.algorithms:
            raise ConfigError("JWT verification needs at least one accepted algorithm")
        for alg in s.algorithms:
            if alg.lower() == "none":
                raise ConfigError("algorithm 'none' is never accepted: it means unsigned tokens")
            if alg not in ALGORITHMS:
                raise ConfigError(
                    f"unknown JWT algorithm {alg!r}; supported: {', '.join(sorted(ALGORITHMS))}"
                )
        hmac_algs = [a for a in s.algorithms if a in HMAC_ALGORITHMS]
        if hmac_algs:
            if not s.secret:
                raise ConfigError(f"algorithm {hmac_algs[0]} needs an HMAC secret")
            if "-----BEGIN" in s.secret:
                raise ConfigError(
                    "the HMAC secret is a PEM key: public keys belong with RS/PS/ES/EdDSA, "
                    "never as an HS* secret"
                )
            try:  # PyJWT also refuses secrets that look like SSH or PEM keys
                jwt.get_algorithm_by_name(hmac_algs[0]).prepare_key(s.secret)
            except jwt.InvalidKeyError as exc:
                raise ConfigError(f"the HMAC secret is refused: {exc}") from None
            size = len(s.secret.encode())
            for alg in hmac_algs:
                if size < HMAC_ALGORITHMS[alg]:
                    raise ConfigError(
                        f"the HMAC secret is {size} bytes; {alg} needs at least "
                        f"{HMAC_ALGORITHMS[alg]} (RFC 7518 §3.2), e.g. `openssl rand -base64 64`"
                    )
        elif s.secret:
            raise ConfigError("an HMAC secret is configured but no HS* algorithm is accepted")
        asymmetric = [a for a in s.algorithms if a in ASYMMETRIC_ALGORITHMS]
        for i, pem in enumerate(s.public_keys, 1):
            key = load_public_key(pem, f"public key #{i}")
            if not key_algorithms(key) & set(asymmetric):
                raise ConfigError(
                    f"public key #{i} is {describe_key(key)}, which none of the accepted "
                    f"algorithms ({', '.join(s.algorithms)}) uses"
                )
            self._keys.append(key)
        if self.jwks is None:
            for alg in asymmetric:
                if not any(alg in key_algorithms(k) for k in self._keys):
                    raise ConfigError(f"algorithm {alg} is accepted but no public key fits it")
        elif not asymmetric:
            raise ConfigError("a JWKS URL needs an RS*, PS*, ES* or EdDSA algorithm")
        if not (math.isfinite(s.leeway) and s.leeway >= 0):
            raise ConfigError(f"JWT leeway must be zero or more seconds, not {s.leeway}")
        if not s.claim:
            raise ConfigError("the grants claim name is empty")

    def authenticate(self, token: str | None) -> Grant:
        if not self._enabled:
            return ANONYMOUS
        if not token:
            raise Unauthorized(NO_CREDENTIAL, error=None)  # RFC 6750 §3.1: no error code
        if token.startswith(API_KEY_PREFIX) and self.api_keys is not None:
            return self.api_keys.verify(token)
        if not self._jwt:
            raise Unauthorized("this server accepts API keys (tdk_...) only, not JWTs")
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized(
                f"malformed token: {len(token)} characters; the limit is {MAX_TOKEN_LENGTH}"
            )
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.DecodeError, ValueError, RecursionError):
            raise Unauthorized(
                "malformed token: not a JWT (base64url header.payload.signature)"
            ) from None
        except jwt.PyJWTError as exc:  # a kid that is not a string, an unknown "crit" extension
            raise Unauthorized(f"malformed token: {str(exc)[:120]}") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str):
            raise Unauthorized("malformed token: the header has no alg")
        if not isinstance(kid, str | None):
            raise Unauthorized("malformed token: the header's kid is not a string")
        # RFC 8725 §3.1: the token names its algorithm, the configuration decides.
        if alg not in self.settings.algorithms:
            raise Unauthorized(
                f"algorithm {quote(alg, 20)} not accepted "
                f"(accepted: {', '.join(self.settings.algorithms)})"
            )
        claims = self._verify(token, alg, self._candidates(alg, kid))
        return self._grant(claims)

    def _candidates(self, alg: str, kid: str | None) -> Sequence[str | PublicKey]:
        if alg in HMAC_ALGORITHMS:
            assert self.settings.secret is not None  # checked in _check_settings
            return [self.settings.secret]
        if self.jwks is not None and (kid is not None or not self._keys):
            found = self.jwks.key_for(kid)
            if found is None:
                note = "" if self.jwks.keys else " (no JWKS keys are loaded yet)"
                if kid is None:
                    raise Unauthorized(f"token has no key id (kid) to pick a JWKS key{note}")
                raise Unauthorized(f"unknown key id {quote(kid, 64)}{note}")
            if not found.fits(alg):
                which = "the JWKS key" if kid is None else f"key id {quote(kid, 64)}"
                raise Unauthorized(f"{which} is not for algorithm {alg}")
            return [found.key]
        keys = [k for k in self._keys if alg in key_algorithms(k)]
        if not keys:
            raise Unauthorized(f"no public key configured for algorithm {alg}")
        return keys

    def _verify(self, token: str, alg: str, keys: Sequence[str | PublicKey]) -> dict[str, Any]:
        s = self.settings
        # Time claims are checked below against our clock (``now``); PyJWT reads its own.
        options: Options = {
            "require": ["exp"],
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        }
        for i, key in enumerate(keys):
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=s.audience,
                    issuer=s.issuer,
                    options=options,
                )
            except jwt.InvalidSignatureError:
                if i == len(keys) - 1:
                    raise Unauthorized("bad signature") from None
            except jwt.PyJWTError as exc:
                raise Unauthorized(self._reason(exc)) from None
            else:
                break
        now = self._now()
        exp = _numeric(claims, "exp")
        assert exp is not None  # required above
        if exp <= now - s.leeway:
            raise Unauthorized(f"token expired at {_rfc3339(exp)}")
        nbf = _numeric(claims, "nbf")
        if nbf is not None and nbf > now + s.leeway:
            raise Unauthorized(f"token not valid before {_rfc3339(nbf)}")
        iat = _numeric(claims, "iat")
        if iat is not None and iat > now + s.leeway:
            raise Unauthorized(f"token issued in the future ({_rfc3339(iat)})")
        return claims

    def _reason(self, exc: jwt.PyJWTError) -> str:
        """The refusal for a PyJWT error: which check failed, in our words."""
        s = self.settings
        expected_aud = f"expected {s.audience!r}" if s.audience else "expected none"
        match exc:
            case jwt.MissingRequiredClaimError(claim="aud"):
                return f"wrong audience ({expected_aud}): the token has no aud claim"
            case jwt.MissingRequiredClaimError(claim="iss"):
                return f"wrong issuer (expected {s.issuer!r}): the token has no iss claim"
            case jwt.MissingRequiredClaimError(claim=claim):
                return f"token has no {claim} claim"
            case jwt.InvalidAudienceError():
                return f"wrong audience ({expected_aud})"
            case jwt.InvalidIssuerError():
                return f"wrong issuer (expected {s.issuer!r})"
            case jwt.ExpiredSignatureError():
                return "token expired"
            case jwt.ImmatureSignatureError():
                return "token not valid yet"
            case jwt.InvalidIssuedAtError():
                return "malformed token: iat claim is not a number"
            case InvalidSubjectError():
                return "malformed token: sub claim is not a string"
            case InvalidJTIError():
                return "malformed token: jti claim is not a string"
            case jwt.InvalidSignatureError():
                return "bad signature"
            case jwt.InvalidAlgorithmError():
                return f"algorithm not accepted (accepted: {', '.join(s.algorithms)})"
            case jwt.DecodeError():
                return f"malformed token: {str(exc)[:120]}"
        return f"invalid token: {str(exc)[:120]}"

    def _grant(self, claims: dict[str, Any]) -> Grant:
        name = self.settings.claim
        subject = claims.get("sub")
        if subject is not None and not isinstance(subject, str):
            raise Unauthorized("malformed token: sub claim is not a string")
        raw = claims.get(name)

        def malformed(why: str) -> Unauthorized:
            return Unauthorized(f"claim {name!r} missing or malformed: {why}")

        if raw is None:
            raise malformed("the token has none")
        if not isinstance(raw, dict):
            raise malformed('expected {"subscribe": [...], "publish": [...], "admin": false}')
        unknown = sorted(set(raw) - {"subscribe", "publish", "admin"})
        if unknown:
            raise malformed(
                f"unknown field {quote(unknown[0], 40)} (fields: subscribe, publish, admin)"
            )
        admin = raw.get("admin", False)
        if not isinstance(admin, bool):
            raise malformed("admin must be true or false")
        patterns: dict[str, tuple[Pattern, ...]] = {}
        for field in ("subscribe", "publish"):
            texts = raw.get(field, [])
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise malformed(f"{field} must be a list of patterns")
            try:
                patterns[field] = tuple(dict.fromkeys(Pattern.parse(t) for t in texts))
            except InvalidPattern as exc:
                raise malformed(f"{field}: {exc.detail}") from None
        return Grant(
            subject=subject or "unknown",
            subscribe=patterns["subscribe"],
            publish=patterns["publish"],
            admin=admin,
            expires=_numeric(claims, "exp"),
        )

    def mint(
        self,
        subject: str,
        *,
        subscribe: Sequence[str],
        publish: Sequence[str],
        admin: bool = False,
        ttl: float = 3600,
        private_key: str | None = None,
        key_id: str | None = None,
    ) -> str:
        """A signed token for ``subject`` (for ``tidings token``): with the HMAC secret, or with
        ``private_key`` (PEM) for RS/PS/ES/EdDSA. ``key_id`` sets the ``kid`` header for JWKS.

        Raises InvalidPattern for a bad pattern, ConfigError when nothing can sign or when this
        configuration would refuse the token it just minted.
        """
        s = self.settings
        if not self._jwt:
            raise ConfigError("JWT auth is not configured: there is no key to sign tokens with")
        if not (math.isfinite(ttl) and ttl > 0):
            raise ConfigError(f"a token's lifetime must be positive, not {ttl}")
        grants = {
            "subscribe": [Pattern.parse(t).text for t in dict.fromkeys(subscribe)],
            "publish": [Pattern.parse(t).text for t in dict.fromkeys(publish)],
            "admin": admin,
        }
        key: str | PrivateKey
        if private_key is None:
            hmac_algs = [a for a in s.algorithms if a in HMAC_ALGORITHMS]
            if not hmac_algs or s.secret is None:
                raise ConfigError(
                    f"no HMAC secret to sign with (accepted: {', '.join(s.algorithms)}): "
                    "give the private key of a configured public key"
                )
            alg, key = hmac_algs[0], s.secret
        else:
            key = load_private_key(private_key)
            public = as_public_key(key.public_key(), "private key")
            usable = [a for a in s.algorithms if a in key_algorithms(public)]
            if not usable:
                raise ConfigError(
                    f"the private key is {describe_key(public)}, which none of the accepted "
                    f"algorithms ({', '.join(s.algorithms)}) uses"
                )
            alg = usable[0]
        now = self._now()
        claims: dict[str, Any] = {"sub": subject, "iat": int(now), "exp": int(now + ttl)}
        if s.audience is not None:
            claims["aud"] = s.audience
        if s.issuer is not None:
            claims["iss"] = s.issuer
        claims[s.claim] = grants
        token = jwt.encode(claims, key, algorithm=alg, headers={"kid": key_id} if key_id else None)
        if self.jwks is None:  # JWKS keys are remote: nothing local to check against
            try:
                self.authenticate(token)
            except Unauthorized as exc:
                raise ConfigError(
                    f"this configuration would refuse the token it minted: {exc.detail}"
                ) from None
        return token
