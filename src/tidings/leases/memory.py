"""Leases for one process, the one-node default: nothing else can take a lease, so ``run``
just runs ``work`` until stopping, restarting it when it returns or raises."""

from __future__ import annotations

from . import LeaseRunner


class MemoryLeases(LeaseRunner[str]):
    """Leases in a dict, never expiring. Two runs of one name on one instance take turns.

    Takes the same arguments as the engines' leases (``url`` is ``memory://``) and ignores
    ``prefix`` and ``ttl``."""

    def __init__(
        self,
        url: str = "memory://",
        prefix: str = "tidings",
        ttl: float = 10.0,
        node: str | None = None,
    ) -> None:
        super().__init__(None, node)
        self._tokens: dict[str, str] = {}

    async def _acquire(self, name: str, token: str) -> str | None:
        if self._tokens.setdefault(name, token) != token:
            return None
        return token

    async def _renew(self, name: str, token: str, state: str) -> str | None:
        return token if self._tokens.get(name) == token else None

    async def _release(self, name: str, token: str, state: str) -> None:
        if self._tokens.get(name) == token:
            del self._tokens[name]
