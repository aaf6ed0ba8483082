"""The WebSocket wire format of tidings (docs/websocket.md), as pure functions.

Rules:
- Client messages are JSON objects with an ``op``; ``parse`` checks one completely (fields,
  types, the ``id``) and returns a ``Message`` or raises ``InvalidMessage`` naming the fault,
  carrying the message's ``id`` when that much could be read.
- A binary frame is a JSON object, a newline, then raw data: ``split_binary``.
- Server messages are built here as bytes. An event message is a per-subscription prefix, the
  event's envelope as encoded once for every transport, and ``}``: no per-subscriber JSON work.
- Frame headers for server frames (unmasked, never fragmented) are written here by hand: the
  websockets library, which does the rest of the protocol, frames one message for one
  connection at a time, while fan-out frames the same payloads for many (RFC 6455 §5.2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import orjson

from .events import Event, envelope_fields, is_json_type, is_text_type
from .exceptions import InvalidMessage

TEXT = 0x1
BINARY = 0x2
MAX_ID_LENGTH = 64
MAX_INT_ID = 2**53  # JSON numbers every client language reads exactly

Id = str | int

# The fields each op accepts besides "op" and "id"; required ones in the second set.
FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "auth": (frozenset({"token"}), frozenset({"token"})),
    "subscribe": (frozenset({"channels", "since", "binary"}), frozenset({"channels"})),
    "unsubscribe": (frozenset({"sub"}), frozenset({"sub"})),
    "publish": (
        frozenset({"channel", "type", "data", "data_base64", "datacontenttype", "idempotency_key"}),
        frozenset({"channel"}),
    ),
    "ping": (frozenset(), frozenset()),
}
OPS = ", ".join(FIELDS)


@dataclass(frozen=True, slots=True)
class Message:
    """One checked client message: ``fields`` holds everything but ``op`` and ``id``."""

    op: str
    id: Id | None
    fields: dict[str, Any]
    data: bytes | None = None  # the raw data of a binary publish frame


def _id(value: Any) -> Id:
    if isinstance(value, str):
        if not 0 < len(value) <= MAX_ID_LENGTH or not value.isprintable():
            raise InvalidMessage(
                f"id must be 1-{MAX_ID_LENGTH} printable characters or an integer, "
                f"not a string of {len(value)}"
            )
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if not -MAX_INT_ID <= value <= MAX_INT_ID:
            raise InvalidMessage("id must be an integer between -2^53 and 2^53, or a string")
        return value
    raise InvalidMessage(
        f"id must be a string or an integer, not {type(value).__name__.replace('dict', 'object')}"
    )


def parse(payload: bytes, data: bytes | None = None) -> Message:
    """Check one client message (the JSON part of a frame); ``data``: a binary frame's data."""
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidMessage("a message must be a JSON object with an 'op'")
    message_id = _id(document["id"]) if document.get("id") is not None else None
    try:
        op = document.get("op")
        if not isinstance(op, str) or op not in FIELDS:
            shown = "no op" if op is None else f"op {str(op)[:40]!r}"
            raise InvalidMessage(f"{shown} is not known; ops: {OPS}")
        allowed, required = FIELDS[op]
        fields = {k: v for k, v in document.items() if k not in ("op", "id")}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise InvalidMessage(
                f"{op} has unknown field {unknown[0][:40]!r}; fields: "
                + (", ".join(sorted(allowed)) or "none")
            )
        missing = sorted(name for name in required if fields.get(name) is None)
        if missing:
            raise InvalidMessage(f"{op} needs {missing[0]!r}")
        if data is not None and op != "publish":
            raise InvalidMessage(f"a binary frame must hold a publish, not {op}")
        _check(op, fields, message_id, data)
    except InvalidMessage as exc:
        exc.id = message_id
        raise
    return Message(op, message_id, fields, data)


def _string(fields: dict[str, Any], name: str, op: str) -> None:
    value = fields.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidMessage(f"{op}.{name} must be a string")


def _check(op: str, fields: dict[str, Any], message_id: Id | None, data: bytes | None) -> None:
    if op == "auth":
        _string(fields, "token", op)
    elif op == "subscribe":
        if message_id is None:
            raise InvalidMessage("subscribe needs an 'id': it names the subscription")
        channels = fields["channels"]
        if isinstance(channels, str):
            fields["channels"] = [channels]
        elif not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise InvalidMessage("subscribe.channels must be a list of strings, or a string")
        _string(fields, "since", op)
        if fields.get("binary") is not None and not isinstance(fields["binary"], bool):
            raise InvalidMessage("subscribe.binary must be true or false")
    elif op == "unsubscribe":
        try:
            fields["sub"] = _id(fields["sub"])
        except InvalidMessage as exc:
            raise InvalidMessage(f"unsubscribe.sub: {exc.detail}") from None
    elif op == "publish":
        for name in ("channel", "type", "data_base64", "datacontenttype", "idempotency_key"):
            _string(fields, name, op)
    if (
        op == "publish"
        and data is not None
        and (fields.get("data") is not None or fields.get("data_base64") is not None)
    ):
        raise InvalidMessage(
            "a binary publish frame carries its data after the newline, not in data or data_base64"
        )


def split_binary(frame: bytes) -> tuple[bytes, bytes]:
    """A binary frame's JSON part and data, split at the first newline."""
    head, newline, data = frame.partition(b"\n")
    if not newline:
        raise InvalidMessage(
            "a binary frame must be a JSON object, a newline (0x0A), then the data"
        )
    return head, data


_LENGTH16 = struct.Struct("!BBH").pack
_LENGTH64 = struct.Struct("!BBQ").pack


def frame_header(length: int, opcode: int = TEXT) -> bytes:
    """The header of one unmasked, final server frame with a payload of ``length`` bytes."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return _LENGTH16(first, 126, length)
    return _LENGTH64(first, 127, length)


def event_prefix(sub: Id) -> bytes:
    """What precedes an event's envelope in the messages of subscription ``sub``."""
    return b'{"op":"event","sub":' + orjson.dumps(sub) + b',"event":'


def is_binary(event: Event) -> bool:
    """Whether the event's data is neither JSON nor text (base64 in JSON envelopes)."""
    ct = event.content_type
    return not is_json_type(ct) and not is_text_type(ct)


def _encode_head(event: Event) -> bytes:
    return orjson.dumps(envelope_fields(event))


def envelope_head(event: Event) -> bytes:
    """The envelope without its data: the JSON part of a binary event frame (cached)."""
    return event.wire("envelope-head", _encode_head)


def event_message(prefix: bytes, event: Event, binary: bool) -> tuple[int, bytes]:
    """The opcode and payload of one event message; binary-data events in a binary frame
    when the subscription asked for them (``binary``). Fan-out's common case (a text frame
    from the shared envelope) is inlined by the transport instead."""
    if binary and is_binary(event):
        return BINARY, b"".join((prefix, envelope_head(event), b"}\n", event.data))
    return TEXT, b"".join((prefix, event.json(), b"}"))


def reply(op: str, message_id: Id | None, **fields: Any) -> bytes:
    body: dict[str, Any] = {"op": op}
    if message_id is not None:
        body["id"] = message_id
    body.update(fields)
    return orjson.dumps(body)


def error(message_id: Id | None, code: str, detail: str, **extra: Any) -> bytes:
    return reply("error", message_id, error=code, detail=detail, **extra)
