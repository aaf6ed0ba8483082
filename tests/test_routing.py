"""The subscriber index: exact channels, '*', '**', overlaps, removal and pruning."""

from __future__ import annotations

from collections import Counter

import pytest

from tidings.events import Pattern
from tidings.routing import Router


def P(text: str) -> Pattern:
    return Pattern.parse(text)


def matched(router: Router[str], channel: str) -> list[str]:
    return list(router.match(channel))


def test_empty_router_matches_nothing() -> None:
    router: Router[str] = Router()
    assert len(router) == 0
    assert matched(router, "a") == []
    assert matched(router, "a/b/c") == []


def test_exact_pattern_matches_only_its_channel() -> None:
    router: Router[str] = Router()
    router.add(P("orders/42"), "s")
    assert len(router) == 1
    assert matched(router, "orders/42") == ["s"]
    for channel in ["orders", "orders/4", "orders/420", "orders/42/x", "x/orders/42", "orders/43"]:
        assert matched(router, channel) == [], channel


def test_star_matches_exactly_one_segment() -> None:
    router: Router[str] = Router()
    router.add(P("orders/*"), "s")
    assert matched(router, "orders/1") == ["s"]
    assert matched(router, "orders/abc") == ["s"]
    assert matched(router, "orders") == []
    assert matched(router, "orders/1/2") == []
    assert matched(router, "invoices/1") == []


def test_star_in_the_middle() -> None:
    router: Router[str] = Router()
    router.add(P("orders/*/status"), "s")
    assert matched(router, "orders/1/status") == ["s"]
    assert matched(router, "orders/1") == []
    assert matched(router, "orders/1/status/x") == []
    assert matched(router, "orders/1/other") == []


def test_leading_star() -> None:
    router: Router[str] = Router()
    router.add(P("*/status"), "s")
    assert matched(router, "orders/status") == ["s"]
    assert matched(router, "users/status") == ["s"]
    assert matched(router, "status") == []
    assert matched(router, "a/b/status") == []


def test_double_star_matches_one_or_more_segments() -> None:
    router: Router[str] = Router()
    router.add(P("orders/**"), "s")
    assert matched(router, "orders/1") == ["s"]
    assert matched(router, "orders/1/2") == ["s"]
    assert matched(router, "orders/1/2/3/4/5/6") == ["s"]
    assert matched(router, "orders") == []
    assert matched(router, "invoices/1") == []
    assert matched(router, "ordersx/1") == []


def test_bare_double_star_matches_every_channel() -> None:
    router: Router[str] = Router()
    router.add(P("**"), "all")
    for channel in ["a", "a/b", "x/y/z/w"]:
        assert matched(router, channel) == ["all"]


def test_star_then_double_star() -> None:
    router: Router[str] = Router()
    router.add(P("*/x/**"), "s")
    assert matched(router, "a/x/1") == ["s"]
    assert matched(router, "b/x/1/2") == ["s"]
    assert matched(router, "a/x") == []
    assert matched(router, "a/y/1") == []


def test_overlapping_patterns_of_one_subscriber_return_it_once() -> None:
    router: Router[str] = Router()
    for text in ["orders/42", "orders/*", "orders/**", "*/42", "*/*", "**"]:
        router.add(P(text), "s")
    assert matched(router, "orders/42") == ["s"]
    assert matched(router, "orders/42/x") == ["s"]  # via orders/** and **
    assert matched(router, "users/42") == ["s"]  # via */42, */* and **


def test_overlapping_subscribers_each_returned_once() -> None:
    router: Router[str] = Router()
    router.add(P("orders/42"), "exact")
    router.add(P("orders/*"), "star")
    router.add(P("orders/**"), "rest")
    router.add(P("*/42"), "lead")
    router.add(P("invoices/*"), "other")
    router.add(P("orders/*"), "exact")  # 'exact' also through a second pattern

    result = matched(router, "orders/42")
    assert Counter(result) == Counter({"exact": 1, "star": 1, "rest": 1, "lead": 1})
    assert Counter(matched(router, "orders/7")) == Counter({"star": 1, "rest": 1, "exact": 1})
    assert matched(router, "orders/7/8") == ["rest"]
    assert Counter(matched(router, "invoices/42")) == Counter({"lead": 1, "other": 1})


def test_double_star_at_several_depths() -> None:
    router: Router[str] = Router()
    router.add(P("**"), "root")
    router.add(P("a/**"), "a")
    router.add(P("a/b/**"), "ab")
    router.add(P("a/*/**"), "a*")
    assert set(matched(router, "a")) == {"root"}
    assert set(matched(router, "a/b")) == {"root", "a"}
    assert set(matched(router, "a/b/c")) == {"root", "a", "ab", "a*"}
    assert set(matched(router, "a/z/c")) == {"root", "a", "a*"}
    for channel in ["a", "a/b", "a/b/c", "a/z/c/d/e"]:
        result = matched(router, channel)
        assert len(result) == len(set(result)), channel


def test_many_subscribers_on_one_pattern() -> None:
    router: Router[str] = Router()
    subs = [f"s{i}" for i in range(500)]
    for sub in subs:
        router.add(P("news/*"), sub)
    assert len(router) == 500
    assert sorted(matched(router, "news/today")) == sorted(subs)
    assert matched(router, "news") == []


def test_match_does_not_return_subscribers_of_other_channels() -> None:
    # 10,000 subscribers on distinct channels: a match for one returns only its own. (The trie
    # visits only nodes along the channel's segments; results are asserted, not time.)
    router: Router[int] = Router()
    n = 10_000
    for i in range(n):
        router.add(P(f"users/{i}/inbox"), i)
    router.add(P("users/*/inbox"), -1)
    router.add(P("users/**"), -2)
    assert len(router) == n + 2
    assert set(router.match("users/4242/inbox")) == {4242, -1, -2}
    assert set(router.match("users/9999/inbox")) == {9999, -1, -2}
    assert set(router.match("users/4242/outbox")) == {-2}
    assert set(router.match("users/10000/inbox")) == {-1, -2}
    assert list(router.match("groups/1/inbox")) == []


def test_match_hashes_no_subscriber_outside_the_result() -> None:
    # A scan would have to touch every subscriber; the trie touches none beyond the result
    # (merging groups hashes only the subscribers being returned).
    hashed: list[int] = []

    class Sub:
        def __init__(self, n: int) -> None:
            self.n = n

        def __hash__(self) -> int:
            hashed.append(self.n)
            return self.n

    router: Router[Sub] = Router()
    subs = [Sub(i) for i in range(2_000)]
    for sub in subs:
        router.add(P(f"c/{sub.n}"), sub)
    router.add(P("c/*"), subs[7])  # forces a merge of two groups
    hashed.clear()
    result = list(router.match("c/7"))
    assert result == [subs[7]]
    assert set(hashed) <= {7}


def test_remove_stops_matching_and_prunes_to_empty() -> None:
    router: Router[str] = Router()
    patterns = ["a/b/c", "a/*/c", "a/**", "**", "*/b", "x/y/z/w", "a/b/**"]
    for text in patterns:
        router.add(P(text), "s")
    assert len(router) == len(patterns)
    for text in patterns:
        router.remove(P(text), "s")
    assert len(router) == 0
    for channel in ["a/b/c", "a/x/c", "a/b", "x/y/z/w", "q"]:
        assert matched(router, channel) == [], channel
    # Every node was pruned: the trie does not keep empty branches behind.
    assert router._root.empty()


def test_remove_keeps_other_subscribers_and_shared_branches() -> None:
    router: Router[str] = Router()
    router.add(P("a/b"), "s1")
    router.add(P("a/b"), "s2")
    router.add(P("a/b/c"), "s3")
    router.add(P("a/*"), "s4")
    router.add(P("a/**"), "s5")

    router.remove(P("a/b"), "s1")
    assert len(router) == 4
    assert set(matched(router, "a/b")) == {"s2", "s4", "s5"}
    assert set(matched(router, "a/b/c")) == {"s3", "s5"}

    router.remove(P("a/b"), "s2")
    router.remove(P("a/*"), "s4")
    assert set(matched(router, "a/b")) == {"s5"}
    assert set(matched(router, "a/b/c")) == {"s3", "s5"}

    router.remove(P("a/**"), "s5")
    assert matched(router, "a/b") == []
    assert matched(router, "a/b/c") == ["s3"]
    router.remove(P("a/b/c"), "s3")
    assert len(router) == 0
    assert router._root.empty()


def test_remove_one_of_a_subscribers_patterns_keeps_the_others() -> None:
    router: Router[str] = Router()
    router.add(P("orders/*"), "s")
    router.add(P("orders/**"), "s")
    router.remove(P("orders/*"), "s")
    assert matched(router, "orders/1") == ["s"]
    assert matched(router, "orders/1/2") == ["s"]
    assert len(router) == 1


@pytest.mark.parametrize(
    ("added", "removed", "sub"),
    [
        ("a/b", "a/c", "s"),  # never added pattern, missing branch
        ("a/b", "a/b", "other"),  # right pattern, wrong subscriber
        ("a/**", "a/**", "other"),
        ("a/**", "b/**", "s"),
        ("a/b", "a/b/c", "s"),
        ("a/b/c", "a/b", "s"),
        ("a/*", "a/b", "s"),
    ],
)
def test_removing_what_was_not_added_changes_nothing(added: str, removed: str, sub: str) -> None:
    router: Router[str] = Router()
    router.add(P(added), "s")
    router.remove(P(removed), sub)
    assert len(router) == 1
    channel = added.replace("**", "x").replace("*", "x")
    assert matched(router, channel) == ["s"]


def test_remove_twice_does_not_go_negative() -> None:
    router: Router[str] = Router()
    router.add(P("a/b"), "s")
    router.add(P("a/**"), "t")
    router.remove(P("a/b"), "s")
    router.remove(P("a/b"), "s")
    router.remove(P("a/**"), "t")
    router.remove(P("a/**"), "t")
    assert len(router) == 0


def test_adding_the_same_pattern_twice_counts_once() -> None:
    # The trie stores (pattern, subscriber) as a set; len() must agree with it, or a duplicate
    # add followed by one remove leaves len() at 1 with nothing left to match.
    router: Router[str] = Router()
    router.add(P("a/b"), "s")
    router.add(P("a/b"), "s")
    router.add(P("a/**"), "s")
    router.add(P("a/**"), "s")
    assert len(router) == 2
    router.remove(P("a/b"), "s")
    router.remove(P("a/**"), "s")
    assert matched(router, "a/b") == []
    assert len(router) == 0


def test_readding_after_remove_matches_again() -> None:
    router: Router[str] = Router()
    router.add(P("a/*/c"), "s")
    router.remove(P("a/*/c"), "s")
    router.add(P("a/*/c"), "s")
    assert matched(router, "a/b/c") == ["s"]
    assert len(router) == 1


def test_churn_of_many_subscribers_leaves_the_trie_empty() -> None:
    router: Router[int] = Router()
    entries = []
    for i in range(1_000):
        for text in (f"t/{i % 37}/x{i}", f"t/*/x{i % 11}", f"t/{i % 5}/**"):
            entries.append((P(text), i))
    for pattern, sub in entries:
        router.add(pattern, sub)
    assert len(router) == len(entries)
    assert set(router.match("t/3/x3")) >= {3}
    for pattern, sub in entries:
        router.remove(pattern, sub)
    assert len(router) == 0
    assert router._root.empty()
    assert list(router.match("t/3/x3")) == []


@pytest.mark.parametrize(
    ("pattern", "channel", "expected"),
    [
        ("**", "_tidings/webhooks/ep1", False),  # the server's own channels: never by accident
        ("*/webhooks/*", "_tidings/webhooks/ep1", False),
        ("*", "_tidings", False),
        ("_tidings/**", "_tidings/webhooks/ep1", True),
        ("_tidings/webhooks/*", "_tidings/webhooks/ep1", True),
        ("_tidings", "_tidings", True),
        ("_tidings/**", "_tidings", False),
        ("**", "tidings/webhooks", True),  # only the exact first segment is reserved
        ("**", "x/_tidings", True),
    ],
)
def test_system_channels_match_only_patterns_that_name_them(
    pattern: str, channel: str, expected: bool
) -> None:
    parsed = Pattern.parse(pattern)
    assert parsed.matches(channel) is expected
    router: Router[str] = Router()
    router.add(parsed, "s")
    assert (list(router.match(channel)) == ["s"]) is expected
