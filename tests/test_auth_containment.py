"""Pattern containment and grant checks: exact, never textual, never looser than asked."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidings.auth import ANONYMOUS, Grant, contains, covers
from tidings.events import Pattern, validate_channel
from tidings.exceptions import Forbidden, InvalidChannel, InvalidPattern


def p(text: str) -> Pattern:
    return Pattern.parse(text)


def grant(subscribe: list[str], publish: list[str] = [], subject: str = "alice") -> Grant:  # noqa: B006
    return Grant(subject, tuple(map(p, subscribe)), tuple(map(p, publish)))


# -- contains: the cases that matter ------------------------------------------------------------


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("news/*", "news/a", True),
        ("news/*", "news/*", True),
        ("news/*", "news2", False),
        ("news/*", "news2/a", False),
        ("news/*", "news/a/b", False),
        ("news/*", "news", False),
        ("news/*", "news/**", False),
        ("news/*", "*", False),
        ("news/*", "*/a", False),
        ("news/*", "News/a", False),  # case matters: News is another channel
        ("news/**", "news/a", True),
        ("news/**", "news/*", True),
        ("news/**", "news/a/*", True),
        ("news/**", "news/a/**", True),
        ("news/**", "news/**", True),
        ("news/**", "news/*/**", True),
        ("news/**", "news", False),
        ("news/**", "news2/a", False),
        ("news/**", "**", False),
        ("news/**", "*/**", False),
        ("news/a/**", "news/**", False),  # news/b is matched by the inner only
        ("news/*/**", "news/**", False),  # news/x needs a second segment
        ("news/*/**", "news/a/b", True),
        ("*/x", "a/x", True),
        ("*/x", "*/x", True),
        ("*/x", "*/*", False),
        ("*/x", "a/y", False),
        ("*/*", "*/x", True),
        ("*/**", "a/b/c", True),
        ("*/**", "a", False),
        ("*", "**", False),
        ("a/*", "a/**", False),
        ("**", "**", True),
        ("**", "a", True),
        ("**", "*/*/**", True),
        ("a", "a", True),
        ("a", "*", False),
    ],
)
def test_contains(outer: str, inner: str, expected: bool) -> None:
    assert contains(p(outer), p(inner)) is expected


@pytest.mark.parametrize(
    "text",
    [
        "news/../x",
        "news/./x",
        "news//a",
        "news/a/",
        "/news/a",
        "nеws/a",  # Cyrillic е
        "news/ａ",  # fullwidth a
        "news/a\u200b",  # zero-width space
        "news/*x",
        "news/**/a",
    ],
)
def test_look_alike_and_traversal_patterns_do_not_even_parse(text: str) -> None:
    with pytest.raises(InvalidPattern):
        Pattern.parse(text)


@pytest.mark.parametrize("channel", ["news/../x", "nеws/a", "news//a", "news/a/"])
def test_look_alike_and_traversal_channels_do_not_validate(channel: str) -> None:
    with pytest.raises(InvalidChannel):
        validate_channel(channel)


def test_look_alike_channels_are_not_granted() -> None:
    g = grant(["news/*"], ["news/*"])
    assert not g.may_subscribe(p("News/a")) and not g.may_publish("News/a")
    assert not g.may_publish("nеws/a")  # even if a caller skipped validation
    assert not g.may_publish("news/../x") and not g.may_publish("news/a/../../secret")


# -- covers / may_subscribe: a pattern spread over several grants ---------------------------------


@pytest.mark.parametrize(
    ("granted", "pattern", "expected"),
    [
        (["*", "*/**"], "**", True),  # one segment, and two or more
        (["news/*", "news/*/**"], "news/**", True),
        (["news/a", "news/*/**"], "news/**", False),  # news/b
        (["*"], "**", False),
        (["*/**"], "**", False),
        (["a", "*/**"], "**", False),  # b
        (["x/*", "x/*/*", "x/*/*/**"], "x/**", True),
        (["x/*", "x/*/*/**"], "x/**", False),  # x/a/b
        (["x/*", "x/*/*"], "x/**", False),  # x/a/b/c
        (["a/*", "b/*"], "*/*", False),
        ([], "a", False),
        ([], "**", False),
    ],
)
def test_covers(granted: list[str], pattern: str, expected: bool) -> None:
    assert covers(tuple(map(p, granted)), p(pattern)) is expected
    assert grant(granted).may_subscribe(p(pattern)) is expected


def test_check_subscribe_names_the_first_refused_pattern_and_the_subject() -> None:
    g = grant(["news/*"])
    g.check_subscribe([p("news/a"), p("news/*")])
    with pytest.raises(Forbidden) as info:
        g.check_subscribe([p("news/a"), p("orders/**"), p("x")])
    assert (
        info.value.detail == "token for 'alice' may not subscribe to 'orders/**' (granted: news/*)"
    )


def test_check_publish_and_admin_messages() -> None:
    g = grant([], ["news/*", "alerts/**"], subject="svc\n'x'")
    g.check_publish("alerts/a/b")
    with pytest.raises(Forbidden) as info:
        g.check_publish("news/a/b")
    assert info.value.detail == (
        "token for \"svc\\n'x'\" may not publish to 'news/a/b' (granted: news/*, alerts/**)"
    )
    with pytest.raises(Forbidden, match="has no admin grant"):
        g.check_admin()
    ANONYMOUS.check_admin()


def test_long_grant_lists_are_shortened_in_messages() -> None:
    g = grant([f"c{i}" for i in range(20)], [])
    with pytest.raises(Forbidden) as info:
        g.check_subscribe([p("other")])
    assert info.value.detail.endswith("(granted: c0, c1, c2, c3, c4, c5, c6, c7 and 12 more)")
    with pytest.raises(Forbidden, match=r"\(granted: nothing\)$"):
        g.check_publish("c0")


# -- properties over a small alphabet ------------------------------------------------------------
#
# Patterns use the segments a, b and *, with an optional trailing **. Any segment a pattern does
# not name behaves like "z", and lengths past the longest pattern + 1 behave alike, so the
# channels over {a, b, z} up to that length + 1 decide containment exactly.

SEGMENTS = st.sampled_from(["a", "b", "*"])
FILL = st.sampled_from(["a", "b", "z", "c0"])


@st.composite
def patterns(draw: st.DrawFn) -> Pattern:
    segments = draw(st.lists(SEGMENTS, max_size=3))
    if draw(st.booleans()) or not segments:
        segments.append("**")
    return Pattern.parse("/".join(segments))


@st.composite
def channels_of(draw: st.DrawFn, pattern: Pattern) -> str:
    """A channel ``pattern`` matches, its wildcards filled at random."""
    parts: list[str] = []
    for segment in pattern.segments:
        if segment == "*":
            parts.append(draw(FILL))
        elif segment == "**":
            parts.extend(draw(st.lists(FILL, min_size=1, max_size=3)))
        else:
            parts.append(segment)
    return "/".join(parts)


def universe(*pats: Pattern) -> list[str]:
    longest = max(len(q.segments) for q in pats)
    return [
        "/".join(parts)
        for n in range(1, longest + 3)
        for parts in itertools.product(("a", "b", "z"), repeat=n)
    ]


def reference_regex(pattern: Pattern) -> re.Pattern[str]:
    """An independent matcher, to check Pattern.matches and the grants built on it."""
    parts = []
    for segment in pattern.segments:
        parts.append({"*": "[^/]+", "**": "[^/]+(?:/[^/]+)*"}.get(segment, re.escape(segment)))
    return re.compile("/".join(parts))


@settings(max_examples=300, deadline=None)
@given(outer=patterns(), inner=patterns(), data=st.data())
def test_contained_pattern_channels_are_all_matched_by_the_outer_pattern(
    outer: Pattern, inner: Pattern, data: st.DataObject
) -> None:
    if contains(outer, inner):
        for _ in range(10):
            channel = data.draw(channels_of(inner))
            assert inner.matches(channel)
            assert outer.matches(channel), (outer.text, inner.text, channel)


@settings(max_examples=300, deadline=None)
@given(outer=patterns(), inner=patterns())
def test_contains_is_exact(outer: Pattern, inner: Pattern) -> None:
    matched = [c for c in universe(outer, inner) if inner.matches(c)]
    assert contains(outer, inner) is all(outer.matches(c) for c in matched)


@settings(max_examples=300, deadline=None)
@given(granted=st.lists(patterns(), max_size=4), inner=patterns())
def test_may_subscribe_is_exact(granted: list[Pattern], inner: Pattern) -> None:
    g = Grant("alice", tuple(granted), ())
    matched = [c for c in universe(inner, *granted) if inner.matches(c)]
    expected = all(any(q.matches(c) for q in granted) for c in matched)
    assert g.may_subscribe(inner) is expected
    if expected:
        g.check_subscribe([inner])
    else:
        with pytest.raises(Forbidden, match=re.escape(f"subscribe to {inner.text!r}")):
            g.check_subscribe([inner])


@settings(max_examples=300, deadline=None)
@given(granted=st.lists(patterns(), max_size=4), data=st.data())
def test_may_publish_iff_some_publish_pattern_matches(
    granted: list[Pattern], data: st.DataObject
) -> None:
    g = Grant("alice", (), tuple(granted))
    sources = [*granted, Pattern.parse("**")]
    for _ in range(10):
        channel = data.draw(channels_of(data.draw(st.sampled_from(sources))))
        expected = any(reference_regex(q).fullmatch(channel) for q in granted)
        assert g.may_publish(channel) is expected
        if not expected:
            with pytest.raises(Forbidden):
                g.check_publish(channel)
