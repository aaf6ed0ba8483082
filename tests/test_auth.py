"""JWT verification, refusals, minting and the JWKS cache (against a local HTTP server)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tidings.auth import (
    ANONYMOUS,
    Authenticator,
    Grant,
    JWKSCache,
    JWTSettings,
)
from tidings.events import Pattern
from tidings.exceptions import ConfigError, Forbidden, InvalidPattern, Unauthorized

# 2024-05-06T07:08:09Z
NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC).timestamp()
SECRET = "s3cr3t-" + "k" * 64  # 71 bytes: long enough for HS512 (RFC 7518 §3.2)
GRANTS = {"subscribe": ["news/*"], "publish": ["news/local"], "admin": False}

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_384_KEY = ec.generate_private_key(ec.SECP384R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
WEAK_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)


def public_pem(key: Any) -> str:
    return str(
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(key: Any) -> str:
    return str(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: object) -> str:
    return b64(json.dumps(obj).encode())


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "iat": int(NOW), "exp": int(NOW) + 3600}
    base["tidings"] = GRANTS
    for name, value in overrides.items():
        if value is None:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def sign(payload: dict[str, Any], key: Any = SECRET, alg: str = "HS256", **headers: Any) -> str:
    return jwt.encode(payload, key, algorithm=alg, headers=headers or None)


def hs(algorithms: tuple[str, ...] = ("HS256",), **settings: Any) -> Authenticator:
    return Authenticator(JWTSettings(algorithms, secret=SECRET, **settings), now=lambda: NOW)


def pk(algorithms: tuple[str, ...], *keys: Any, **settings: Any) -> Authenticator:
    pems = tuple(public_pem(k) for k in keys)
    return Authenticator(JWTSettings(algorithms, public_keys=pems, **settings), now=lambda: NOW)


def refusal(auth: Authenticator, token: str | None) -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        auth.authenticate(token)
    exc = info.value
    assert exc.status == 401 and exc.code == "unauthorized"
    return exc


# -- disabled and missing credentials ----------------------------------------------------------


@pytest.mark.parametrize("settings", [None, JWTSettings()])
def test_disabled_authenticator_grants_everything_to_anonymous(
    settings: JWTSettings | None,
) -> None:
    auth = Authenticator(settings)
    assert not auth.enabled
    for token in (None, "", "garbage"):
        assert auth.authenticate(token) is ANONYMOUS
    assert ANONYMOUS.admin and ANONYMOUS.may_subscribe(Pattern.parse("**"))
    assert ANONYMOUS.may_publish("any/channel")


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token_is_refused_with_a_bare_challenge(token: str | None) -> None:
    exc = refusal(hs(), token)
    assert exc.detail.startswith("no credential: send Authorization: Bearer <token>")
    assert exc.challenge == 'Bearer realm="tidings"'  # RFC 6750 §3.1: no error code


def test_refusal_challenge_names_invalid_token_and_the_reason() -> None:
    exc = refusal(hs(), sign(claims(exp=int(NOW) - 60)))
    assert exc.challenge == (
        'Bearer realm="tidings", error="invalid_token", '
        'error_description="token expired at 2024-05-06T07:07:09Z"'
    )


def test_challenge_cannot_be_broken_by_text_quoted_from_the_token() -> None:
    token = sign(claims(), RSA_KEY, "RS256", kid='k"\r\nSet-Cookie: x=1\\')
    jwks = JWKSCache("http://127.0.0.1:9/unused")
    auth = Authenticator(JWTSettings(("RS256",)), jwks=jwks, now=lambda: NOW)
    exc = refusal(auth, token)
    assert exc.detail.startswith("unknown key id ")
    description = exc.challenge.split('error_description="', 1)[1]
    assert description.endswith('"') and '"' not in description[:-1]
    assert all(" " <= c <= "~" for c in exc.challenge) and "\\" not in exc.challenge


# -- the classic JWT attacks and failures -------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["", "c2lnbmF0dXJl"])
def test_alg_none_is_refused(alg: str, signature: str) -> None:
    token = f"{b64json({'alg': alg, 'typ': 'JWT'})}.{b64json(claims())}.{signature}"
    exc = refusal(hs(), token)
    assert exc.detail == f"algorithm {alg!r} not accepted (accepted: HS256)"


def test_algorithm_confusion_hs256_signed_with_the_rsa_public_key_is_refused() -> None:
    # The attacker knows the public key and uses its PEM as an HMAC secret (CVE-2015-9235 style).
    # PyJWT won't sign that, so the token is built by hand.
    pem = public_pem(RSA_KEY).encode()
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT'})}.{b64json(claims())}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64(mac)}"
    exc = refusal(pk(("RS256",), RSA_KEY), token)
    assert exc.detail == "algorithm 'HS256' not accepted (accepted: RS256)"
    # With both families accepted, an HS* token is checked with the secret and nothing else.
    both = Authenticator(
        JWTSettings(("RS256", "HS256"), secret=SECRET, public_keys=(pem.decode(),)),
        now=lambda: NOW,
    )
    assert refusal(both, token).detail == "bad signature"


def test_algorithm_not_configured_is_refused_even_with_a_good_signature() -> None:
    exc = refusal(hs(("HS256",)), sign(claims(), SECRET, "HS512"))
    assert exc.detail == "algorithm 'HS512' not accepted (accepted: HS256)"


def test_expired_token_is_refused_with_its_expiry_time() -> None:
    exc = refusal(hs(), sign(claims(exp=int(NOW) - 3600)))
    assert exc.detail == "token expired at 2024-05-06T06:08:09Z"


def test_expiry_allows_the_configured_leeway() -> None:
    token = sign(claims(exp=int(NOW) - 3))
    assert hs(leeway=5).authenticate(token).subject == "alice"
    assert refusal(hs(leeway=0), token).detail == "token expired at 2024-05-06T07:08:06Z"


def test_token_not_yet_valid_is_refused() -> None:
    exc = refusal(hs(), sign(claims(nbf=int(NOW) + 600)))
    assert exc.detail == "token not valid before 2024-05-06T07:18:09Z"
    assert hs().authenticate(sign(claims(nbf=int(NOW) + 4))).subject == "alice"  # leeway


def test_token_issued_in_the_future_is_refused() -> None:
    exc = refusal(hs(), sign(claims(iat=int(NOW) + 600)))
    assert exc.detail == "token issued in the future (2024-05-06T07:18:09Z)"


def test_token_without_exp_is_refused() -> None:
    assert refusal(hs(), sign(claims(exp=None))).detail == "token has no exp claim"


@pytest.mark.parametrize("exp", ["9999999999", True, [1], {"t": 1}])
def test_non_numeric_exp_is_refused(exp: object) -> None:
    assert (
        refusal(hs(), sign(claims(exp=exp))).detail == "malformed token: exp claim is not a number"
    )


def test_wrong_audience_is_refused() -> None:
    auth = hs(audience="tidings-api")
    assert refusal(auth, sign(claims(aud="other"))).detail == (
        "wrong audience (expected 'tidings-api')"
    )
    assert refusal(auth, sign(claims())).detail == (
        "wrong audience (expected 'tidings-api'): the token has no aud claim"
    )
    assert auth.authenticate(sign(claims(aud=["x", "tidings-api"]))).subject == "alice"
    # RFC 7519 §4.1.3: a token meant for someone else is refused even if we expect no audience.
    assert refusal(hs(), sign(claims(aud="other"))).detail == "wrong audience (expected none)"


def test_wrong_issuer_is_refused() -> None:
    auth = hs(issuer="https://idp.example")
    assert refusal(auth, sign(claims(iss="https://evil.example"))).detail == (
        "wrong issuer (expected 'https://idp.example')"
    )
    assert refusal(auth, sign(claims())).detail == (
        "wrong issuer (expected 'https://idp.example'): the token has no iss claim"
    )
    assert auth.authenticate(sign(claims(iss="https://idp.example"))).subject == "alice"


def test_tampered_payload_is_refused() -> None:
    header, _, signature = sign(claims()).split(".")
    forged = claims(tidings={"subscribe": ["**"], "publish": ["**"], "admin": True})
    assert refusal(hs(), f"{header}.{b64json(forged)}.{signature}").detail == "bad signature"


def test_tampered_signature_and_wrong_secret_are_refused() -> None:
    header, payload, signature = sign(claims()).split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert refusal(hs(), f"{header}.{payload}.{flipped}").detail == "bad signature"
    other = sign(claims(), "another-secret-" + "z" * 64)
    assert refusal(hs(), other).detail == "bad signature"


def test_token_signed_by_an_unknown_public_key_is_refused() -> None:
    exc = refusal(pk(("RS256",), RSA_KEY), sign(claims(), RSA_KEY_2, "RS256"))
    assert exc.detail == "bad signature"


@pytest.mark.parametrize(
    "token",
    ["abc", "a.b.c", "a.b", "....", "eyJhbGciOiJIUzI1NiJ9.!!!.x", "é.é.é", "Bearer x.y.z"],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    assert refusal(hs(), token).detail.startswith("malformed token")


def test_header_without_alg_is_refused() -> None:
    token = f"{b64json({'typ': 'JWT'})}.{b64json(claims())}.eA"
    assert refusal(hs(), token).detail == "malformed token: the header has no alg"


@pytest.mark.parametrize(
    ("header", "why"),
    [
        ({"alg": "HS256", "kid": 7}, "Key ID header parameter must be a string"),
        ({"alg": "HS256", "crit": ["exp"]}, "Unsupported critical extension: exp"),
    ],
)
def test_bad_header_parameters_are_refused(header: dict[str, Any], why: str) -> None:
    token = f"{b64json(header)}.{b64json(claims())}.eA"
    assert refusal(hs(), token).detail == f"malformed token: {why}"


def test_overlong_token_is_refused_before_decoding() -> None:
    exc = refusal(hs(), "a" * 20_000)
    assert exc.detail == "malformed token: 20000 characters; the limit is 16384"


def test_deeply_nested_header_is_a_malformed_token() -> None:
    header = b64(b"[" * 5000 + b"]" * 5000)
    assert refusal(hs(), f"{header}.e30.x").detail.startswith("malformed token")


def test_refusals_never_quote_the_secret() -> None:
    auth = hs(audience="aud", issuer="iss")
    tokens = [
        sign(claims(exp=1)),
        sign(claims(aud="x", iss="iss")),
        sign(claims(aud="aud", iss="x")),
        sign(claims(), "wrong-" + "w" * 64),
        sign(claims(tidings={"subscribe": ["a//b"]}, aud="aud", iss="iss")),
        "x.y.z",
    ]
    for token in tokens:
        exc = refusal(auth, token)
        assert SECRET not in exc.detail and SECRET not in exc.challenge


# -- the grants claim ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grants", "why"),
    [
        (None, "the token has none"),
        ("news/*", 'expected {"subscribe": [...], "publish": [...], "admin": false}'),
        ({"subscribe": "news/*"}, "subscribe must be a list of patterns"),
        ({"publish": [1]}, "publish must be a list of patterns"),
        ({"admin": "yes"}, "admin must be true or false"),
        (
            {"subscribes": ["news/*"]},
            "unknown field 'subscribes' (fields: subscribe, publish, admin)",
        ),
        ({"subscribe": ["news/../x"]}, "subscribe: pattern 'news/../x' has a '..' segment"),
        ({"publish": ["nеws/*"]}, "publish: pattern 'nеws/*' has an invalid segment 'nеws'"),
        ({"subscribe": ["news/**/x"]}, "subscribe: pattern 'news/**/x' has '**' before"),
    ],
)
def test_malformed_grants_claim_is_refused(grants: object, why: str) -> None:
    exc = refusal(hs(), sign(claims(tidings=grants)))
    assert exc.detail.startswith(f"claim 'tidings' missing or malformed: {why}")


def test_claim_name_is_configurable() -> None:
    auth = hs(claim="https://example.com/tidings")
    token = sign(claims(tidings=None, **{"https://example.com/tidings": GRANTS}))
    assert auth.authenticate(token).subscribe == (Pattern.parse("news/*"),)
    exc = refusal(auth, sign(claims()))
    assert (
        exc.detail == "claim 'https://example.com/tidings' missing or malformed: the token has none"
    )


def test_grant_is_built_from_the_claim() -> None:
    token = sign(
        claims(tidings={"subscribe": ["a/*", "a/*", "b/**"], "publish": [], "admin": True})
    )
    grant = hs().authenticate(token)
    assert grant == Grant(
        subject="alice",
        subscribe=(Pattern.parse("a/*"), Pattern.parse("b/**")),
        publish=(),
        admin=True,
        expires=NOW + 3600,
    )


def test_absent_fields_grant_nothing_and_absent_sub_is_unknown() -> None:
    grant = hs().authenticate(sign(claims(sub=None, tidings={})))
    assert grant.subject == "unknown"
    assert grant.subscribe == () and grant.publish == () and not grant.admin
    with pytest.raises(Forbidden, match=r"^token for 'unknown' has no admin grant$"):
        grant.check_admin()


def test_non_string_sub_is_refused() -> None:
    exc = refusal(hs(), sign(claims(sub=42)))
    assert exc.detail == "malformed token: sub claim is not a string"


# -- accepted tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_valid_hmac_tokens_are_accepted(alg: str) -> None:
    grant = hs(("HS256", "HS384", "HS512")).authenticate(sign(claims(), SECRET, alg))
    assert grant.subject == "alice" and grant.expires == NOW + 3600
    assert grant.may_subscribe(Pattern.parse("news/sport"))
    assert grant.may_publish("news/local") and not grant.may_publish("news/sport")


@pytest.mark.parametrize(
    ("alg", "key"),
    [
        ("RS256", RSA_KEY),
        ("RS512", RSA_KEY),
        ("PS256", RSA_KEY),
        ("ES256", EC_KEY),
        ("ES384", EC_384_KEY),
        ("EdDSA", ED_KEY),
    ],
)
def test_valid_public_key_tokens_are_accepted(alg: str, key: Any) -> None:
    auth = pk((alg,), key)
    assert auth.authenticate(sign(claims(), key, alg)).subject == "alice"


def test_each_configured_public_key_is_tried() -> None:
    auth = pk(("RS256", "ES256", "EdDSA"), RSA_KEY, RSA_KEY_2, EC_KEY, ED_KEY)
    for key, alg in [
        (RSA_KEY, "RS256"),
        (RSA_KEY_2, "RS256"),
        (EC_KEY, "ES256"),
        (ED_KEY, "EdDSA"),
    ]:
        assert auth.authenticate(sign(claims(), key, alg)).subject == "alice"


def test_public_key_may_be_given_as_a_certificate() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(EC_KEY.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2024, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2034, 1, 1, tzinfo=UTC))
        .sign(EC_KEY, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    auth = Authenticator(JWTSettings(("ES256",), public_keys=(pem,)), now=lambda: NOW)
    assert auth.authenticate(sign(claims(), EC_KEY, "ES256")).subject == "alice"


def test_hmac_and_public_key_families_together() -> None:
    auth = Authenticator(
        JWTSettings(("HS256", "ES256"), secret=SECRET, public_keys=(public_pem(EC_KEY),)),
        now=lambda: NOW,
    )
    assert auth.authenticate(sign(claims(), SECRET, "HS256")).subject == "alice"
    assert auth.authenticate(sign(claims(), EC_KEY, "ES256")).subject == "alice"


def test_clock_is_injected() -> None:
    token = sign(claims())
    late = Authenticator(JWTSettings(("HS256",), secret=SECRET), now=lambda: NOW + 7200)
    assert refusal(late, token).detail == "token expired at 2024-05-06T08:08:09Z"


# -- configuration errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (JWTSettings(secret=SECRET), "at least one accepted algorithm"),
        (JWTSettings(("none",), secret=SECRET), "algorithm 'none' is never accepted"),
        (JWTSettings(("HS257",), secret=SECRET), "unknown JWT algorithm 'HS257'"),
        (JWTSettings(("HS256",)), "HS256 needs an HMAC secret"),
        (JWTSettings(("HS256",), secret="short"), "secret is 5 bytes; HS256 needs at least 32"),
        (JWTSettings(("HS512",), secret="k" * 48), "secret is 48 bytes; HS512 needs at least 64"),
        (JWTSettings(("HS256",), secret=public_pem(RSA_KEY)), "the HMAC secret is a PEM key"),
        (
            JWTSettings(("HS256",), secret="ssh-ed25519 " + "A" * 68),
            "the HMAC secret is refused: The specified key is an asymmetric key",
        ),
        (
            JWTSettings(("RS256",), secret=SECRET, public_keys=(public_pem(RSA_KEY),)),
            "no HS* algorithm is accepted",
        ),
        (JWTSettings(("RS256",)), "algorithm RS256 is accepted but no public key fits it"),
        (
            JWTSettings(("RS256", "ES256"), public_keys=(public_pem(RSA_KEY),)),
            "algorithm ES256 is accepted but no public key fits it",
        ),
        (
            JWTSettings(("ES256",), public_keys=(public_pem(EC_384_KEY),)),
            "public key #1 is an EC secp384r1 key, which none of the accepted algorithms",
        ),
        (
            JWTSettings(("RS256",), public_keys=(private_pem(RSA_KEY),)),
            "public key #1 is a private key",
        ),
        (JWTSettings(("RS256",), public_keys=("not a key",)), "not a PEM public key"),
        (
            JWTSettings(("RS256",), public_keys=(public_pem(RSA_KEY),), leeway=-1),
            "leeway must be zero or more",
        ),
    ],
)
def test_bad_settings_are_config_errors(settings: JWTSettings, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        Authenticator(settings)


def test_short_rsa_keys_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="RSA-1024 key; use 2048 bits or more"):
        Authenticator(JWTSettings(("RS256",), public_keys=(public_pem(WEAK_RSA_KEY),)))


def test_jwks_needs_a_public_key_algorithm() -> None:
    with pytest.raises(ConfigError, match="JWKS URL needs"):
        Authenticator(JWTSettings(("HS256",), secret=SECRET), jwks=JWKSCache("http://x/"))


# -- minting -------------------------------------------------------------------------------------


def test_mint_with_the_secret_round_trips() -> None:
    auth = hs(("HS384", "HS256"), audience="api", issuer="me")
    token = auth.mint("bob", subscribe=["news/*", "alerts/**"], publish=["news/bob"], ttl=60)
    assert jwt.get_unverified_header(token)["alg"] == "HS384"
    payload = jwt.decode(
        token,
        SECRET,
        algorithms=["HS384"],
        audience="api",
        issuer="me",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert (
        payload["iat"] == int(NOW) and payload["exp"] == int(NOW) + 60 and payload["sub"] == "bob"
    )
    grant = auth.authenticate(token)
    assert grant == Grant(
        "bob",
        (Pattern.parse("news/*"), Pattern.parse("alerts/**")),
        (Pattern.parse("news/bob"),),
        admin=False,
        expires=NOW + 60,
    )


@pytest.mark.parametrize(
    ("algorithms", "key"),
    [
        (("RS256",), RSA_KEY),
        (("PS384", "RS256"), RSA_KEY),
        (("ES256",), EC_KEY),
        (("EdDSA",), ED_KEY),
    ],
)
def test_mint_with_a_private_key_round_trips(algorithms: tuple[str, ...], key: Any) -> None:
    auth = pk(algorithms, key)
    token = auth.mint(
        "svc", subscribe=[], publish=["jobs/**"], admin=True, private_key=private_pem(key)
    )
    assert jwt.get_unverified_header(token)["alg"] == algorithms[0]
    grant = auth.authenticate(token)
    assert grant.subject == "svc" and grant.admin and grant.may_publish("jobs/a/b")


def test_minted_token_expires_after_its_ttl() -> None:
    clock = [NOW]
    auth = Authenticator(JWTSettings(("HS256",), secret=SECRET), now=lambda: clock[0])
    token = auth.mint("bob", subscribe=["a"], publish=[], ttl=60)
    clock[0] = NOW + 60 + 5  # exp + leeway
    assert refusal(auth, token).detail == "token expired at 2024-05-06T07:09:09Z"


def test_mint_refuses_what_it_cannot_sign() -> None:
    with pytest.raises(ConfigError, match="auth is not configured"):
        Authenticator(None).mint("x", subscribe=[], publish=[])
    with pytest.raises(ConfigError, match="no HMAC secret to sign with"):
        pk(("RS256",), RSA_KEY).mint("x", subscribe=[], publish=[])
    with pytest.raises(ConfigError, match="an EC secp256r1 key, which none of the accepted"):
        pk(("RS256",), RSA_KEY).mint("x", subscribe=[], publish=[], private_key=private_pem(EC_KEY))
    with pytest.raises(ConfigError, match="would refuse the token it minted: bad signature"):
        pk(("RS256",), RSA_KEY).mint(
            "x", subscribe=[], publish=[], private_key=private_pem(RSA_KEY_2)
        )
    with pytest.raises(ConfigError, match="not a PEM private key"):
        pk(("RS256",), RSA_KEY).mint("x", subscribe=[], publish=[], private_key=public_pem(RSA_KEY))
    with pytest.raises(ConfigError, match="lifetime must be positive"):
        hs().mint("x", subscribe=[], publish=[], ttl=0)
    with pytest.raises(InvalidPattern):
        hs().mint("x", subscribe=["news/../x"], publish=[])


# -- JWKS ----------------------------------------------------------------------------------------


def jwk(key: Any, kid: str | None, alg: str | None = None, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = OKPAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        data["kid"] = kid
    if alg is not None:
        data["alg"] = alg
    return {**data, **extra}


class JWKSServer:
    """A JWKS endpoint on 127.0.0.1:<free port>; ``document`` and ``status`` can be changed."""

    def __init__(self) -> None:
        self.document: bytes = b'{"keys": []}'
        self.status = 200
        self.hits = 0
        self.release = threading.Event()  # cleared: requests hang until it is set
        self.release.set()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits += 1
                owner.release.wait(10)
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(owner.document)))
                self.end_headers()
                self.wfile.write(owner.document)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    def publish(self, *keys: dict[str, Any]) -> None:
        self.document = json.dumps({"keys": list(keys)}).encode()


@pytest.fixture
def jwks_server() -> Iterator[JWKSServer]:
    server = JWKSServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.httpd.shutdown()
        server.httpd.server_close()


async def eventually(condition: Callable[[], bool], seconds: float = 5) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def jwks_auth(cache: JWKSCache, algorithms: tuple[str, ...] = ("RS256", "ES256")) -> Authenticator:
    return Authenticator(JWTSettings(algorithms), jwks=cache, now=lambda: NOW)


async def test_jwks_keys_are_fetched_by_refresh_and_picked_by_kid(jwks_server: JWKSServer) -> None:
    jwks_server.publish(jwk(RSA_KEY, "rsa-1"), jwk(EC_KEY, "ec-1", "ES256"))
    cache = JWKSCache(jwks_server.url)
    auth = jwks_auth(cache)
    assert refusal(auth, sign(claims(), RSA_KEY, "RS256", kid="rsa-1")).detail == (
        "unknown key id 'rsa-1' (no JWKS keys are loaded yet)"  # authenticate never fetches
    )
    assert jwks_server.hits == 0
    await cache.refresh()
    assert jwks_server.hits == 1 and cache.last_error is None
    assert {k.kid for k in cache.keys} == {"rsa-1", "ec-1"}
    assert auth.authenticate(sign(claims(), RSA_KEY, "RS256", kid="rsa-1")).subject == "alice"
    assert auth.authenticate(sign(claims(), EC_KEY, "ES256", kid="ec-1")).subject == "alice"
    assert jwks_server.hits == 1


async def test_unknown_kid_is_refused(jwks_server: JWKSServer) -> None:
    jwks_server.publish(jwk(RSA_KEY, "rsa-1"))
    cache = JWKSCache(jwks_server.url)
    await cache.refresh()
    exc = refusal(jwks_auth(cache), sign(claims(), RSA_KEY, "RS256", kid="rsa-2"))
    assert exc.detail == "unknown key id 'rsa-2'"


async def test_jwks_key_must_fit_the_token_algorithm(jwks_server: JWKSServer) -> None:
    jwks_server.publish(jwk(RSA_KEY, "rs512-only", "RS512"), jwk(RSA_KEY_2, "rsa-2"))
    cache = JWKSCache(jwks_server.url)
    await cache.refresh()
    auth = jwks_auth(cache, ("RS256", "RS512", "ES256"))
    token = sign(claims(), RSA_KEY, "RS256", kid="rs512-only")
    assert refusal(auth, token).detail == "key id 'rs512-only' is not for algorithm RS256"
    forged = sign(claims(), RSA_KEY, "RS256", kid="rsa-2")  # signed with another key's kid
    assert refusal(auth, forged).detail == "bad signature"
    wrong_family = sign(claims(), EC_KEY, "ES256", kid="rsa-2")
    assert refusal(auth, wrong_family).detail == "key id 'rsa-2' is not for algorithm ES256"


async def test_token_without_kid_uses_the_only_jwks_key(jwks_server: JWKSServer) -> None:
    jwks_server.publish(jwk(RSA_KEY, "rsa-1"))
    cache = JWKSCache(jwks_server.url)
    await cache.refresh()
    auth = jwks_auth(cache)
    assert auth.authenticate(sign(claims(), RSA_KEY, "RS256")).subject == "alice"
    jwks_server.publish(jwk(RSA_KEY, "rsa-1"), jwk(RSA_KEY_2, "rsa-2"))
    await cache.refresh()
    assert refusal(auth, sign(claims(), RSA_KEY, "RS256")).detail == (
        "token has no key id (kid) to pick a JWKS key"
    )


@pytest.mark.parametrize(
    ("status", "document", "why"),
    [
        (500, b"oops", "HTTPStatusError: Server error '500 Internal Server Error'"),
        (200, b"not json", "JSONDecodeError"),
        (200, b'{"keys": "nope"}', "ValueError: not a JWK Set"),
        (200, b"[]", "ValueError: not a JWK Set"),
        # shared secrets are never taken from a JWKS
        (200, b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "ValueError: no usable signing key"),
        (
            200,
            b'{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "bad"}]}',
            "ValueError: no usable signing key (key 'bad': Unable to construct key from JWK",
        ),
        (
            200,
            json.dumps({"keys": [jwk(WEAK_RSA_KEY, "tiny")]}).encode(),
            "ValueError: no usable signing key (key 'tiny': key 'tiny' is an RSA-1024 key",
        ),
        (
            200,
            b'{"keys": [{"kty": "RSA", "alg": [1]}, {"kty": "EC"}, 7]}',
            "ValueError: no usable signing key (key 0: kid and alg must be strings; key 1: ",
        ),
        (200, b" " * (1024 * 1024 + 1), "ValueError: the document is over 1048576 bytes"),
    ],
)
async def test_failed_refresh_keeps_the_old_keys(
    jwks_server: JWKSServer, status: int, document: bytes, why: str
) -> None:
    jwks_server.publish(jwk(RSA_KEY, "rsa-1"))
    cache = JWKSCache(jwks_server.url)
    await cache.refresh()
    jwks_server.status, jwks_server.document = status, document
    await cache.refresh()
    assert cache.last_error is not None and cache.last_error.startswith(why)
    assert [k.kid for k in cache.keys] == ["rsa-1"]
    assert jwks_auth(cache).authenticate(sign(claims(), RSA_KEY, "RS256", kid="rsa-1"))


async def test_unreachable_jwks_is_reported_not_raised() -> None:
    cache = JWKSCache("http://127.0.0.1:9/jwks.json", timeout=2)
    await cache.refresh()
    assert cache.keys == () and cache.last_error is not None and "ConnectError" in cache.last_error


async def test_jwks_skips_encryption_keys_and_unusable_entries(jwks_server: JWKSServer) -> None:
    jwks_server.publish(
        jwk(RSA_KEY_2, "enc", use="enc"),
        {"kty": "RSA", "kid": "broken"},
        {"kty": "OKP", "crv": "X25519", "x": "AAAA", "kid": "x"},
        jwk(ED_KEY, "ed"),
    )
    cache = JWKSCache(jwks_server.url)
    await cache.refresh()
    assert [k.kid for k in cache.keys] == ["ed"]


async def test_run_fetches_rotated_keys_soon_after_an_unknown_kid(jwks_server: JWKSServer) -> None:
    jwks_server.publish(jwk(RSA_KEY, "old"))
    cache = JWKSCache(jwks_server.url, min_refresh=0.05)
    auth = jwks_auth(cache)
    await cache.refresh()  # as the server does before starting the loop
    stopping = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(cache.run(stopping, interval=3600))
        await asyncio.sleep(0.2)
        assert jwks_server.hits == 1  # keys are fresh: no refetch before the interval
        jwks_server.publish(jwk(RSA_KEY, "old"), jwk(RSA_KEY_2, "new"))
        token = sign(claims(), RSA_KEY_2, "RS256", kid="new")
        assert refusal(auth, token).detail == "unknown key id 'new'"
        await eventually(lambda: cache.key_for("new") is not None)
        assert auth.authenticate(token).subject == "alice"
        await asyncio.sleep(0.2)
        assert jwks_server.hits == 2  # stale mark cleared: no more fetches
        stopping.set()


async def test_run_stops_promptly(jwks_server: JWKSServer) -> None:
    jwks_server.publish(jwk(RSA_KEY, "k"))
    cache = JWKSCache(jwks_server.url)
    stopping = asyncio.Event()
    task = asyncio.create_task(cache.run(stopping))
    await eventually(lambda: bool(cache.keys))
    assert cache.keys  # the first run fetches at once when nothing was fetched before
    stopping.set()
    await asyncio.wait_for(task, 1)


async def test_run_stops_promptly_even_while_a_fetch_hangs(jwks_server: JWKSServer) -> None:
    jwks_server.release.clear()
    cache = JWKSCache(jwks_server.url)
    stopping = asyncio.Event()
    task = asyncio.create_task(cache.run(stopping))
    await eventually(lambda: jwks_server.hits == 1)
    stopping.set()
    await asyncio.wait_for(task, 1)
    assert cache.keys == ()


def test_mint_with_key_id_round_trips_through_jwks() -> None:
    cache = JWKSCache("http://127.0.0.1:9/unused")
    auth = jwks_auth(cache, ("ES256",))
    token = auth.mint(
        "svc", subscribe=["a"], publish=[], private_key=private_pem(EC_KEY), key_id="k"
    )
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": "k", "typ": "JWT"}


# -- helpers for the Forbidden messages used by transports -----------------------------------------


def test_forbidden_names_the_pattern_and_the_subject() -> None:
    grant = hs().authenticate(sign(claims()))
    with pytest.raises(Forbidden) as info:
        grant.check_subscribe([Pattern.parse("news/a"), Pattern.parse("orders/**")])
    assert (
        info.value.detail == "token for 'alice' may not subscribe to 'orders/**' (granted: news/*)"
    )
    assert info.value.status == 403 and info.value.code == "forbidden"
    assert 'error="insufficient_scope"' in info.value.challenge
    with pytest.raises(Forbidden) as info:
        grant.check_publish("news/sport")
    assert (
        info.value.detail
        == "token for 'alice' may not publish to 'news/sport' (granted: news/local)"
    )


def test_nobody_publishes_to_the_servers_own_channels() -> None:
    from tidings.auth.grants import ANONYMOUS

    with pytest.raises(Forbidden, match=r"channel '_tidings/webhooks/x' is reserved"):
        ANONYMOUS.check_publish("_tidings/webhooks/x")
    ANONYMOUS.check_publish("tidings/webhooks/x")


def test_a_grant_of_everything_does_not_cover_the_servers_own_channels() -> None:
    from tidings.auth.grants import Grant

    everything = Grant("u", (Pattern.parse("**"),), ())
    system = Pattern.parse("_tidings/webhooks/*")
    assert not everything.may_subscribe(system)
    assert not everything.may_subscribe(Pattern.parse("_tidings/**"))
    assert everything.may_subscribe(Pattern.parse("*/webhooks/*"))  # matches no system channel
    named = Grant("u", (Pattern.parse("_tidings/webhooks/**"),), ())
    assert named.may_subscribe(system)
    assert Grant("admin", (), (), admin=True).may_subscribe(system)
