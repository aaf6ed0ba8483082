"""Channel names, patterns, cursors, drafts and the CloudEvents envelope: plain calls, no I/O."""

from __future__ import annotations

import base64
import fnmatch
import re
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
import pytest

from tidings.events import (
    MAX_CHANNEL_LENGTH,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    MAX_SEGMENTS,
    MAX_TYPE_LENGTH,
    Cursor,
    Draft,
    Event,
    Pattern,
    encode_envelope,
    make_draft,
    validate_channel,
)
from tidings.exceptions import (
    BadRequest,
    InvalidChannel,
    InvalidCursor,
    InvalidEvent,
    InvalidPattern,
)

# 2024-05-06T07:08:09.123Z
T0 = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC).timestamp()


def event_from(draft: Draft, epoch: str = "ab12", seq: int = 7) -> Event:
    return Event.from_draft(draft, epoch, seq)


def envelope(draft: Draft) -> dict[str, object]:
    body = encode_envelope(event_from(draft))
    decoded = orjson.loads(body)
    assert isinstance(decoded, dict)
    return decoded


# -- channel names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "orders",
        "orders/42",
        "orders/42/status",
        "Orders_2024-05.v1:eu",
        "a.b",
        "...",  # only '.' and '..' whole segments are forbidden
        "a/.hidden",
        "a/b..c",
        "x" * MAX_CHANNEL_LENGTH,
        "/".join(["s"] * MAX_SEGMENTS),
        "0/1/2/3",
        "-/_/:",
    ],
)
def test_valid_channel_names_are_returned_unchanged(name: str) -> None:
    assert validate_channel(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/",
        "/orders",
        "orders/",
        "/orders/",
        "orders//42",
        "a///b",
        ".",
        "..",
        "orders/.",
        "orders/../secrets",
        "./orders",
    ],
)
def test_channel_with_empty_or_dot_segment_is_rejected(name: str) -> None:
    with pytest.raises(InvalidChannel):
        validate_channel(name)


@pytest.mark.parametrize("name", ["*", "**", "orders/*", "orders/**", "*/status", "a/*/b"])
def test_channel_with_wildcard_segment_is_rejected(name: str) -> None:
    with pytest.raises(InvalidChannel, match="wildcard"):
        validate_channel(name)


@pytest.mark.parametrize("name", ["a*", "orders/4*", "a?", "a[1]", "orders/#", "orders/+"])
def test_channel_with_glob_or_mqtt_special_characters_is_rejected(name: str) -> None:
    with pytest.raises(InvalidChannel):
        validate_channel(name)


def test_channel_longer_than_limit_is_rejected() -> None:
    assert MAX_CHANNEL_LENGTH == 255
    with pytest.raises(InvalidChannel, match="255"):
        validate_channel("x" * (MAX_CHANNEL_LENGTH + 1))
    # Also when made of many short segments (length is checked, not only segments).
    long_name = "/".join(["abcdefghij"] * 24)  # 24 segments, 263 characters
    assert len(long_name) > MAX_CHANNEL_LENGTH
    with pytest.raises(InvalidChannel):
        validate_channel(long_name)


def test_channel_with_too_many_segments_is_rejected() -> None:
    assert MAX_SEGMENTS == 32
    with pytest.raises(InvalidChannel, match="segments"):
        validate_channel("/".join(["s"] * (MAX_SEGMENTS + 1)))


@pytest.mark.parametrize(
    "name",
    [
        "news／a",  # FULLWIDTH SOLIDUS, looks like '/'
        "nеws",  # CYRILLIC SMALL LETTER IE instead of 'e'
        "news∕a",  # DIVISION SLASH
        "news⁄a",  # FRACTION SLASH
        "café",
        "ｏrders",  # FULLWIDTH 'o'
        "orders/４２",  # FULLWIDTH digits
        "naïve/x",
        "news\u200b",  # ZERO WIDTH SPACE
        "news a",
        " news",
        "news ",
        "news\t",
        "news\n",
        "news\r\nX-Injected: 1",
        "news\x00",
        "news\x7f",
        "a\\b",
        "a,b",
        "a;b",
        "a@b",
        "a%2Fb",
        "a?b=c",
        "emoji/🎉",
    ],
)
def test_channel_with_bad_characters_is_rejected(name: str) -> None:
    with pytest.raises(InvalidChannel):
        validate_channel(name)


def test_invalid_channel_is_a_bad_request_with_a_code() -> None:
    with pytest.raises(BadRequest) as info:
        validate_channel("a//b")
    assert info.value.status == 400
    assert info.value.code == "invalid_channel"


# -- patterns --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("orders", ("orders",)),
        ("orders/42", ("orders", "42")),
        ("orders/*", ("orders", "*")),
        ("orders/**", ("orders", "**")),
        ("*", ("*",)),
        ("**", ("**",)),
        ("*/status", ("*", "status")),
        ("*/*/**", ("*", "*", "**")),
    ],
)
def test_pattern_parse_keeps_segments(text: str, segments: tuple[str, ...]) -> None:
    pattern = Pattern.parse(text)
    assert pattern.text == text
    assert pattern.segments == segments


@pytest.mark.parametrize(
    "text",
    [
        "a*",
        "*a",
        "orders/4*",
        "orders/*x",
        "orders/***",
        "orders/**x",
        "a/b*c/d",
    ],
)
def test_pattern_with_partial_wildcard_is_rejected(text: str) -> None:
    with pytest.raises(InvalidPattern, match="partial wildcard"):
        Pattern.parse(text)


@pytest.mark.parametrize("text", ["**/a", "orders/**/status", "**/**", "a/**/*"])
def test_pattern_with_double_star_before_last_segment_is_rejected(text: str) -> None:
    with pytest.raises(InvalidPattern, match=r"\*\*"):
        Pattern.parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/",
        "orders/",
        "/orders",
        "orders//*",
        "orders/./*",
        "orders/../*",
        "nеws/*",  # Cyrillic 'е'
        "news／*",
        "news /*",
        "x" * (MAX_CHANNEL_LENGTH + 1),
        "/".join(["*"] * (MAX_SEGMENTS + 1)),
    ],
)
def test_pattern_breaking_channel_rules_is_rejected(text: str) -> None:
    with pytest.raises(InvalidPattern):
        Pattern.parse(text)


def test_pattern_errors_are_invalid_pattern_not_invalid_channel() -> None:
    with pytest.raises(InvalidPattern) as info:
        Pattern.parse("a//b")
    assert not isinstance(info.value, InvalidChannel)
    assert info.value.code == "invalid_pattern"


MATCH_TABLE = [
    # pattern, channel, matches
    ("orders", "orders", True),
    ("orders", "orders/1", False),
    ("orders", "order", False),
    ("orders", "Orders", False),  # case-sensitive
    ("orders/1", "orders/1", True),
    ("orders/1", "orders/10", False),
    ("orders/*", "orders/1", True),
    ("orders/*", "orders/abc", True),
    ("orders/*", "orders", False),
    ("orders/*", "orders/1/2", False),
    ("orders/*", "invoices/1", False),
    ("orders/**", "orders/1", True),
    ("orders/**", "orders/1/2", True),
    ("orders/**", "orders/1/2/3/4/5", True),
    ("orders/**", "orders", False),
    ("orders/**", "ordersx/1", False),
    ("orders/**", "invoices/1", False),
    ("*", "orders", True),
    ("*", "orders/1", False),
    ("**", "orders", True),
    ("**", "orders/1/2", True),
    ("*/status", "orders/status", True),
    ("*/status", "users/status", True),
    ("*/status", "status", False),
    ("*/status", "orders/1/status", False),
    ("*/*", "a/b", True),
    ("*/*", "a", False),
    ("*/*", "a/b/c", False),
    ("orders/*/status", "orders/42/status", True),
    ("orders/*/status", "orders/42/other", False),
    ("orders/*/status", "orders/status", False),
    ("orders/*/**", "orders/42/status", True),
    ("orders/*/**", "orders/42/status/x", True),
    ("orders/*/**", "orders/42", False),
    ("a/b/**", "a/b/c", True),
    ("a/b/**", "a/b", False),
    ("a/b/**", "a/c/d", False),
]


@pytest.mark.parametrize(("text", "channel", "expected"), MATCH_TABLE)
def test_pattern_matches(text: str, channel: str, expected: bool) -> None:
    assert Pattern.parse(text).matches(channel) is expected


def test_exact_pattern_is_exact_and_wildcard_patterns_are_not() -> None:
    assert Pattern.parse("orders/1").is_exact
    assert not Pattern.parse("orders/*").is_exact
    assert not Pattern.parse("orders/**").is_exact


@pytest.mark.parametrize(
    ("text", "glob"),
    [
        ("orders", "orders"),
        ("orders/42", "orders/42"),
        ("orders/*", "orders/*"),
        ("orders/**", "orders/*"),
        ("*/status", "*/status"),
        ("orders/*/status", "orders/*/status"),
        ("**", "*"),
    ],
)
def test_pattern_glob(text: str, glob: str) -> None:
    assert Pattern.parse(text).glob() == glob


@pytest.mark.parametrize(("text", "channel", "expected"), MATCH_TABLE)
def test_pattern_glob_matches_a_superset_of_the_pattern(
    text: str, channel: str, expected: bool
) -> None:
    # fnmatchcase's '*' crosses '/' like SQLite GLOB's; channels contain none of '*?['.
    if expected:
        assert fnmatch.fnmatchcase(channel, Pattern.parse(text).glob())


# -- cursors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["ab12:0", "ab12:1", "0:5", "deadbeef:123456789", "z" * 32 + ":42", "a:" + "9" * 18],
)
def test_cursor_round_trips_through_str(text: str) -> None:
    cursor = Cursor.parse(text)
    assert str(cursor) == text
    assert Cursor.parse(str(cursor)) == cursor


def test_cursor_parse_splits_epoch_and_sequence() -> None:
    assert Cursor.parse("ab12:42") == Cursor("ab12", 42)
    assert str(Cursor("ab12", 42)) == "ab12:42"


def test_event_cursor_parses_back_to_its_epoch_and_seq() -> None:
    event = event_from(make_draft("a", b"x", now=T0), epoch="c0ffee", seq=99)
    assert event.cursor == "c0ffee:99"
    assert Cursor.parse(event.cursor) == Cursor("c0ffee", 99)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        ":",
        "x:y",
        ":1",
        "ab:",
        "ab:-1",
        "ab:+1",
        "AB:1",
        "Ab:1",
        "ab:1.5",
        "ab:1e3",
        "ab:0x10",
        "ab: 1",
        "ab:1 ",
        " ab:1",
        "ab:1\n",
        "ab:1:2",
        "a-b:1",
        "a_b:1",
        "z" * 33 + ":1",
        "ab:" + "9" * 20,
        "ab:" + "1" * 100,
        "ab:" + "9" * 10_000,
        "ab:1_000",
    ],
)
def test_invalid_cursors_are_rejected(text: str) -> None:
    with pytest.raises(InvalidCursor):
        Cursor.parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "ab:²",  # SUPERSCRIPT TWO: str.isdigit() is True but int() refuses it
        "ab:٣",  # ARABIC-INDIC DIGIT THREE: int() accepts it, so str() would not round-trip
        "ab:１",  # FULLWIDTH DIGIT ONE
    ],
)
def test_cursor_with_non_ascii_digits_is_rejected_as_invalid_cursor(text: str) -> None:
    with pytest.raises(InvalidCursor):
        Cursor.parse(text)


def test_cursor_sequence_beyond_signed_64_bits_is_rejected() -> None:
    # Sequence numbers are SQLite INTEGERs (signed 64-bit); a bigger one cannot name an event,
    # and handing it to the log would raise OverflowError instead of a 400.
    assert Cursor.parse(f"ab:{2**63 - 1}").seq == 2**63 - 1
    with pytest.raises(InvalidCursor):
        Cursor.parse(f"ab:{2**63}")


def test_invalid_cursor_message_is_bounded() -> None:
    with pytest.raises(InvalidCursor) as info:
        Cursor.parse("x" * 100_000)
    assert len(str(info.value)) < 300
    assert info.value.code == "invalid_cursor"


# -- drafts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data", [b'{"a": 1}', b"[1, 2, 3]", b"42", b'"a string"', b"true", b"null", b' {"a":1} ']
)
def test_draft_sniffs_json(data: bytes) -> None:
    assert make_draft("a", data).content_type == "application/json"


@pytest.mark.parametrize("data", [b"hello", "héllo wörld".encode(), b"{not json", b"", b"1 2"])
def test_draft_sniffs_text(data: bytes) -> None:
    assert make_draft("a", data).content_type == "text/plain; charset=utf-8"


@pytest.mark.parametrize("data", [b"\xff\xfe\x00", b"\x80", bytes(range(256)), b"ok\xc3"])
def test_draft_sniffs_binary(data: bytes) -> None:
    assert make_draft("a", data).content_type == "application/octet-stream"


@pytest.mark.parametrize("content_type", ["", "   "])
def test_draft_sniffs_when_content_type_is_blank(content_type: str) -> None:
    assert make_draft("a", b"[1]", content_type).content_type == "application/json"


def test_draft_keeps_declared_content_type() -> None:
    draft = make_draft("a", b"<p>hi</p>", "text/html; charset=utf-8")
    assert draft.content_type == "text/html; charset=utf-8"
    assert make_draft("a", b"{}", " application/json ").content_type == "application/json"
    assert make_draft("a", b"\x00\x01", "image/png").content_type == "image/png"
    # Declared binary wins over sniffing even for JSON-looking bytes.
    assert make_draft("a", b"{}", "application/octet-stream").content_type == (
        "application/octet-stream"
    )


def test_draft_fields_and_defaults() -> None:
    draft = make_draft("orders/1", b"x", "text/plain", now=T0)
    assert draft == Draft(
        channel="orders/1",
        data=b"x",
        content_type="text/plain",
        type="message",
        time=T0,
        idempotency_key=None,
    )


def test_draft_time_defaults_to_now() -> None:
    before = datetime.now(UTC).timestamp()
    draft = make_draft("a", b"x")
    after = datetime.now(UTC).timestamp()
    assert before <= draft.time <= after


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/cloudevents+json",
        "APPLICATION/JSON",
        "application/vnd.api+json",
    ],
)
@pytest.mark.parametrize("data", [b"{", b"hello", b"{'a': 1}", b"", b"NaN", b"\xff"])
def test_draft_declared_json_must_be_json(content_type: str, data: bytes) -> None:
    with pytest.raises(InvalidEvent, match="JSON"):
        make_draft("a", data, content_type)


@pytest.mark.parametrize("content_type", ["text/plain", "text/csv; charset=utf-8", "TEXT/HTML"])
@pytest.mark.parametrize("data", [b"\xff", b"ok\xc3", b"\xed\xa0\x80"])  # last: a surrogate
def test_draft_declared_text_must_be_utf8(content_type: str, data: bytes) -> None:
    with pytest.raises(InvalidEvent, match="UTF-8"):
        make_draft("a", data, content_type)


def test_draft_rejects_invalid_channel() -> None:
    with pytest.raises(InvalidChannel):
        make_draft("orders/*", b"x")
    with pytest.raises(InvalidChannel):
        make_draft("", b"x")


@pytest.mark.parametrize(
    "event_type",
    ["order.created", "com.example/order:created", "A-b_c", "x" * MAX_TYPE_LENGTH],
)
def test_draft_accepts_event_types(event_type: str) -> None:
    assert make_draft("a", b"x", type=event_type).type == event_type


@pytest.mark.parametrize(
    "event_type",
    [
        "",
        "x" * (MAX_TYPE_LENGTH + 1),
        "order created",
        "order\ncreated",
        "crеated",  # Cyrillic 'е'
        "a*",
        "a,b",
        "a\x00",
        "événement",
    ],
)
def test_draft_rejects_bad_event_types(event_type: str) -> None:
    with pytest.raises(InvalidEvent, match="event type"):
        make_draft("a", b"x", type=event_type)


@pytest.mark.parametrize(
    "content_type",
    [
        "json",
        "text",
        "text/",
        "/plain",
        "text/plain/extra",
        "text plain",
        "text/pl ain",
        "text/plain\nX-Injected: 1",
        "a" * 200 + "/" + "b" * 100,
        "text/plain; " + "x" * 300,
        "ｔext/plain",
    ],
)
def test_draft_rejects_bad_media_types(content_type: str) -> None:
    with pytest.raises(InvalidEvent, match="content type"):
        make_draft("a", b"x", content_type)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain;\rX-Injected: 1",
        "text/plain; a=\x00",
        "text/plain; a=\x7f",
        "text/plain; charset=ütf-8",
    ],
)
def test_draft_rejects_control_and_non_ascii_characters_in_media_type_parameters(
    content_type: str,
) -> None:
    # RFC 9110 §8.3.1 parameters are tokens or quoted strings: no CTLs, no non-ASCII. The
    # content type is echoed in HTTP headers (polling, webhooks), so a CR must never pass.
    with pytest.raises(InvalidEvent, match="content type"):
        make_draft("a", b"x", content_type)


@pytest.mark.parametrize("key", ["k", "order-42", "a key with spaces", "x" * 255, "ключ"])
def test_draft_accepts_idempotency_keys(key: str) -> None:
    assert make_draft("a", b"x", idempotency_key=key).idempotency_key == key


@pytest.mark.parametrize("key", ["", "x" * (MAX_IDEMPOTENCY_KEY_LENGTH + 1), "a\nb", "a\x00", "\t"])
def test_draft_rejects_bad_idempotency_keys(key: str) -> None:
    with pytest.raises(InvalidEvent, match="idempotency key"):
        make_draft("a", b"x", idempotency_key=key)


def test_draft_errors_are_bad_requests() -> None:
    with pytest.raises(BadRequest) as info:
        make_draft("a", b"{", "application/json")
    assert info.value.status == 400
    assert info.value.code == "invalid_event"


# -- the CloudEvents envelope ----------------------------------------------------------------


def test_envelope_uses_cloudevents_field_names() -> None:
    draft = make_draft("orders/42", b'{"total": 9.5}', type="order.created", now=T0)
    env = envelope(draft)
    assert env == {
        "specversion": "1.0",
        "id": "ab12:7",
        "source": "/channels/orders/42",
        "type": "order.created",
        "channel": "orders/42",
        "time": "2024-05-06T07:08:09.123Z",
        "datacontenttype": "application/json",
        "data": {"total": 9.5},
    }


def test_envelope_id_is_the_cursor() -> None:
    event = event_from(make_draft("a", b"x", now=T0), epoch="e9", seq=12345)
    assert orjson.loads(encode_envelope(event))["id"] == event.cursor == "e9:12345"


@pytest.mark.parametrize("t", [0.0, T0, 1.5, 1_700_000_000.999, 4_102_444_800.0])
def test_envelope_time_is_rfc3339_utc_with_z(t: float) -> None:
    env = envelope(make_draft("a", b"x", now=t))
    text = env["time"]
    assert isinstance(text, str)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z", text), text
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert abs(parsed.timestamp() - t) < 0.001


def test_envelope_time_of_epoch_zero() -> None:
    assert envelope(make_draft("a", b"x", now=0.0))["time"] == "1970-01-01T00:00:00.000Z"


def test_envelope_embeds_json_data_as_json() -> None:
    for data, expected in [
        (b'{"a": [1, 2, {"b": null}]}', {"a": [1, 2, {"b": None}]}),
        (b"[1,2,3]", [1, 2, 3]),
        (b"42", 42),
        (b'"s"', "s"),
        (b"true", True),
        (b"null", None),
        (b'  {"padded": 1}  ', {"padded": 1}),
    ]:
        env = envelope(make_draft("a", data, "application/json", now=T0))
        assert env["data"] == expected
        assert "data_base64" not in env


def test_envelope_embeds_plus_json_data_as_json() -> None:
    env = envelope(make_draft("a", b'{"x": 1}', "application/vnd.example+json", now=T0))
    assert env["data"] == {"x": 1}
    assert env["datacontenttype"] == "application/vnd.example+json"


@pytest.mark.parametrize(
    "data",
    [
        b'{\n  "a": 1,\n  "b": [\n    1,\n    2\n  ]\n}\n',
        b'{\r\n  "a": "line\\nbreak"\r\n}',
        b"[\n1,\n2\n]",
        b"\n\n42\n",
        b'{"text": "no raw newline inside strings"}\n',
    ],
)
def test_envelope_of_multiline_json_is_one_line(data: bytes) -> None:
    body = encode_envelope(event_from(make_draft("a", data, "application/json", now=T0)))
    assert b"\n" not in body
    assert b"\r" not in body
    assert orjson.loads(body)["data"] == orjson.loads(data)


def test_envelope_of_pretty_printed_json_keeps_the_data_exactly() -> None:
    data = b'{\n  "big": 12345678901234567890123,\n  "id": 18446744073709551616\n}'
    body = encode_envelope(event_from(make_draft("a", data, "application/json", now=T0)))
    assert b"\n" not in body
    # Re-encoding through floats would turn these into 1.2345678901234568e+22 (data loss).
    assert b"12345678901234567890123" in body
    assert b"18446744073709551616" in body


def test_envelope_text_data_is_a_string() -> None:
    text = "héllo\nwörld — ✓"
    env = envelope(make_draft("a", text.encode(), "text/plain; charset=utf-8", now=T0))
    assert env["data"] == text
    assert env["datacontenttype"] == "text/plain; charset=utf-8"
    assert "data_base64" not in env


def test_envelope_of_text_is_one_line() -> None:
    body = encode_envelope(event_from(make_draft("a", b"a\nb\r\nc", "text/plain", now=T0)))
    assert b"\n" not in body and b"\r" not in body


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (bytes(range(256)), None),
        (b"\x00\x01\x02", "application/octet-stream"),
        (b"{}", "application/octet-stream"),
        (b"hello", "application/x-custom"),
        (b"", "image/png"),
    ],
)
def test_envelope_binary_data_is_base64(data: bytes, content_type: str | None) -> None:
    env = envelope(make_draft("a", data, content_type, now=T0))
    assert "data" not in env
    encoded = env["data_base64"]
    assert isinstance(encoded, str)
    assert base64.b64decode(encoded, validate=True) == data


def test_envelope_is_compact_json() -> None:
    body = encode_envelope(event_from(make_draft("a", b'{"a": 1}', now=T0)))
    assert body.startswith(b'{"specversion":"1.0",')
    assert orjson.loads(body)["specversion"] == "1.0"


# -- encode once -----------------------------------------------------------------------------


def test_event_wire_calls_the_encoder_once_per_form() -> None:
    event = event_from(make_draft("a", b"x", now=T0))
    calls: list[Event] = []

    def encode(e: Event) -> bytes:
        calls.append(e)
        return b"frame:" + e.cursor.encode()

    first = event.wire("frame", encode)
    second = event.wire("frame", encode)
    assert first == b"frame:ab12:7"
    assert second is first
    assert calls == [event]


def test_event_wire_caches_each_form_separately() -> None:
    event = event_from(make_draft("a", b"x", now=T0))
    counts = {"a": 0, "b": 0}

    def make(form: str) -> Callable[[Event], bytes]:
        def encode(e: Event) -> bytes:
            counts[form] += 1
            return form.encode()

        return encode

    for _ in range(3):
        assert event.wire("a", make("a")) == b"a"
        assert event.wire("b", make("b")) == b"b"
    assert counts == {"a": 1, "b": 1}


def test_event_wire_caches_an_empty_encoding() -> None:
    event = event_from(make_draft("a", b"x", now=T0))
    calls = 0

    def encode(e: Event) -> bytes:
        nonlocal calls
        calls += 1
        return b""

    assert event.wire("empty", encode) == b""
    assert event.wire("empty", encode) == b""
    assert calls == 1


def test_event_json_is_the_cached_envelope() -> None:
    event = event_from(make_draft("a", b'{"a": 1}', now=T0))
    body = event.json()
    assert body == encode_envelope(event)
    assert event.json() is body
