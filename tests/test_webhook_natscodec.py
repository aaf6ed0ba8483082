"""The NATS webhook store's layout (``tidings/webhooks/natscodec.py``): names, keys, stored values,
and the search for where the newest attempts start."""

from __future__ import annotations

import bisect
import random
import re

import pytest

from tidings.exceptions import ConfigError
from tidings.webhooks.delivery import Attempt, Retry
from tidings.webhooks.natscodec import Names, Search, State, masked, row, stored, token, untoken
from tidings.webhooks.policy import judge
from tidings.webhooks.store import Failed

SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_=-]+")  # no ".", "*", ">" or space; a valid KV key part


@pytest.mark.parametrize(
    "id", ["ep_1", "", "ep.1", "ep_1:retries", "*", ">", "a b", "ünï=cöde", "=41", "x" * 200]
)
def test_an_endpoint_id_is_one_token_and_comes_back(id: str) -> None:
    made = token(id)
    assert SUBJECT_TOKEN.fullmatch(made), made
    assert untoken(made) == id
    if re.fullmatch(r"[A-Za-z0-9_-]+", id):
        assert made == id  # readable in `nats kv ls`


def test_tokens_of_different_ids_differ_and_wildcards_stay_apart() -> None:
    ids = ["", "=", "a", "A", "a.b", "a=2Eb", "a_b", "a-b", "a b", "ep_1", "ep_1.x"]
    assert len({token(id) for id in ids}) == len(ids)
    names = Names("tidings")
    assert not names.attempt("ep_1.x", 3, "u").startswith(names.attempts_of("ep_1")[:-4] + ".")


@pytest.mark.parametrize("text", ["=4", "=zz", "a.b", "*", "ü"])
def test_text_no_id_makes_is_not_a_token(text: str) -> None:
    with pytest.raises(ValueError):
        untoken(text)


def test_names_come_from_the_prefix_as_the_logs_do() -> None:
    names = Names("eu-1.prod")
    assert names.bucket == "eu-1_prod_webhooks"
    assert names.kv_stream == "KV_eu-1_prod_webhooks"
    assert names.attempts_stream == "EU-1_PROD_WH_ATTEMPTS"
    assert names.endpoint("ep_1") == "$KV.eu-1_prod_webhooks.ep.ep_1"
    assert names.endpoint_id(names.endpoint("a.b c")) == "a.b c"
    assert names.state("ep_1", 42) == "$KV.eu-1_prod_webhooks.ev.ep_1.42"
    assert names.states("ep_1") == "$KV.eu-1_prod_webhooks.ev.ep_1.>"
    assert names.attempt("ep_1", 42, "ab-1") == "eu-1.prod.wh.attempts.ep_1.42.ab-1"
    assert names.attempts_of("ep_1") == "eu-1.prod.wh.attempts.ep_1.*.*"
    assert names.attempts_of("ep_1", 42) == "eu-1.prod.wh.attempts.ep_1.42.*"
    assert names.attempts_config(3, 120.0)["subjects"] == ["eu-1.prod.wh.attempts.>"]
    with pytest.raises(ConfigError, match="prefix"):
        Names("two words")


def test_a_nats_url_is_shown_without_its_password_or_token() -> None:
    assert masked("nats://u:s3cret@h:4222") == "nats://u:***@h:4222"
    assert masked("nats://t0ken@h:4222,tls://h2:4222") == "nats://***@h:4222,tls://h2:4222"
    assert masked("nats://u:p@[::1]:4222") == "nats://u:***@[::1]:4222"
    assert masked("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_an_attempt_survives_its_row() -> None:
    sent = Attempt("ep_1", "e:3", 3, 2, 1234.5, 0.125, None, "connection refused",
                   b"\x00\n{binary}\xff", judge(None, "connection refused"), "replay")  # fmt: skip
    got = stored(17, Names("t").attempt("ep_1", 3, "u-1"), row(sent))
    assert (got.id, got.seq, got.number, got.time, got.duration, got.status, got.error,
            got.response, got.outcome, got.reason, got.trigger) == (
        17, 3, 2, 1234.5, 0.125, None, "connection refused", sent.response,
        sent.outcome.verdict.value, sent.outcome.reason, "replay")  # fmt: skip


def test_an_events_state_holds_its_retry_and_its_mark() -> None:
    marked = State.failed(Failed(5, 1.5, "503"))
    both = marked.with_retry(Retry(5, 2, 9.0))
    assert State.of(both.encode()) == State([2, 9.0], [1.5, "503"])
    assert State.of(both.with_retry(None).encode()) == marked
    assert State.of(None) == State.of(b"") == State()  # a KV delete marker


def search(
    positions: list[int], first: int, top: int, limit: int, few: bool = False
) -> tuple[int, int, int]:
    """Run a ``Search`` against messages at ``positions``: (its start, guesses, count there)."""
    positions = sorted(positions)
    finder = Search(first, top, limit, few=few)

    def count(at: int) -> int:  # what making a consumer from ``at`` answers, less those >= top
        return bisect.bisect_left(positions, top) - bisect.bisect_left(positions, at)

    while True:
        at = finder.guess()
        assert first <= at < top
        if finder.counted(at, count(at)):
            return at, finder.guesses, count(at)


@pytest.mark.parametrize("limit", [1, 10, 100, 1000])
def test_one_guess_finds_the_newest_when_every_message_is_the_subjects(limit: int) -> None:
    _, guesses, found = search(list(range(1, 100_001)), 1, 90_001, limit)
    assert guesses == 1 and limit <= found <= limit + max(64, limit // 2)


@pytest.mark.parametrize("share", [2, 3, 10, 1000])
def test_a_few_guesses_find_the_newest_of_an_evenly_spread_share(share: int) -> None:
    _, guesses, found = search(list(range(5, 1_000_001, share)), 1, 1_000_001, 100)
    assert guesses <= 4 and 100 <= found <= 164


def test_the_search_never_stops_short_and_ends_on_any_spread() -> None:
    rng = random.Random(7)
    for _ in range(300):
        last = rng.randint(1, 200_000)
        first = rng.randint(1, last)
        dense = sorted(
            rng.sample(range(first, last + 1), min(last - first + 1, rng.randint(0, 3000)))
        )
        sparse = sorted(
            rng.sample(range(first, last + 1), min(last - first + 1, rng.randint(0, 50)))
        )
        cut = rng.randint(first, last)
        positions = [p for p in dense if p < cut] + [p for p in sparse if p >= cut]  # uneven
        top = rng.randint(first + 1, last + 1)
        limit = rng.choice([-1, 1, 5, 100, 500])
        at, guesses, found = search(positions, first, top, limit)
        below = bisect.bisect_left(positions, top)
        assert guesses <= 64
        if limit < 0:
            assert at == first
        else:
            assert found >= min(limit, below - bisect.bisect_left(positions, first))


def test_one_events_few_attempts_are_counted_from_the_first() -> None:
    at, guesses, found = search([10, 5000, 90_000], 1, 100_000, 100, few=True)
    assert (at, guesses, found) == (1, 1, 3)
