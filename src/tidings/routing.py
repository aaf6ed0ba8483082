"""The subscriber index: from a channel to its subscribers without scanning all of them.

A trie over channel segments. Each node has exact children, one ``*`` child, the subscribers
whose pattern ends at the node, and those whose pattern ends with ``**`` below it. Matching a
channel of ``d`` segments visits at most the nodes reachable through the channel's own segments
and ``*`` edges, however many subscribers there are.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from .events import SYSTEM, Pattern

S = TypeVar("S", bound=Hashable)


class _Node(Generic[S]):
    __slots__ = ("children", "rest", "star", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] = {}
        self.star: _Node[S] | None = None
        self.subs: dict[S, None] = {}  # an insertion-ordered set
        self.rest: dict[S, None] = {}  # subscribers of "<path>/**"

    def empty(self) -> bool:
        return not (self.children or self.star or self.subs or self.rest)


class Router(Generic[S]):
    def __init__(self) -> None:
        self._root: _Node[S] = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, pattern: Pattern, sub: S) -> None:
        node = self._root
        for segment in pattern.segments:
            if segment == "**":
                self._count += sub not in node.rest
                node.rest[sub] = None
                return
            if segment == "*":
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                child = node.children.get(segment)
                if child is None:
                    child = node.children[segment] = _Node()
                node = child
        self._count += sub not in node.subs
        node.subs[sub] = None

    def remove(self, pattern: Pattern, sub: S) -> None:
        path: list[tuple[_Node[S], str]] = []
        node: _Node[S] | None = self._root
        for segment in pattern.segments:
            assert node is not None
            if segment == "**":
                if node.rest.pop(sub, 0) is None:
                    self._count -= 1
                break
            path.append((node, segment))
            node = node.star if segment == "*" else node.children.get(segment)
            if node is None:
                return
        else:
            assert node is not None
            if node.subs.pop(sub, 0) is None:
                self._count -= 1
        # Prune nodes left empty, deepest first, so the trie does not grow without bound.
        for parent, segment in reversed(path):
            child = parent.star if segment == "*" else parent.children.get(segment)
            if child is None or not child.empty():
                break
            if segment == "*":
                parent.star = None
            else:
                del parent.children[segment]

    def match(self, channel: str) -> Iterable[S]:
        """Subscribers with a pattern matching ``channel``, each once."""
        segments = channel.split("/")
        groups: list[dict[S, None]] = []
        root = self._root
        if segments[0] == SYSTEM:  # only patterns naming "_tidings" match (events.SYSTEM)
            child = root.children.get(SYSTEM)
            if child is None:
                return ()
            nodes, segments = [child], segments[1:]
        else:
            nodes = [root]
        for segment in segments:
            following: list[_Node[S]] = []
            for node in nodes:
                if node.rest:
                    groups.append(node.rest)
                child = node.children.get(segment)
                if child is not None:
                    following.append(child)
                if node.star is not None:
                    following.append(node.star)
            nodes = following
            if not nodes:
                break
        groups.extend(node.subs for node in nodes if node.subs)
        if len(groups) == 1:
            return groups[0]  # the common case: no copy
        if not groups:
            return ()
        merged: dict[S, None] = {}
        for group in groups:
            merged.update(group)
        return merged
