"""Standard Webhooks signatures: the spec's test vector, and every signed request verified by
the ``standardwebhooks`` and ``svix`` packages' own verifiers, during secret rotation too.

Both verifiers come from the ``dev`` extra. Without one, its tests skip with the reason on a
laptop and fail under ``CI=true`` (CI must never skip them silently).
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable

import pytest

from tidings.exceptions import InvalidParameter
from tidings.webhooks.signing import (
    generate_secret,
    parse_secret,
    sign,
    signature_header,
    webhook_headers,
)

try:
    import standardwebhooks
except ImportError:  # pragma: no cover - depends on the environment
    standardwebhooks = None
try:
    import svix
except ImportError:  # pragma: no cover - depends on the environment
    svix = None

# The published test vector of Standard Webhooks: standard-webhooks/standard-webhooks,
# libraries/python/tests/test_webhooks.py `test_sign_function` (the same values are in the
# repository's other libraries' tests, and in Svix's). The spec text, spec/standard-webhooks.md,
# defines the scheme but prints no secret to check against.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

MSG_ID = "k3v9x2:42"  # an event cursor, as the webhook transport sends it
BODY = b'{"id":"k3v9x2:42","channel":"orders/7","type":"order.paid","data":{"total":"12.50"}}'

Verify = Callable[[str, bytes, dict[str, str]], None]


def _missing(package: str) -> pytest.MarkDecorator:
    reason = f"the {package!r} package is not installed (pip install -e '.[dev]')"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must verify with it", pytrace=False)
    return pytest.mark.skip(reason=reason)


def _verify_standardwebhooks(secret: str, body: bytes, headers: dict[str, str]) -> None:
    standardwebhooks.Webhook(secret).verify(body, headers)


def _verify_svix(secret: str, body: bytes, headers: dict[str, str]) -> None:
    svix.Webhook(secret).verify(body, headers)


VERIFIERS = [
    pytest.param(
        _verify_standardwebhooks,
        id="standardwebhooks",
        marks=() if standardwebhooks is not None else _missing("standardwebhooks"),
    ),
    pytest.param(_verify_svix, id="svix", marks=() if svix is not None else _missing("svix")),
]


def _rejected() -> type[Exception]:
    # svix re-exports the standardwebhooks error; either package alone is enough to name it.
    module = standardwebhooks if standardwebhooks is not None else svix
    assert module is not None
    error: type[Exception] = module.WebhookVerificationError
    return error


def _now() -> int:
    # Both verifiers refuse a timestamp more than 5 minutes from their clock.
    return int(time.time())


# --- the spec's test vector ------------------------------------------------------------------


def test_sign_reproduces_the_published_test_vector() -> None:
    key = parse_secret(VECTOR_SECRET)
    assert sign(key, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == VECTOR_SIGNATURE


def test_headers_carry_the_vector_id_timestamp_and_signature() -> None:
    key = parse_secret(VECTOR_SECRET)
    assert webhook_headers([key], VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": "1614265330",
        "webhook-signature": VECTOR_SIGNATURE,
    }


# --- secrets ---------------------------------------------------------------------------------


def test_generated_secret_is_whsec_base64_of_enough_random_bytes() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_")
    key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    assert 24 <= len(key) <= 32
    assert parse_secret(secret) == key


def test_generated_secrets_differ() -> None:
    assert len({generate_secret() for _ in range(50)}) == 50


def test_parse_secret_accepts_unpadded_base64_like_the_reference_verifiers() -> None:
    padded = "whsec_" + base64.b64encode(bytes(range(25))).decode()
    assert padded.endswith("==")
    assert parse_secret(padded.rstrip("=")) == parse_secret(padded) == bytes(range(25))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "does not start with 'whsec_'"),
        ("WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "does not start with 'whsec_'"),
        ("", "does not start with 'whsec_'"),
        ("whsec_", "is not standard base64"),
        ("whsec_MfKQ9r8GKYqrTwjUPD8I LPZIo2LaLaSw", "is not standard base64"),
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n", "is not standard base64"),
        # URL-safe alphabet: the reference verifiers would silently drop "-" and "_".
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa-_", "is not standard base64"),
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwA", "is not standard base64"),  # 4n+1 chars
        ("whsec_MfKQ=9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "is not standard base64"),
        ("whsec_" + base64.b64encode(b"x" * 23).decode(), "decodes to 23 bytes"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "decodes to 65 bytes"),
    ],
)
def test_parse_secret_refuses_anything_but_whsec_base64_with_the_reason(
    text: str, message: str
) -> None:
    with pytest.raises(InvalidParameter, match=message) as caught:
        parse_secret(text)
    assert "expected 'whsec_' followed by the standard base64 of 24 to 64 random bytes" in str(
        caught.value
    )
    assert caught.value.status == 400
    assert caught.value.code == "invalid_parameter"


def test_parse_secret_does_not_echo_the_secret_in_its_message() -> None:
    text = "whsec_" + base64.b64encode(b"s" * 10).decode()
    with pytest.raises(InvalidParameter) as caught:
        parse_secret(text)
    assert text.removeprefix("whsec_") not in str(caught.value)


# --- what the signer refuses -----------------------------------------------------------------


@pytest.mark.parametrize(
    "msg_id",
    ["", "msg.1", "k3v9x2:42.", "has space", "tab\tid", "crlf\r\nx-evil: 1", "é", "x" * 256],
)
def test_sign_refuses_an_id_that_is_empty_dotted_or_not_a_header_token(msg_id: str) -> None:
    with pytest.raises(ValueError, match="webhook id"):
        sign(b"k" * 32, msg_id, 1614265330, b"{}")


@pytest.mark.parametrize("timestamp", [-1, 1614265330.5, 1614265330.0, "1614265330", True])
def test_sign_refuses_a_timestamp_that_is_not_non_negative_integer_seconds(
    timestamp: object,
) -> None:
    with pytest.raises(ValueError, match="webhook timestamp"):
        sign(b"k" * 32, MSG_ID, timestamp, b"{}")  # type: ignore[arg-type]


@pytest.mark.parametrize("secret", [b"", b"k" * 23, b"k" * 65, "k" * 32])
def test_sign_refuses_a_secret_of_the_wrong_type_or_size(secret: object) -> None:
    with pytest.raises(ValueError, match="webhook secret"):
        sign(secret, MSG_ID, 1614265330, b"{}")  # type: ignore[arg-type]


def test_sign_refuses_a_str_body() -> None:
    with pytest.raises(ValueError, match="body must be bytes"):
        sign(b"k" * 32, MSG_ID, 1614265330, "{}")  # type: ignore[arg-type]


@pytest.mark.parametrize("secrets", [[], (), b"k" * 32])
def test_signature_header_needs_at_least_one_secret(secrets: object) -> None:
    with pytest.raises(ValueError, match="at least one secret"):
        signature_header(secrets, MSG_ID, 1614265330, b"{}")  # type: ignore[arg-type]


def test_signature_header_signs_with_each_secret_in_order() -> None:
    new, old = parse_secret(generate_secret()), parse_secret(generate_secret())
    header = signature_header([new, old], MSG_ID, 1614265330, BODY)
    assert header == f"{sign(new, MSG_ID, 1614265330, BODY)} {sign(old, MSG_ID, 1614265330, BODY)}"


def test_each_attempt_keeps_the_id_and_changes_the_timestamp_and_signature() -> None:
    key = parse_secret(generate_secret())
    first = webhook_headers([key], MSG_ID, 1614265330, BODY)
    retry = webhook_headers([key], MSG_ID, 1614265335, BODY)
    assert first["webhook-id"] == retry["webhook-id"] == MSG_ID
    assert first["webhook-timestamp"] != retry["webhook-timestamp"]
    assert first["webhook-signature"] != retry["webhook-signature"]


# --- the reference verifiers -----------------------------------------------------------------


@pytest.mark.parametrize("verify", VERIFIERS)
def test_reference_verifier_accepts_what_we_sign(verify: Verify) -> None:
    secret = generate_secret()
    headers = webhook_headers([parse_secret(secret)], MSG_ID, _now(), BODY)
    verify(secret, BODY, headers)


@pytest.mark.parametrize("verify", VERIFIERS)
def test_reference_verifier_accepts_the_published_vector_signature_of_ours(
    verify: Verify,
) -> None:
    # The vector's own timestamp is years outside the verifiers' 5 minutes, so sign it now.
    headers = webhook_headers([parse_secret(VECTOR_SECRET)], VECTOR_ID, _now(), VECTOR_BODY)
    verify(VECTOR_SECRET, VECTOR_BODY, headers)


@pytest.mark.parametrize("verify", VERIFIERS)
def test_reference_verifier_accepts_non_ascii_json_bodies(verify: Verify) -> None:
    secret = generate_secret()
    body = '{"data":"Grüße, 東京 🎉"}'.encode()
    verify(secret, body, webhook_headers([parse_secret(secret)], MSG_ID, _now(), body))


@pytest.mark.parametrize("verify", VERIFIERS)
@pytest.mark.parametrize("receiver_knows", ["old", "new"])
def test_during_rotation_a_receiver_knowing_either_secret_verifies(
    verify: Verify, receiver_knows: str
) -> None:
    old, new = generate_secret(), generate_secret()
    headers = webhook_headers([parse_secret(new), parse_secret(old)], MSG_ID, _now(), BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    verify(old if receiver_knows == "old" else new, BODY, headers)


@pytest.mark.parametrize("verify", VERIFIERS)
def test_during_rotation_a_receiver_knowing_neither_secret_rejects(verify: Verify) -> None:
    old, new, other = generate_secret(), generate_secret(), generate_secret()
    headers = webhook_headers([parse_secret(new), parse_secret(old)], MSG_ID, _now(), BODY)
    with pytest.raises(_rejected(), match="No matching signature"):
        verify(other, BODY, headers)


@pytest.mark.parametrize("verify", VERIFIERS)
@pytest.mark.parametrize("rotating", [False, True], ids=["one-secret", "rotating"])
@pytest.mark.parametrize("tamper", ["body", "timestamp", "id"])
def test_reference_verifier_rejects_a_tampered_request(
    verify: Verify, rotating: bool, tamper: str
) -> None:
    secret, old = generate_secret(), generate_secret()
    keys = [parse_secret(secret), parse_secret(old)] if rotating else [parse_secret(secret)]
    timestamp = _now()
    headers = webhook_headers(keys, MSG_ID, timestamp, BODY)
    body = BODY
    if tamper == "body":
        body = BODY.replace(b"12.50", b"1250.")
    elif tamper == "timestamp":
        # Still within the verifiers' tolerance, so only the signature can catch it.
        headers["webhook-timestamp"] = str(timestamp - 1)
    else:
        headers["webhook-id"] = "k3v9x2:43"
    with pytest.raises(_rejected(), match="No matching signature"):
        verify(secret, body, headers)
