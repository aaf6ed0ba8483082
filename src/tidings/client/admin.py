"""``Webhooks``: the webhook admin API (``/webhooks``) from Python, on a ``Client``.

::

    async with Client(url, headers={"Authorization": f"Bearer {token}"}) as client:
        hooks = Webhooks(client)
        endpoint = await hooks.create("https://example.com/hook", ["orders/**"])
        print(endpoint["secret"])  # shown once
        async for attempt in hooks.each_attempt(endpoint["id"], limit=20):
            ...

Rules:
- Each method is one request and returns the server's JSON answer as it is, except ``list``,
  which returns the ``endpoints`` list; ``each_attempt`` and ``each_failed`` follow ``next``.
- An argument left ``None`` is not sent: the server's default applies on create, and the field
  is unchanged on update. Durations (``timeout``, ``grace``) are seconds.
- The token needs an admin grant when auth is on; errors are the client's
  (``RequestRejected`` for a refusal, with the server's ``code`` and ``detail``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from .client import Client
from .errors import ProtocolError

# Attempts or failed events asked for per request by the each_* iterators; the server's
# default page size, so never over its maximum.
PAGE_SIZE = 100

# One page of a listing: (page size or None for the server's, cursor or None) -> the answer.
Fetch = Callable[[int | None, str | None], Awaitable[dict[str, Any]]]


def _fields(**values: Any) -> dict[str, Any]:
    """The JSON body: every value that is not None, as given (lists and maps copied)."""
    body: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, Sequence) and not isinstance(value, str):
            value = list(value)
        body[name] = value
    return body


def _params(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _object(answer: Any, what: str) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise ProtocolError("protocol", f"the answer to {what} is not a JSON object")
    return answer


def _list(answer: dict[str, Any], key: str, what: str) -> list[dict[str, Any]]:
    items = answer.get(key)
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ProtocolError("protocol", f"the answer to {what} has no {key!r} list of objects")
    return items


class Webhooks:
    """The webhook endpoints of the server ``client`` talks to."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @staticmethod
    def path(endpoint_id: str, *rest: str) -> str:
        """``/webhooks/{id}/…`` with the id percent-encoded as one path segment."""
        if endpoint_id in (".", ".."):
            segment = endpoint_id.replace(".", "%2E")  # else URL normalisation removes it
        else:
            segment = quote(endpoint_id, safe="")
        return "/".join(("/webhooks", segment, *rest))

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return _object(await self.client._request(method, path, **kwargs), f"{method} {path}")

    async def create(
        self,
        url: str,
        channels: Sequence[str],
        *,
        types: Sequence[str] | None = None,
        description: str | None = None,
        headers: Mapping[str, str] | None = None,
        rate_limit: float | None = None,
        concurrency: int | None = None,
        strict_order: bool | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the endpoint's, not this call's
        enabled: bool | None = None,
    ) -> dict[str, Any]:
        """Register an endpoint; returns its view with ``"secret"``, the only time it is shown.

        ``rate_limit`` is attempts per second (0: none); ``timeout`` seconds per attempt.
        """
        body = _fields(
            url=url,
            channels=channels,
            types=types,
            description=description,
            headers=headers,
            rate_limit=rate_limit,
            concurrency=concurrency,
            strict_order=strict_order,
            timeout=timeout,
            enabled=enabled,
        )
        return await self._call("POST", "/webhooks", json=body)

    async def list(self) -> list[dict[str, Any]]:
        """Every endpoint's view."""
        answer = await self._call("GET", "/webhooks")
        return _list(answer, "endpoints", "GET /webhooks")

    async def get(self, endpoint_id: str) -> dict[str, Any]:
        return await self._call("GET", self.path(endpoint_id))

    async def update(
        self,
        endpoint_id: str,
        *,
        url: str | None = None,
        channels: Sequence[str] | None = None,
        types: Sequence[str] | None = None,
        description: str | None = None,
        headers: Mapping[str, str] | None = None,
        rate_limit: float | None = None,
        concurrency: int | None = None,
        strict_order: bool | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the endpoint's, not this call's
        enabled: bool | None = None,
    ) -> dict[str, Any]:
        """Change the fields given (lists and maps are replaced whole); returns the view."""
        body = _fields(
            url=url,
            channels=channels,
            types=types,
            description=description,
            headers=headers,
            rate_limit=rate_limit,
            concurrency=concurrency,
            strict_order=strict_order,
            timeout=timeout,
            enabled=enabled,
        )
        return await self._call("PATCH", self.path(endpoint_id), json=body)

    async def delete(self, endpoint_id: str) -> dict[str, Any]:
        """Delete an endpoint; returns the view it had."""
        return await self._call("DELETE", self.path(endpoint_id))

    async def rotate(
        self, endpoint_id: str, *, grace: float | None = None, secret: str | None = None
    ) -> dict[str, Any]:
        """Start signing with a new secret (``secret``, or one the server generates).

        The old secret keeps signing too for ``grace`` seconds (server default when None).
        Returns the view with ``"secret"``, the new one.
        """
        body = _fields(grace=grace, secret=secret)
        return await self._call("POST", self.path(endpoint_id, "rotate"), json=body)

    async def attempts(
        self,
        endpoint_id: str,
        *,
        event: str | None = None,
        limit: int | None = None,
        before: str | None = None,
    ) -> dict[str, Any]:
        """One page of delivery attempts, newest first: ``{"attempts": [...], "next": …}``.

        ``event`` keeps one event's attempts; pass ``next`` as ``before`` for the next page.
        """
        params = _params(event=event, limit=limit, before=before)
        return await self._call("GET", self.path(endpoint_id, "attempts"), params=params)

    async def failed(
        self, endpoint_id: str, *, limit: int | None = None, after: str | None = None
    ) -> dict[str, Any]:
        """One page of events given up on: ``{"failed": [{event, time, reason}], "next": …}``.

        Pass ``next`` as ``after`` for the next page.
        """
        params = _params(limit=limit, after=after)
        return await self._call("GET", self.path(endpoint_id, "failed"), params=params)

    async def replay(
        self,
        endpoint_id: str,
        *,
        event: str | None = None,
        since: str | None = None,
        until: str | None = None,
        from_time: str | None = None,
        to_time: str | None = None,
        failed_only: bool | None = None,
        dry_run: bool | None = None,
        rate: float | None = None,
    ) -> dict[str, Any]:
        """Deliver past events again: one ``event``, or those in a cursor and time range.

        ``from_time`` and ``to_time`` are RFC 3339 times or unix seconds, as strings; they are
        sent as ``from`` and ``to``. ``dry_run`` answers ``{"events": N}`` and starts nothing;
        otherwise the answer is ``{"replay": job}``.
        """
        body = _fields(
            event=event,
            since=since,
            until=until,
            failed_only=failed_only,
            dry_run=dry_run,
            rate=rate,
        )
        body.update(_fields(**{"from": from_time, "to": to_time}))
        return await self._call("POST", self.path(endpoint_id, "replay"), json=body)

    async def each_attempt(
        self, endpoint_id: str, *, event: str | None = None, limit: int | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Attempts, newest first, page after page, until ``limit`` of them or the last."""
        async for item in self._each(
            lambda size, cursor: self.attempts(endpoint_id, event=event, limit=size, before=cursor),
            "attempts",
            limit,
        ):
            yield item

    async def each_failed(
        self, endpoint_id: str, *, limit: int | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Events given up on, page after page, until ``limit`` of them or the last."""
        async for item in self._each(
            lambda size, cursor: self.failed(endpoint_id, limit=size, after=cursor),
            "failed",
            limit,
        ):
            yield item

    @staticmethod
    async def _each(fetch: Fetch, key: str, limit: int | None) -> AsyncIterator[dict[str, Any]]:
        cursor: str | None = None
        count = 0
        while limit is None or count < limit:
            size = None if limit is None else min(limit - count, PAGE_SIZE)
            page: dict[str, Any] = await fetch(size, cursor)
            items = _list(page, key, f"the {key} listing")
            for item in items:
                yield item
                count += 1
                if limit is not None and count >= limit:
                    return
            following = page.get("next")
            if following is None or not items:
                return
            if not isinstance(following, str) or following == cursor:
                raise ProtocolError(
                    "protocol", f"the {key} listing has a bad 'next': {following!r}"
                )
            cursor = following
