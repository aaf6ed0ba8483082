"""The pure SSE codec (tidings.sse) against WHATWG HTML §9.2.6, by plain calls."""

from __future__ import annotations

import pytest

from tidings import sse
from tidings.events import Event


def decode(*chunks: bytes) -> tuple[list[sse.ServerEvent], sse.Decoder]:
    decoder = sse.Decoder()
    events = [e for chunk in chunks for e in decoder.feed(chunk)]
    return events, decoder


def event(type: str = "message", data: bytes = b'{"a":1}') -> Event:
    return Event("ab12", 7, "orders/1", type, data, "application/json", 1_700_000_000.0)


def test_message_writes_one_data_line_per_line_of_any_line_break() -> None:
    block = sse.message(b"one\ntwo\r\nthree\rfour", event="kind", id="e:1", retry_ms=1500)
    assert block == (
        b"retry: 1500\nid: e:1\nevent: kind\ndata: one\ndata: two\ndata: three\ndata: four\n\n"
    )


@pytest.mark.parametrize("data", [b"", b"x", b"a\nb", b"a\r\nb\r\n", b"{}\n\n{}"])
def test_message_round_trips_through_the_decoder(data: bytes) -> None:
    [got], decoder = decode(sse.message(data, event="kind", id="e:9"))
    expected = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").decode()
    assert got == sse.ServerEvent(expected, "kind", "e:9")
    assert decoder.last_id == "e:9"


def test_encode_event_carries_cursor_type_and_one_line_envelope() -> None:
    block = sse.encode_event(event("order.paid"))
    lines = block.split(b"\n")
    assert lines[:2] == [b"id: ab12:7", b"event: order.paid"]
    assert lines[2].startswith(b'data: {"specversion":"1.0","id":"ab12:7"')
    assert lines[3:] == [b"", b""]


def test_encode_event_omits_the_event_line_for_the_default_type() -> None:
    assert b"event:" not in sse.encode_event(event("message"))


def test_sse_bytes_are_encoded_once_per_event() -> None:
    e = event()
    assert sse.sse_bytes(e) is sse.sse_bytes(e)


def test_crlf_split_across_chunks_is_one_line_break() -> None:
    events, _ = decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n")
    assert [e.data for e in events] == ["a\nb"]


def test_lone_cr_ends_a_line_once_the_next_byte_shows_it_is_not_crlf() -> None:
    decoder = sse.Decoder()
    assert list(decoder.feed(b"data: a\rdata: b\r\r")) == []  # the last CR may be half a CRLF
    assert [e.data for e in decoder.feed(b": ping\n")] == ["a\nb"]


def test_comments_and_blocks_without_data_dispatch_nothing() -> None:
    events, decoder = decode(b": ping\n\nevent: x\n\nid: c:1\n\nretry: 3000\n\n")
    assert events == []
    assert decoder.last_id == "c:1"
    assert decoder.retry_ms == 3000


def test_last_event_id_persists_until_changed() -> None:
    events, _ = decode(b"id: c:1\ndata: a\n\ndata: b\n\nid: c:2\ndata: c\n\n")
    assert [(e.data, e.id) for e in events] == [("a", "c:1"), ("b", "c:1"), ("c", "c:2")]


def test_id_containing_nul_is_ignored_and_retry_must_be_digits() -> None:
    events, decoder = decode(b"id: c:1\n\nid: bad\0id\nretry: 12x\ndata: a\n\n")
    assert events[0].id == "c:1"
    assert decoder.retry_ms is None


def test_only_one_leading_space_is_stripped_and_colonless_fields_have_empty_values() -> None:
    events, _ = decode(b"data:  two spaces\ndata\n\n")
    assert events[0].data == " two spaces\n"


def test_unknown_fields_are_ignored_and_event_type_resets_after_dispatch() -> None:
    events, _ = decode(b"event: kind\nfoo: bar\ndata: a\n\ndata: b\n\n")
    assert [(e.event, e.data) for e in events] == [("kind", "a"), ("message", "b")]


def test_an_unterminated_block_waits_for_the_rest() -> None:
    decoder = sse.Decoder()
    assert list(decoder.feed(b"data: par")) == []
    assert [e.data for e in decoder.feed(b"tial\n\n")] == ["partial"]
