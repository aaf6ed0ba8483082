"""The NATS log's layout (``tidings/log/natscodec.py``): names, event messages, ids, epochs."""

from __future__ import annotations

import re

import pytest

from tidings.events import SYSTEM, Cursor, make_draft
from tidings.exceptions import ConfigError
from tidings.log import natscodec as codec

T = 1_700_000_000.0
KV_KEY = re.compile(r"[-/_=.A-Za-z0-9]+")  # nats-py's rule for KV keys
NAME = re.compile(r"[A-Za-z0-9_-]+")  # stream and KV bucket names


def test_names_come_from_the_prefix() -> None:
    assert codec.names("tidings") == ("TIDINGS_LOG", "tidings.log", "tidings_consumers")
    named = codec.names("eu-1.prod_a")
    assert named.stream == "EU-1_PROD_A_LOG"
    assert named.subject == "eu-1.prod_a.log"
    assert named.bucket == "eu-1_prod_a_consumers"
    assert NAME.fullmatch(named.stream)
    assert NAME.fullmatch(named.bucket)


@pytest.mark.parametrize("prefix", ["", "a b", "a..b", ".a", "a.", "a*", "a.>", "ü", "a/b"])
def test_a_prefix_that_is_not_subject_tokens_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigError, match="prefix"):
        codec.names(prefix)


@pytest.mark.parametrize(
    "key", [None, "k", " spaced both ", "per%20cent", "ünï·cödé", "a:b/c?d=e&f", "x" * 255]
)
def test_an_event_survives_its_headers(key: str | None) -> None:
    draft = make_draft("orders/42", b'{"n": 1}', "application/json", "order.created", key, T + 0.1)
    headers = codec.headers(draft, codec.msg_id(draft.channel, key) if key else None)
    for value in headers.values():
        # nats-py strips header values and sends them as text lines
        assert value == value.strip()
        assert value.isascii()
        assert "\r" not in value and "\n" not in value
    event = codec.decode("e1", 7, headers, draft.data)
    assert (event.cursor, event.channel, event.type, event.data) == (
        "e1:7",
        "orders/42",
        "order.created",
        b'{"n": 1}',
    )
    assert (event.content_type, event.time, event.idempotency_key) == (
        "application/json",
        T + 0.1,
        key,
    )
    assert ("Nats-Msg-Id" in headers) == (key is not None)


def test_a_message_tidings_did_not_write_is_an_opaque_event_on_a_system_channel() -> None:
    event = codec.decode("e1", 3, None, b"hello")
    assert event.channel == f"{SYSTEM}/foreign"
    assert (event.content_type, event.data, event.idempotency_key) == (
        "application/octet-stream",
        b"hello",
        None,
    )


def test_message_ids_are_scoped_to_channel_and_key_and_chain_by_seq() -> None:
    first = codec.msg_id("orders/1", "k")
    assert first == codec.msg_id("orders/1", "k")  # every node computes the same
    assert len({first, codec.msg_id("orders/2", "k"), codec.msg_id("orders/1", "K")}) == 3
    chained = codec.msg_id("orders/1", "k", 5)
    assert chained not in (first, codec.msg_id("orders/1", "k", 6))


def test_the_epoch_is_a_cursor_epoch_of_the_streams_identity() -> None:
    info = {"config": {"name": "TIDINGS_LOG"}, "created": "2024-05-01T10:00:00.123456789Z"}
    epoch = codec.epoch(info)
    assert Cursor.parse(f"{epoch}:1").epoch == epoch
    assert codec.epoch(dict(info)) == epoch
    recreated = {**info, "created": "2024-05-01T10:00:00.123456790Z"}
    assert codec.epoch(recreated) != epoch
    assert codec.epoch({**info, "config": {"name": "OTHER_LOG"}}) != epoch


@pytest.mark.parametrize(
    ("messages", "first", "last", "low"),
    [
        (0, 0, 0, 0),  # a new stream
        (3, 1, 3, 0),
        (3, 4, 6, 3),  # retention removed 1..3
        (0, 5, 4, 4),  # everything purged: first is last + 1
    ],
)
def test_low_from_a_streams_state(messages: int, first: int, last: int, low: int) -> None:
    assert codec.low({"messages": messages, "first_seq": first, "last_seq": last}) == low


def test_delivery_seqs_from_either_reply_subject_form() -> None:
    assert codec.delivery_seqs("$JS.ACK.TIDINGS_LOG.c1.1.42.7.1700000000000000000.3") == (42, 7)
    v2 = "$JS.ACK.hub.ACCHASH.TIDINGS_LOG.c1.1.42.7.1700000000000000000.3.rand"
    assert codec.delivery_seqs(v2) == (42, 7)


def test_consumer_keys_are_valid_kv_keys_and_distinct() -> None:
    names = ["webhook:1", "mqtt", "webhooks/https://example.com/hook?x=1&y=ü", "a.b", ""]
    keys = [codec.consumer_key(n) for n in names]
    assert all(KV_KEY.fullmatch(k) for k in keys)
    assert len(set(keys)) == len(keys)


def test_stream_config_limits() -> None:
    named = codec.names("tidings")
    config = codec.stream_config(named, 0, 0.0, 60.0, 3)
    assert (config["max_msgs"], config["max_age"]) == (-1, 0)  # no limits
    assert config["duplicate_window"] == 60_000_000_000
    assert (config["num_replicas"], config["storage"], config["discard"]) == (3, "file", "old")
    config = codec.stream_config(named, 1000, 86_400.0, 60.0, 1)
    assert (config["max_msgs"], config["max_age"]) == (1000, 86_400_000_000_000)
