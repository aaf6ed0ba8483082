"""Standard Webhooks symmetric signatures: secrets, ``v1`` signatures and the three headers.

Rules (Standard Webhooks spec 1.0.0, "Verifying webhook authenticity"):
- A secret is 24 to 64 random bytes, shown to people as ``whsec_`` + standard base64.
- The signed content is ``{msg_id}.{timestamp}.{body}``; the signature is
  ``v1,`` + base64(HMAC-SHA256(secret, content)).
- ``webhook-signature`` holds one signature per secret, space-separated, so that a receiver
  still verifies while a secret is being rotated; ``webhook-id`` is the same on every attempt
  and ``webhook-timestamp`` (integer Unix seconds) is fresh on each.

Pure functions, no I/O. :func:`parse_secret` reads text from outside and raises
:class:`~tidings.exceptions.InvalidParameter`; the signing functions take values tidings made
itself, so a bad one is a bug and raises :class:`ValueError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence
from secrets import token_bytes

from ..exceptions import InvalidParameter

SECRET_PREFIX = "whsec_"
# Spec "Signature scheme" table: "Random. At least 24 bytes (192 bits, 512 maximum)"; the
# maximum read as 512 bits, which is also the 64 bytes Svix accepts for an endpoint secret.
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
# RFC 2104 §3: a key shorter than the hash output (32 bytes for SHA-256) weakens HMAC.
GENERATED_SECRET_BYTES = 32
SIGNATURE_VERSION = "v1"  # spec: "v1" is HMAC-SHA256; "v1a" (ed25519) is not implemented

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"

# Standard base64 alphabet, padding optional. The reference verifiers decode leniently (they
# drop characters outside the alphabet), so a URL-safe "-"/"_" secret would give them a
# different key from ours: refuse it instead.
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# The id goes into an HTTP header and into the signed content. Spec "Signature scheme": it must
# not contain "."; visible ASCII only, because receivers read header bytes as Latin-1 while
# a non-ASCII id would be signed as UTF-8.
_MSG_ID = re.compile(r"[\x21-\x2d\x2f-\x7e]+")
MAX_MSG_ID_LENGTH = 255


def generate_secret() -> str:
    """A new endpoint secret, ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(GENERATED_SECRET_BYTES)).decode("ascii")


def parse_secret(text: str) -> bytes:
    """The key bytes of a ``whsec_`` secret; :class:`InvalidParameter` for anything else."""
    expected = (
        f"expected '{SECRET_PREFIX}' followed by the standard base64 of "
        f"{MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} random bytes"
    )
    if not isinstance(text, str) or not text.startswith(SECRET_PREFIX):
        raise InvalidParameter(f"webhook secret does not start with '{SECRET_PREFIX}': {expected}")
    encoded = text[len(SECRET_PREFIX) :]
    if not _BASE64.fullmatch(encoded):
        raise InvalidParameter(f"webhook secret is not standard base64: {expected}")
    # Unpadded base64 is accepted, as the reference verifiers accept it.
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(padded, validate=True)
    except binascii.Error:
        raise InvalidParameter(f"webhook secret is not standard base64: {expected}") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise InvalidParameter(f"webhook secret decodes to {len(key)} bytes: {expected}")
    return key


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one attempt, made with one secret."""
    _check_secret(secret)
    mac = hmac.new(secret, _signed_prefix(msg_id, timestamp), hashlib.sha256)
    mac.update(_check_body(body))  # fed separately: the body is not copied
    return f"{SIGNATURE_VERSION},{base64.b64encode(mac.digest()).decode('ascii')}"


def signature_header(secrets: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per secret, in the order given."""
    if isinstance(secrets, bytes | bytearray) or not secrets:
        raise ValueError("signature_header needs a sequence of at least one secret")
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets)


def webhook_headers(
    secrets: Sequence[bytes], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers of one delivery attempt."""
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature_header(secrets, msg_id, timestamp, body),
    }


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes | bytearray):
        raise ValueError(f"a webhook secret must be bytes, not {type(secret).__name__}")
    if not MIN_SECRET_BYTES <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(
            f"a webhook secret must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, "
            f"not {len(secret)}"
        )


def _signed_prefix(msg_id: str, timestamp: int) -> bytes:
    """``{msg_id}.{timestamp}.``: the signed content up to the body."""
    # Spec "Signature scheme": the content to be signed is "{msg_id}.{timestamp}.{payload}".
    if not isinstance(msg_id, str) or not _MSG_ID.fullmatch(msg_id):
        raise ValueError(
            f"webhook id {msg_id!r} must be visible ASCII without '.' "
            "(Standard Webhooks: the id must not contain '.')"
        )
    if len(msg_id) > MAX_MSG_ID_LENGTH:
        raise ValueError(f"webhook id is longer than {MAX_MSG_ID_LENGTH} characters")
    # Spec "Webhook headers": "integer unix timestamp (seconds since epoch)". bool is an int
    # subclass and a float would sign as "1.5": both refused.
    if type(timestamp) is not int or timestamp < 0:
        raise ValueError(f"webhook timestamp {timestamp!r} must be non-negative integer seconds")
    return f"{msg_id}.{timestamp}.".encode("ascii")


def _check_body(body: bytes) -> bytes:
    # A str would need an encoding chosen here; the transport sends bytes, so it signs bytes.
    if not isinstance(body, bytes | bytearray | memoryview):
        raise ValueError(f"a webhook body must be bytes, not {type(body).__name__}")
    return body
