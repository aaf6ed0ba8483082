"""HPACK (RFC 7541) as little as a gRPC client needs: request header blocks of literals
(no Huffman, never indexed) and a decoder for what a gRPC server sends back.

The client announces a header table of 0 bytes, so the server cannot index; the decoder keeps
a dynamic table anyway in case it does. Huffman-coded strings are decoded only for digits
(``grpc-status``); others come out as ``b"<huffman>"``. Moved from benchmarks/grpcgen.py.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = tuple(
    (name.encode(), value.encode())
    for name, value in (
        (":authority", ""),
        (":method", "GET"),
        (":method", "POST"),
        (":path", "/"),
        (":path", "/index.html"),
        (":scheme", "http"),
        (":scheme", "https"),
        (":status", "200"),
        (":status", "204"),
        (":status", "206"),
        (":status", "304"),
        (":status", "400"),
        (":status", "404"),
        (":status", "500"),
        ("accept-charset", ""),
        ("accept-encoding", "gzip, deflate"),
        ("accept-language", ""),
        ("accept-ranges", ""),
        ("accept", ""),
        ("access-control-allow-origin", ""),
        ("age", ""),
        ("allow", ""),
        ("authorization", ""),
        ("cache-control", ""),
        ("content-disposition", ""),
        ("content-encoding", ""),
        ("content-language", ""),
        ("content-length", ""),
        ("content-location", ""),
        ("content-range", ""),
        ("content-type", ""),
        ("cookie", ""),
        ("date", ""),
        ("etag", ""),
        ("expect", ""),
        ("expires", ""),
        ("from", ""),
        ("host", ""),
        ("if-match", ""),
        ("if-modified-since", ""),
        ("if-none-match", ""),
        ("if-range", ""),
        ("if-unmodified-since", ""),
        ("last-modified", ""),
        ("link", ""),
        ("location", ""),
        ("max-forwards", ""),
        ("proxy-authenticate", ""),
        ("proxy-authorization", ""),
        ("range", ""),
        ("referer", ""),
        ("refresh", ""),
        ("retry-after", ""),
        ("server", ""),
        ("set-cookie", ""),
        ("strict-transport-security", ""),
        ("transfer-encoding", ""),
        ("user-agent", ""),
        ("vary", ""),
        ("via", ""),
        ("www-authenticate", ""),
    )
)

# RFC 7541 Appendix B codes of the ten digits: enough to read a Huffman-coded grpc-status.
_HUFFMAN_DIGITS = {
    (0b00000, 5): b"0",
    (0b00001, 5): b"1",
    (0b00010, 5): b"2",
    (0b011001, 6): b"3",
    (0b011010, 6): b"4",
    (0b011011, 6): b"5",
    (0b011100, 6): b"6",
    (0b011101, 6): b"7",
    (0b011110, 6): b"8",
    (0b011111, 6): b"9",
}


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An integer with an N-bit prefix (RFC 7541 §5.1); ``first`` holds the pattern bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_string(raw: bytes) -> bytes:
    return hpack_int(len(raw), 7) + raw


def request_headers(
    path: bytes, authority: bytes, metadata: Sequence[tuple[bytes, bytes]] = ()
) -> bytes:
    """A gRPC request's header block: static-table indices and literals never indexed."""
    block = (
        b"\x83\x86"  # :method POST, :scheme http
        + hpack_int(4, 4)
        + hpack_string(path)  # :path
        + hpack_int(1, 4)
        + hpack_string(authority)  # :authority
        + hpack_int(31, 4)
        + hpack_string(b"application/grpc")  # content-type
        + b"\x00"
        + hpack_string(b"te")
        + hpack_string(b"trailers")
    )
    for name, value in metadata:
        block += b"\x00" + hpack_string(name) + hpack_string(value)
    return block


def _huffman_digits(raw: bytes) -> bytes | None:
    """Decode a Huffman string made of digits only (else None)."""
    bits = int.from_bytes(raw, "big")
    pos = len(raw) * 8  # bits still to read, from the most significant end
    out = b""
    while pos:
        rest = (1 << pos) - 1
        if pos < 8 and bits & rest == rest:  # the end-of-string padding: all ones
            return out
        for width in (5, 6):
            if pos < width:
                return None
            digit = _HUFFMAN_DIGITS.get(((bits >> (pos - width)) & ((1 << width) - 1), width))
            if digit is not None:
                out += digit
                pos -= width
                break
        else:
            return None
    return out


class HeaderDecoder:
    """Decodes header blocks into ``{name: value}``; Huffman strings other than digits come out
    as ``b"<huffman>"``. Keeps a dynamic table in case the server indexes despite our
    SETTINGS_HEADER_TABLE_SIZE of 0 (sizes of undecoded strings are then approximate)."""

    def __init__(self) -> None:
        self.dynamic: deque[tuple[bytes, bytes]] = deque()
        self.size = 0
        self.max_size = 4096

    def _int(self, block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
        limit = (1 << prefix_bits) - 1
        value = block[pos] & limit
        pos += 1
        if value < limit:
            return value, pos
        shift = 0
        while True:
            b = block[pos]
            pos += 1
            value += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value, pos

    def _string(self, block: bytes, pos: int) -> tuple[bytes, int]:
        huffman = block[pos] & 0x80
        length, pos = self._int(block, pos, 7)
        raw = block[pos : pos + length]
        if huffman:
            raw = _huffman_digits(raw) or b"<huffman>"
        return raw, pos + length

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        return self.dynamic[index - len(STATIC_TABLE) - 1]

    def _add(self, name: bytes, value: bytes) -> None:
        self.dynamic.appendleft((name, value))
        self.size += len(name) + len(value) + 32
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size and self.dynamic:
            name, value = self.dynamic.pop()
            self.size -= len(name) + len(value) + 32

    def decode(self, block: bytes) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        pos, n = 0, len(block)
        while pos < n:
            b = block[pos]
            if b & 0x80:  # indexed field
                index, pos = self._int(block, pos, 7)
                name, value = self._entry(index)
            elif b & 0xE0 == 0x20:  # dynamic table size update
                self.max_size, pos = self._int(block, pos, 5)
                self._evict()
                continue
            else:  # a literal: with incremental indexing (01), without or never indexed (000)
                bits = 6 if b & 0x40 else 4
                index, pos = self._int(block, pos, bits)
                if index:
                    name = self._entry(index)[0]
                else:
                    name, pos = self._string(block, pos)
                value, pos = self._string(block, pos)
                if b & 0x40:
                    self._add(name, value)
            out[name] = value
        return out
