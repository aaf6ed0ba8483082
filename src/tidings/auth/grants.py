"""Grants: which channels a credential may subscribe and publish to, with exact containment.

A subscription pattern is allowed iff every channel it can match is matched by a granted
pattern; the test works segment by segment, never on the text. The server's own channels
(``_tidings/...``) are matched only by patterns naming ``_tidings``, so ``**`` does not grant
them; an admin grant does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..events import SYSTEM, Pattern, is_system
from ..exceptions import Forbidden


def _split(pattern: Pattern) -> tuple[tuple[str, ...], bool]:
    """The segments before a trailing ``**``, and whether there is one."""
    if pattern.segments[-1] == "**":
        return pattern.segments[:-1], True
    return pattern.segments, False


def contains(outer: Pattern, inner: Pattern) -> bool:
    """True iff every channel ``inner`` matches is also matched by ``outer``.

    Position by position: an inner literal needs the same literal or ``*`` in outer, an inner
    ``*`` needs ``*``, and positions past outer's fixed part need outer's ``**``. An inner
    ``**`` reaches every length from its own fixed part on, so outer must end in ``**`` no
    later than that. Wildcards can stand for a segment named nowhere in outer, which is why an
    inner ``*`` is never covered by a literal.
    """
    if inner.segments[0] == SYSTEM and outer.segments[0] != SYSTEM:
        return False  # only a pattern naming "_tidings" matches the system channels
    outer_fixed, outer_tail = _split(outer)
    inner_fixed, inner_tail = _split(inner)
    if outer_tail:
        # outer matches len(outer_fixed) + 1 segments or more; inner's shortest channel has
        # len(inner_fixed) (+1 for its '**').
        if len(inner_fixed) + inner_tail < len(outer_fixed) + 1:
            return False
    elif inner_tail or len(inner_fixed) != len(outer_fixed):
        return False
    return all(o == "*" or o == i for o, i in zip(outer_fixed, inner_fixed, strict=False))


def covers(granted: Sequence[Pattern], pattern: Pattern) -> bool:
    """True iff every channel ``pattern`` matches is matched by at least one of ``granted``.

    For a fixed number of segments this is ``contains`` against a single grant: fill each ``*``
    with a segment no grant names, and only a grant containing the whole pattern matches that
    channel. A ``**`` spans many lengths that different grants may share out (``*`` and
    ``*/**`` together cover ``**``), so each length up to one past the longest grant is checked
    on its own; beyond that the same grants apply to every length.
    """
    if any(contains(g, pattern) for g in granted):
        return True
    fixed, tail = _split(pattern)
    if not tail or not granted:
        return False
    longest = max(len(g.segments) for g in granted)
    for n in range(len(fixed) + 1, max(len(fixed) + 1, longest + 1) + 1):
        segments = fixed + ("*",) * (n - len(fixed))
        exact = Pattern("/".join(segments), segments)
        if not any(contains(g, exact) for g in granted):
            return False
    return True


def quote(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _listing(patterns: Sequence[Pattern], limit: int = 8) -> str:
    if not patterns:
        return "nothing"
    shown = ", ".join(p.text for p in patterns[:limit])
    return shown if len(patterns) <= limit else f"{shown} and {len(patterns) - limit} more"


@dataclass(frozen=True, slots=True)
class Grant:
    """What one verified token allows."""

    subject: str
    subscribe: tuple[Pattern, ...]
    publish: tuple[Pattern, ...]
    admin: bool = False
    expires: float | None = None  # unix seconds

    def may_subscribe(self, pattern: Pattern) -> bool:
        """An admin may also watch the server's own channels (``_tidings/...``); others need
        a grant that names them."""
        if self.admin and pattern.segments[0] == SYSTEM:
            return True
        return covers(self.subscribe, pattern)

    def may_publish(self, channel: str) -> bool:
        return any(p.matches(channel) for p in self.publish)

    def check_subscribe(self, patterns: Iterable[Pattern]) -> None:
        for pattern in patterns:
            if not self.may_subscribe(pattern):
                raise Forbidden(
                    f"token for {quote(self.subject)} may not subscribe to {pattern.text!r} "
                    f"(granted: {_listing(self.subscribe)})"
                )

    def check_publish(self, channel: str) -> None:
        if is_system(channel):
            raise Forbidden(
                f"channel {channel[:80]!r} is reserved: channels under '{SYSTEM}/' carry the "
                "server's own events, and only the server publishes there"
            )
        if not self.may_publish(channel):
            raise Forbidden(
                f"token for {quote(self.subject)} may not publish to {channel!r} "
                f"(granted: {_listing(self.publish)})"
            )

    def check_admin(self) -> None:
        if not self.admin:
            raise Forbidden(f"token for {quote(self.subject)} has no admin grant")


_EVERYTHING = (Pattern.parse("**"),)
ANONYMOUS = Grant("anonymous", _EVERYTHING, _EVERYTHING, admin=True)
