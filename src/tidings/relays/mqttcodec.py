"""MQTT's data representations (OASIS MQTT 5.0 §1.5, §2.2.2), without a client library.

The MQTT relay encodes its outbound PUBLISH properties with these (``mqtt.publish_properties``);
``tidings bench``'s lean MQTT subscribers write their packets with them. Pure: no aiomqtt or
paho here, so importing this module costs neither.
"""

from __future__ import annotations


def varint(n: int) -> bytes:
    """A Variable Byte Integer (§1.5.5): the remaining length, a property length."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(text: str) -> bytes:
    """A UTF-8 Encoded String (§1.5.4); the caller keeps it under 65,536 bytes."""
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def property_block(encoded: bytes) -> bytes:
    """A property block (§2.2.2): the Property Length, then the properties as encoded."""
    return varint(len(encoded)) + encoded
