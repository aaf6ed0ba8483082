"""How the NATS webhook store (``webhooks/nats_store.py``) lays out a deployment in JetStream,
without a client library: names, stored values, and where to start reading the newest attempts.
Pure: tested by plain calls.

Layout, from the deployment's prefix (``log.natscodec.name``: ``tidings`` here; ``<id>`` is an
endpoint id as one subject token, see ``token``)::

    KV bucket tidings_webhooks (stream KV_tidings_webhooks, one revision per key)
      ep.<id>                  the endpoint's spec (``store.encode``)
      ev.<id>.<seq>            the event's state (``state``): its stored retry and failed mark
    stream TIDINGS_WH_ATTEMPTS, subjects tidings.wh.attempts.>
      tidings.wh.attempts.<id>.<seq>.<unique>
                               one message per attempt (``row``), its time in header ``t``;
                               its id is its stream sequence (unique across nodes, growing)

An attempt's subject names its endpoint and event, so JetStream filters one endpoint's
(``<id>.*.*``) or one event's (``<id>.<seq>.*``) attempts; and it is the attempt's alone,
because a server 2.9 consumer filtered by a wildcard miscounts the messages it has from its
start on when a subject also has messages before that start (measured: off by dozens, even
below zero), and the attempt log's reads rely on those counts. The cost is the server's
per-subject index: an entry per attempt kept (measured on 2.9.10: its memory grew by ~140 bytes
per stored attempt, against ~65 with a subject per event).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from ..log import natscodec as log_codec
from .delivery import Attempt, Retry
from .store import Failed, StoredAttempt, with_auth

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_HEX = frozenset("0123456789ABCDEF")


def token(id: str) -> str:
    """``id`` as one subject token and KV key part: letters, digits, ``_`` and ``-`` stay (so
    ``ep_3f2a`` stays readable in ``nats kv ls``), every other byte of its UTF-8 as ``=XX``;
    ``=`` alone for the empty id. Never contains ``.``, ``*`` or ``>``, so one endpoint's
    wildcard cannot reach another's subjects."""
    if not id:
        return "="
    return "".join(chr(b) if b in _SAFE else f"={b:02X}" for b in id.encode())


def untoken(text: str) -> str:
    """The id ``token`` made ``text`` from; ValueError when it made no such text."""
    if text == "=":
        return ""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "=" and set(text[i + 1 : i + 3]) <= _HEX and len(text) >= i + 3:
            out.append(int(text[i + 1 : i + 3], 16))
            i += 3
        elif ord(text[i]) in _SAFE:
            out.append(ord(text[i]))
            i += 1
        else:
            raise ValueError(f"{text!r} is not an endpoint token")
    return out.decode()


class Names:
    """The bucket, stream and subjects of the deployment ``prefix`` (which
    ``log.natscodec.name`` checks: ``ConfigError`` unless it is a subject's tokens)."""

    def __init__(self, prefix: str) -> None:
        base = log_codec.name(prefix)
        self.bucket = f"{base}_webhooks"
        self.kv_stream = f"KV_{self.bucket}"  # nats-py's (and the NATS CLI's) name for it
        self.kv = f"$KV.{self.bucket}."  # the bucket's subjects: this, then the key
        self.attempts_stream = f"{base.upper()}_WH_ATTEMPTS"
        self.attempts = f"{prefix}.wh.attempts"

    @property
    def endpoints(self) -> str:
        return f"{self.kv}ep.*"

    def endpoint(self, id: str) -> str:
        return f"{self.kv}ep.{token(id)}"

    def endpoint_id(self, subject: str) -> str:
        return untoken(subject[len(self.kv) + 3 :])

    def state(self, id: str, seq: int) -> str:
        return f"{self.kv}ev.{token(id)}.{seq}"

    def states(self, id: str | None) -> str:
        """The event states of endpoint ``id``, or of every endpoint."""
        return f"{self.kv}ev.>" if id is None else f"{self.kv}ev.{token(id)}.>"

    def attempt(self, id: str, seq: int, unique: str) -> str:
        """The subject of one attempt of endpoint ``id`` at event ``seq``."""
        return f"{self.attempts}.{token(id)}.{seq}.{unique}"

    def attempts_of(self, id: str, seq: int | None = None) -> str:
        """The attempts of endpoint ``id`` at event ``seq``, or at every event."""
        return f"{self.attempts}.{token(id)}.{'*' if seq is None else seq}.*"

    def attempts_config(self, replicas: int, dedupe_window: float) -> dict[str, Any]:
        """The attempts' stream: file storage, no limits (``trim`` purges), a re-sent
        ``Nats-Msg-Id`` dropped within ``dedupe_window`` seconds."""
        return {
            "name": self.attempts_stream, "subjects": [f"{self.attempts}.>"],
            "retention": "limits", "storage": "file", "discard": "old", "max_msgs": -1,
            "max_bytes": -1, "max_age": 0, "num_replicas": replicas,
            "duplicate_window": log_codec.nanoseconds(dedupe_window),
        }  # fmt: skip


def masked(url: str) -> str:
    """``url`` (one or several, comma-separated) with passwords and tokens as ``***``."""
    return ",".join(_masked(part.strip()) for part in url.split(","))


def _masked(url: str) -> str:
    try:
        parts = urlsplit(url)
        if parts.username is None:
            return url
        # nats://user:password@host, or nats://token@host: a lone user part is a token
        return with_auth(parts, "***" if parts.password is None else f"{parts.username}:***")
    except ValueError:
        return "<a NATS URL that cannot be parsed>"


# -- stored values ---------------------------------------------------------------------------


def row(attempt: Attempt) -> bytes:
    """An attempt as stored: its fields as JSON, a newline (JSON from orjson has none), then
    the response head as raw bytes."""
    a = attempt
    head = [a.number, float(a.time), float(a.duration), a.status, a.error,
            a.outcome.verdict.value, a.outcome.reason, a.trigger]  # fmt: skip
    return orjson.dumps(head) + b"\n" + a.response


def stored(id: int, subject: str, row: bytes) -> StoredAttempt:
    """The attempt stored as message ``id`` on ``subject``."""
    head, response = row.split(b"\n", 1)
    number, time, duration, status, error, outcome, reason, trigger = orjson.loads(head)
    seq = int(subject.split(".")[-2])
    return StoredAttempt(id, seq, number, time, duration, status, error, response, outcome,
                         reason, trigger)  # fmt: skip


@dataclass(frozen=True, slots=True)
class State:
    """An event's stored retry and failed mark: ``[[number, due] | null, [time, reason] |
    null]``, one value so that settling the event is one write."""

    retry: list[Any] | None = None
    mark: list[Any] | None = None

    @classmethod
    def of(cls, data: bytes | None) -> State:
        """The state stored as ``data`` (none: a KV delete marker's empty data)."""
        return cls(*orjson.loads(data)) if data else cls()

    def encode(self) -> bytes:
        return orjson.dumps([self.retry, self.mark])

    def with_retry(self, retry: Retry | None) -> State:
        return State(None if retry is None else [retry.number, float(retry.due)], self.mark)

    @staticmethod
    def failed(failed: Failed) -> State:
        return State(None, [float(failed.time), failed.reason])


def event_seq(subject: str) -> int:
    """The event of an event state's key."""
    return int(subject.rpartition(".")[2])


# -- the newest attempts ---------------------------------------------------------------------


class Search:
    """Where to start reading to get the newest ``limit`` (negative: all) messages below seq
    ``top`` of a subject in a stream that starts at ``first``, asking only how many messages of
    the subject there are from a start on (what making a JetStream consumer answers).

    A start is good when it has ``limit`` to ``limit + slack`` below ``top``, or is ``first``
    with fewer. The first guess is as if every message were the subject's (one endpoint: done);
    the next come from the share seen so far, then from interpolating between a start with too
    few and one with too many, then from halving that range. ``few``: the subject has a handful
    (one event's attempts), so the first guess is ``first``."""

    def __init__(self, first: int, top: int, limit: int, *, few: bool = False) -> None:
        self.first, self.top, self.limit, self.few = first, top, limit, few
        self.slack = max(64, limit // 2)
        self._target = limit + self.slack // 2
        self.low, self._at_low = first, -1  # a start with too many (-1: none seen yet)
        self.high, self._at_high = top, 0  # a start with too few
        self.guesses = 0

    def guess(self) -> int:
        """The next start to count from."""
        low, high, top, target = self.low, self.high, self.top, self._target
        if self.limit < 0 or (self.few and not self.guesses) or high - low <= 1:
            at = low
        elif self._at_low < 0:  # from the share of the messages above ``high``
            if not self.guesses:
                at = top - target
            elif self._at_high:
                at = top - round(target * (top - high) / self._at_high)
            else:
                at = top - 8 * (top - high)
        elif self.guesses < 4:  # where the count would be target if the share were even
            span = max(1, self._at_low - self._at_high)
            at = low + (high - low) * (self._at_low - target) // span
        else:
            at = (low + high) // 2
        self.guesses += 1
        return max(low, min(at, high - 1))

    def counted(self, at: int, count: int) -> bool:
        """``count`` messages from ``at`` below ``top``: True when reading from ``at`` will do
        (or when the counts contradict each other, as they do while the stream changes)."""
        limit = self.limit
        if (
            limit < 0
            or limit <= count <= limit + self.slack
            or (at == self.first and count < limit)
        ):
            return True
        if self.high - self.low <= 1 or self.guesses >= 64:
            return True
        if count < limit:
            self.high, self._at_high = at, count
        else:
            self.low, self._at_low = at, count
        return False
