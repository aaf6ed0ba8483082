"""Server-Sent Events framing, both ways, as pure functions (WHATWG HTML §9.2).

``message`` builds one event block; ``Decoder`` turns a byte stream back into events, for the
client and the benchmarks. Written here rather than taken from a library because both sides must
agree byte for byte with our resume rules (``id`` persists across events, ``retry`` is advice),
and the whole codec is a few dozen lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from .events import Event

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def message(
    data: bytes,
    *,
    event: str | None = None,
    id: str | None = None,
    retry_ms: int | None = None,
) -> bytes:
    """One SSE event block. Multi-line data becomes one ``data:`` line per line (§9.2.6)."""
    parts: list[bytes] = []
    if retry_ms is not None:
        parts.append(b"retry: %d\n" % retry_ms)
    if id is not None:
        parts.append(b"id: " + id.encode() + b"\n")
    if event is not None:
        parts.append(b"event: " + event.encode() + b"\n")
    for line in _LINE_BREAK.split(data):
        parts.append(b"data: " + line + b"\n")
    parts.append(b"\n")
    return b"".join(parts)


def comment(text: str = "") -> bytes:
    return b": " + text.encode() + b"\n\n"


def encode_event(event: Event) -> bytes:
    """The SSE block for a logged event: ``id`` = cursor, ``event`` = type, data = envelope."""
    envelope = event.json()  # always one line
    kind = b"" if event.type == "message" else b"event: " + event.type.encode() + b"\n"
    return b"id: " + event.cursor.encode() + b"\n" + kind + b"data: " + envelope + b"\n\n"


def sse_bytes(event: Event) -> bytes:
    return event.wire("sse", encode_event)


@dataclass(frozen=True, slots=True)
class ServerEvent:
    data: str
    event: str = "message"
    id: str | None = None  # the last event id in force when this event was dispatched


class Decoder:
    """Incremental SSE parser (§9.2.6 "Interpreting an event stream")."""

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[str] = []
        self._event = ""
        self.last_id: str | None = None
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> Iterator[ServerEvent]:
        buffer = self._pending + chunk
        # A trailing "\r" may be the first half of "\r\n": hold it back until the next chunk.
        hold = b""
        if buffer.endswith(b"\r"):
            buffer, hold = buffer[:-1], b"\r"
        lines = _LINE_BREAK.split(buffer)
        self._pending = lines.pop() + hold  # the unterminated rest
        for raw in lines:
            event = self._line(raw.decode("utf-8", errors="replace"))
            if event is not None:
                yield event

    def _line(self, line: str) -> ServerEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = ServerEvent("\n".join(self._data), self._event or "message", self.last_id)
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None
