"""How the NATS log (``log/nats.py``) lays out a deployment in JetStream, without a client library.

Names come from the deployment's prefix; an event is one message (its data as the payload, the
rest in short headers); idempotency keys become ``Nats-Msg-Id`` values; the epoch is a digest of
the stream's identity. Pure: no nats-py here, so these are tested by plain calls.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import quote, unquote

from ..events import SYSTEM, Draft, Event
from ..exceptions import ConfigError

_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
HEARTBEAT = 1.0  # seconds: an idle follower's consumer says it is alive this often
INACTIVE = 10.0  # seconds: the server removes a consumer nobody deleted (a lost client's)
# The settings of an existing stream that a node opening it brings to its own.
OWNED = ("max_msgs", "max_age", "duplicate_window", "num_replicas", "discard", "allow_direct")


class Names(NamedTuple):
    stream: str  # the events: ``{PREFIX}_LOG``, dots as ``_``
    subject: str  # the stream's one subject: ``{prefix}.log``
    bucket: str  # the KV bucket of durable consumer positions: ``{prefix}_consumers``


def name(prefix: str) -> str:
    """The deployment ``prefix`` as stream and bucket names take it (``_`` for ``.``); it must
    be ``.``-separated words of letters, digits, ``_`` and ``-`` (a subject's tokens)."""
    if not _PREFIX.fullmatch(prefix):
        raise ConfigError(
            f"the NATS log's prefix {prefix!r} must be dot-separated words of letters, digits, "
            "'_' and '-'"
        )
    return prefix.replace(".", "_")


def names(prefix: str) -> Names:
    """The names of the deployment ``prefix`` (see ``name``)."""
    base = name(prefix)
    return Names(stream=f"{base.upper()}_LOG", subject=f"{prefix}.log", bucket=f"{base}_consumers")


def nanoseconds(seconds: float) -> int:
    """A duration as JetStream's API takes it."""
    return round(seconds * 1_000_000_000)


def stream_config(
    names: Names, max_events: int, max_age: float, dedupe_window: float, replicas: int
) -> dict[str, Any]:
    """The events' stream: file storage, the oldest discarded past ``max_events`` or ``max_age``
    (0: no limit), ``Nats-Msg-Id`` de-duplicated within ``dedupe_window``."""
    return {
        "name": names.stream,
        "subjects": [names.subject],
        "retention": "limits",
        "storage": "file",
        "discard": "old",
        "max_msgs": max_events or -1,
        "max_bytes": -1,
        "max_age": nanoseconds(max_age),
        "duplicate_window": nanoseconds(dedupe_window),
        "num_replicas": replicas,
        "allow_direct": True,  # the read-back of an idempotent replay
    }


def consumer_config(
    start: int, *, deliver_to: str | None = None, headers_only: bool = False
) -> dict[str, Any]:
    """An ephemeral consumer from seq ``start``, in memory, without acks: a pull consumer
    (reading a range), or one pushing to ``deliver_to`` with flow control and heartbeats like
    nats-py's ordered consumer (following)."""
    config: dict[str, Any] = {
        "deliver_policy": "by_start_sequence",
        "opt_start_seq": start,
        "ack_policy": "none",
        "mem_storage": True,
        "num_replicas": 1,
        "inactive_threshold": nanoseconds(INACTIVE),
        "headers_only": headers_only,
    }
    if deliver_to is not None:
        config.update(deliver_subject=deliver_to, max_deliver=1, flow_control=True,
                      idle_heartbeat=nanoseconds(HEARTBEAT))  # fmt: skip
    return config


def headers(draft: Draft, msg_id: str | None) -> dict[str, str]:
    """The headers of ``draft``'s message. NATS header values are stripped ASCII-safe text, so
    the idempotency key (any printable text) is percent-encoded."""
    out = {"c": draft.channel, "t": draft.type, "ct": draft.content_type, "at": repr(draft.time)}
    if draft.idempotency_key is not None:
        out["k"] = quote(draft.idempotency_key, safe="")
    if msg_id is not None:
        out["Nats-Msg-Id"] = msg_id
    return out


def decode(epoch: str, seq: int, headers: Mapping[str, str] | None, data: bytes) -> Event:
    """The event in a stored message. One that tidings did not write (someone published to the
    subject) is kept as an opaque event on a system channel, so it cannot wedge the followers."""
    headers = headers or {}
    key = headers.get("k")
    return Event(
        epoch,
        seq,
        headers.get("c", f"{SYSTEM}/foreign"),
        headers.get("t", "message"),
        data,
        headers.get("ct", "application/octet-stream"),
        float(headers.get("at", 0.0)),
        unquote(key) if key else None,
    )


def status(headers: Mapping[str, str] | None) -> str | None:
    """The status code of a server's status message (no responders, heartbeat, end of a
    fetch); None for a stored message."""
    return headers.get("Status") if headers else None


def msg_id(channel: str, key: str, after: int = 0) -> str:
    """The ``Nats-Msg-Id`` of a draft with an idempotency key; ``after`` is the seq of the event
    this one follows in an idempotency chain (0 for the first)."""
    text = f"{channel}\n{key}\n{after}" if after else f"{channel}\n{key}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def epoch(info: Mapping[str, Any]) -> str:
    """The epoch of the stream whose info (``STREAM.INFO``'s answer) is ``info``: a digest of its
    name and creation time, the same on every node and new when the stream is recreated."""
    identity = f"{info['config']['name']}\n{info['created']}"
    return hashlib.sha1(identity.encode()).hexdigest()[:8]


def low(state: Mapping[str, Any]) -> int:
    """The seq through which events are gone, from a stream's state: the one before the first,
    or the last when the stream is empty (after a purge, ``first_seq`` is ``last_seq + 1``)."""
    return int(state["first_seq"]) - 1 if state["messages"] else int(state["last_seq"])


def delivery_seqs(reply: str) -> tuple[int, int]:
    """``(stream seq, consumer seq)`` from a JetStream delivery's reply subject:
    ``$JS.ACK.<stream>.<consumer>.<n>.<sseq>.<dseq>.<ts>.<pending>``, or with a domain and an
    account hash after ``$JS.ACK`` (server 2.10+)."""
    tokens = reply.split(".")
    at = 5 if len(tokens) == 9 else 7
    return int(tokens[at]), int(tokens[at + 1])


def consumer_key(name: str) -> str:
    """The KV key of a durable consumer's position: KV keys allow only ``[-/_=.A-Za-z0-9]``."""
    return base64.urlsafe_b64encode(name.encode()).decode() or "="
