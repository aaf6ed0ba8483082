"""Events, cursors, channel names and patterns: the pure model every other module shares.

Rules:
- A channel is ``/``-separated segments of ``[A-Za-z0-9_.:-]``; no empty segment, no ``.``
  or ``..`` segment, at most ``MAX_CHANNEL_LENGTH`` characters and ``MAX_SEGMENTS`` segments.
- A pattern is a channel whose segments may also be ``*`` (exactly one segment) or, as the
  last segment only, ``**`` (one or more segments).
- Channels under ``_tidings/`` are the server's own (operational events, e.g. webhook health):
  only the server publishes there, and only a pattern that names ``_tidings`` as its first
  segment matches them, so ``**`` or ``*/x`` never pick them up by accident (MQTT's ``$SYS``).
- A cursor is ``epoch:sequence``. It is opaque to clients; the same string on every transport.
- An event's wire forms are encoded once and cached on the event (:meth:`Event.wire`), so every
  subscriber of one form shares the same bytes.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from .exceptions import InvalidChannel, InvalidCursor, InvalidEvent, InvalidPattern

MAX_CHANNEL_LENGTH = 255
MAX_SEGMENTS = 32
MAX_TYPE_LENGTH = 128
MAX_IDEMPOTENCY_KEY_LENGTH = 255
DEFAULT_TYPE = "message"
RESERVED_TYPE_PREFIX = "tidings."  # control events (SSE tidings.subscribed, tidings.lagged)
SYSTEM = "_tidings"  # the first segment of the server's own channels

_SEGMENT = re.compile(r"[A-Za-z0-9_.:-]+")
_TYPE = re.compile(r"[A-Za-z0-9_.:/-]+")
_EPOCH = re.compile(r"[a-z0-9]{1,32}")
_SEQ = re.compile(r"[0-9]{1,19}")  # ASCII digits only; str.isdigit() accepts "²" and "١"
MAX_SEQ = 2**63 - 1  # SQLite INTEGER
# RFC 9110 §8.3.1 media type: type "/" subtype, then parameters we keep verbatim.
# Parameters are printable ASCII only: no control characters that could split a header.
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+( *;[\x20-\x7e]*)?")


def _segments(name: str, what: str, error: type[InvalidChannel | InvalidPattern]) -> list[str]:
    if not name:
        raise error(f"{what} is empty")
    if len(name) > MAX_CHANNEL_LENGTH:
        raise error(f"{what} is {len(name)} characters long; the limit is {MAX_CHANNEL_LENGTH}")
    segments = name.split("/")
    if len(segments) > MAX_SEGMENTS:
        raise error(f"{what} {name!r} has {len(segments)} segments; the limit is {MAX_SEGMENTS}")
    return segments


def _check_segment(
    name: str, segment: str, what: str, error: type[InvalidChannel | InvalidPattern]
) -> None:
    if not segment:
        raise error(f"{what} {name!r} has an empty segment (leading, trailing or double '/')")
    if segment in (".", ".."):
        raise error(f"{what} {name!r} has a {segment!r} segment; dot segments are not allowed")
    if not _SEGMENT.fullmatch(segment):
        raise error(
            f"{what} {name!r} has an invalid segment {segment!r}: "
            "segments use only A-Z a-z 0-9 _ . : -"
        )


def validate_channel(name: str) -> str:
    """Return ``name`` if it is a valid channel name (no wildcards), else raise InvalidChannel."""
    for segment in _segments(name, "channel name", InvalidChannel):
        if segment in ("*", "**"):
            raise InvalidChannel(
                f"channel name {name!r} contains the wildcard {segment!r}; "
                "wildcards are only allowed in subscription patterns"
            )
        _check_segment(name, segment, "channel name", InvalidChannel)
    return name


@dataclass(frozen=True, slots=True)
class Pattern:
    """A parsed subscription pattern; ``segments`` keeps ``*`` and a trailing ``**`` as is."""

    text: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Pattern:
        segments = _segments(text, "pattern", InvalidPattern)
        last = len(segments) - 1
        for i, segment in enumerate(segments):
            if segment == "*":
                continue
            if segment == "**":
                if i != last:
                    raise InvalidPattern(
                        f"pattern {text!r} has '**' before its last segment; "
                        "'**' may only end a pattern"
                    )
                continue
            if "*" in segment:
                raise InvalidPattern(
                    f"pattern {text!r} has a partial wildcard {segment!r}; "
                    "'*' and '**' must stand alone as a whole segment"
                )
            _check_segment(text, segment, "pattern", InvalidPattern)
        return cls(text, tuple(segments))

    @property
    def is_exact(self) -> bool:
        return "*" not in self.text

    def matches(self, channel: str) -> bool:
        parts = channel.split("/")
        segments = self.segments
        if parts[0] == SYSTEM and segments[0] != SYSTEM:
            return False
        if segments[-1] == "**":
            fixed = len(segments) - 1
            if len(parts) <= fixed:
                return False
        elif len(parts) != len(segments):
            return False
        else:
            fixed = len(segments)
        return all(s == "*" or s == p for s, p in zip(segments[:fixed], parts, strict=False))

    def glob(self) -> str:
        """A SQLite GLOB that matches a superset of this pattern (exact match is re-checked).

        Channel characters include none of GLOB's specials (``*?[``), so segments go in as is.
        """
        return "/".join("*" if s in ("*", "**") else s for s in self.segments)


def parse_patterns(texts: Iterable[str]) -> tuple[Pattern, ...]:
    patterns = tuple(dict.fromkeys(Pattern.parse(t) for t in texts))
    if not patterns:
        raise InvalidPattern("at least one channel or pattern is required")
    return patterns


def is_system(channel: str) -> bool:
    """Whether ``channel`` is one of the server's own (``_tidings/...``)."""
    return channel == SYSTEM or channel.startswith(SYSTEM + "/")


def matches_any(patterns: tuple[Pattern, ...], channel: str) -> bool:
    return any(p.matches(channel) for p in patterns)


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in the log: ``epoch`` names the log's lifetime, ``seq`` the event in it."""

    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.seq}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        epoch, sep, seq = text.partition(":")
        if not sep or not _EPOCH.fullmatch(epoch) or not _SEQ.fullmatch(seq) or int(seq) > MAX_SEQ:
            raise InvalidCursor(
                f"cursor {text[:80]!r} is not valid: expected 'epoch:sequence' "
                "as returned in an event's id"
            )
        return cls(epoch, int(seq))


def is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def is_text_type(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower().startswith("text/")


@dataclass(frozen=True, slots=True)
class Draft:
    """An event as published, before the log gives it a sequence number."""

    channel: str
    data: bytes
    content_type: str
    type: str = DEFAULT_TYPE
    time: float = 0.0
    idempotency_key: str | None = None


def sniff_content_type(data: bytes) -> str:
    """Content type for a body sent without one (or with curl's form default)."""
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    else:
        return "application/json"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    return "text/plain; charset=utf-8"


def make_draft(
    channel: str,
    data: bytes,
    content_type: str | None = None,
    type: str | None = None,
    idempotency_key: str | None = None,
    now: float | None = None,
) -> Draft:
    """Validate one publish and return its draft; raises a BadRequest subclass naming the fault."""
    validate_channel(channel)
    event_type = DEFAULT_TYPE if type is None else type
    if not event_type or len(event_type) > MAX_TYPE_LENGTH or not _TYPE.fullmatch(event_type):
        raise InvalidEvent(
            f"event type {event_type[:80]!r} is not valid: 1-{MAX_TYPE_LENGTH} characters "
            "of A-Z a-z 0-9 _ . : / -"
        )
    if event_type.startswith(RESERVED_TYPE_PREFIX):
        raise InvalidEvent(
            f"event type {event_type[:80]!r} is reserved: types starting with "
            f"{RESERVED_TYPE_PREFIX!r} are the server's own control messages"
        )
    if content_type is None or not content_type.strip():
        content_type = sniff_content_type(data)
    content_type = content_type.strip()
    if len(content_type) > 255 or not _MEDIA_TYPE.fullmatch(content_type):
        raise InvalidEvent(f"content type {content_type[:80]!r} is not a valid media type")
    if is_json_type(content_type):
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent(
                f"data is declared {content_type} but is not valid JSON: {exc}"
            ) from None
    elif is_text_type(content_type):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEvent(
                f"data is declared {content_type} but is not valid UTF-8 ({exc.reason} at byte "
                f"{exc.start}); send binary data as application/octet-stream"
            ) from None
    if idempotency_key is not None and not (
        0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_LENGTH and idempotency_key.isprintable()
    ):
        raise InvalidEvent(
            f"idempotency key must be 1-{MAX_IDEMPOTENCY_KEY_LENGTH} printable characters"
        )
    return Draft(
        channel=channel,
        data=data,
        content_type=content_type,
        type=event_type,
        time=time.time() if now is None else now,
        idempotency_key=idempotency_key,
    )


class Event:
    """A logged event. Immutable by convention; ``wire`` caches its encodings."""

    __slots__ = (
        "_json",
        "_wire",
        "channel",
        "content_type",
        "cursor",
        "data",
        "epoch",
        "idempotency_key",
        "seq",
        "time",
        "type",
    )

    def __init__(
        self,
        epoch: str,
        seq: int,
        channel: str,
        type: str,
        data: bytes,
        content_type: str,
        time: float,
        idempotency_key: str | None = None,
    ) -> None:
        self.epoch = epoch
        self.seq = seq
        self.cursor = f"{epoch}:{seq}"
        self.channel = channel
        self.type = type
        self.data = data
        self.content_type = content_type
        self.time = time
        self.idempotency_key = idempotency_key
        self._wire: dict[str, bytes] = {}
        self._json: bytes | None = None

    @classmethod
    def from_draft(cls, draft: Draft, epoch: str, seq: int) -> Event:
        return cls(
            epoch,
            seq,
            draft.channel,
            draft.type,
            draft.data,
            draft.content_type,
            draft.time,
            draft.idempotency_key,
        )

    def __repr__(self) -> str:
        return f"Event({self.cursor}, {self.channel!r}, {self.type!r}, {len(self.data)} bytes)"

    def wire(self, form: str, encode: Callable[[Event], bytes]) -> bytes:
        """This event encoded by ``encode``, computed once per ``form`` and then shared."""
        cached = self._wire.get(form)
        if cached is None:
            cached = self._wire[form] = encode(self)
        return cached

    def json(self) -> bytes:
        """The CloudEvents 1.0 JSON envelope, shared by every JSON transport. (Its own slot
        rather than a ``wire`` form: fan-out reads it once per subscriber.)"""
        envelope = self._json
        if envelope is None:
            envelope = self._json = encode_envelope(self)
        return envelope


def format_time(t: float) -> str:
    """RFC 3339 UTC with milliseconds, as CloudEvents' ``time`` wants."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def envelope_fields(event: Event) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": event.cursor,
        "source": f"/channels/{event.channel}",
        "type": event.type,
        "channel": event.channel,
        "time": format_time(event.time),
        "datacontenttype": event.content_type,
    }


def encode_envelope(event: Event) -> bytes:
    """CloudEvents 1.0 JSON format (§3): JSON data embedded, text as a string, else base64."""
    head = envelope_fields(event)
    data = event.data
    if is_json_type(event.content_type):
        if b"\n" in data or b"\r" in data:
            # Keep envelopes on one line (SSE and line-delimited consumers rely on it). In valid
            # JSON a raw CR or LF can only be whitespace between tokens (RFC 8259 §2, §7), so
            # blanking them changes nothing, unlike a re-encode that would round big numbers.
            data = data.replace(b"\r", b" ").replace(b"\n", b" ")
        return orjson.dumps(head)[:-1] + b',"data":' + data.strip() + b"}"
    if is_text_type(event.content_type):
        head["data"] = data.decode("utf-8")
    else:
        head["data_base64"] = base64.b64encode(data).decode("ascii")
    return orjson.dumps(head)
