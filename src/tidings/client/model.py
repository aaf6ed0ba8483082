"""What a subscription yields (``ReceivedEvent``, ``ContinuityLost``) and the pure codecs behind it.

Rules:
- An envelope's data decodes by its ``datacontenttype``: JSON data becomes its JSON bytes, text
  becomes UTF-8 bytes, ``data_base64`` becomes the bytes it encodes.
- What a caller publishes encodes the same way back: ``bytes`` go as they are (the server
  recognises JSON or text unless a content type is given), ``str`` goes as UTF-8 text, anything
  else is serialised as JSON.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from .errors import ProtocolError

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


def is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """One event as delivered: its cursor, where and what it is, and its data as bytes."""

    id: str  # the event's cursor, "epoch:sequence"; resume after it with since=id
    channel: str
    type: str
    time: datetime
    content_type: str
    data: bytes
    raw: dict[str, Any] = field(repr=False, compare=False)  # the CloudEvents envelope as sent

    @property
    def cursor(self) -> str:
        return self.id

    def json(self) -> Any:
        """The data parsed as JSON (raises ``orjson.JSONDecodeError`` if it is not JSON)."""
        return orjson.loads(self.data)

    def text(self) -> str:
        return self.data.decode("utf-8")


@dataclass(frozen=True, slots=True)
class ContinuityLost:
    """A subscription could not continue from ``requested``; events in between may be missing.

    The server resumed at ``resumed_at`` (its head at that moment) and the iterator goes on from
    there. ``reason`` is the server's explanation: retention removed the events, the log was
    recreated (another epoch), or the cursor was ahead of the log.
    """

    requested: str | None
    resumed_at: str
    reason: str


@dataclass(frozen=True, slots=True)
class Position:
    """A transport's report that it is subscribed at ``cursor`` (internal to the client)."""

    cursor: str
    recovered: bool = True
    reason: str | None = None


def decode_data(envelope: Mapping[str, Any]) -> bytes:
    if "data_base64" in envelope:
        try:
            return base64.b64decode(envelope["data_base64"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise ProtocolError("protocol", "an event's data_base64 is not base64") from None
    if "data" not in envelope:
        return b""
    data = envelope["data"]
    if isinstance(data, str) and not is_json_type(str(envelope.get("datacontenttype", JSON))):
        return data.encode("utf-8")
    return orjson.dumps(data)


def decode_event(envelope: Any) -> ReceivedEvent:
    """A ``ReceivedEvent`` from a parsed envelope; ``ProtocolError`` if it is not one."""
    try:
        return ReceivedEvent(
            id=str(envelope["id"]),
            channel=str(envelope["channel"]),
            type=str(envelope["type"]),
            time=datetime.fromisoformat(envelope["time"]),
            content_type=str(envelope.get("datacontenttype", JSON)),
            data=decode_data(envelope),
            raw=envelope,
        )
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("protocol", f"not an event envelope: {str(envelope)[:200]}") from None


def parse_json(body: bytes | str, what: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProtocolError("protocol", f"{what} is not JSON: {body[:200]!r}") from None


def encode_data(data: object, content_type: str | None) -> tuple[bytes, str | None]:
    """The request body and Content-Type for publishing ``data`` (see the module rules)."""
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data), content_type
    if isinstance(data, str):
        if content_type is not None and is_json_type(content_type):
            return data.encode("utf-8"), content_type  # already JSON text, as declared
        return data.encode("utf-8"), content_type or TEXT
    return orjson.dumps(data), content_type or JSON


def batch_item(
    channel: str,
    data: object,
    *,
    type: str | None = None,
    content_type: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """One entry of ``POST /publish``, with ``data`` encoded as ``encode_data`` would send it."""
    item: dict[str, Any] = {"channel": channel}
    if type is not None:
        item["type"] = type
    if idempotency_key is not None:
        item["idempotency_key"] = idempotency_key
    body, declared = encode_data(data, content_type)
    if isinstance(data, bytes | bytearray | memoryview):
        item["data_base64"] = base64.b64encode(body).decode("ascii")
    elif declared is not None and is_json_type(declared):
        item["data"] = orjson.loads(body)
    else:
        item["data"] = body.decode("utf-8")
    if declared is not None:
        item["datacontenttype"] = declared
    return item
