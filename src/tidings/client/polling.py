"""Subscribing by HTTP polling (``GET /poll``): long polling and short polling.

Each answer carries the cursor to continue from, also as its ETag; the next request sends it
back in ``If-None-Match``, so a poll with nothing new costs a ``304 Not Modified`` and no body.
Long polling asks the server to hold the request up to ``wait`` seconds (except the first
request without a cursor, which learns the current position at once); short polling asks for
what is there and, once caught up, pauses ``poll_interval`` seconds before asking again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from .errors import ProtocolError, check
from .model import Position, decode_event, parse_json
from .transport import Item, SubscribeOptions


def etag_cursor(value: str | None) -> str | None:
    """The cursor in an ETag header value (RFC 9110 §8.8.3), without quotes or ``W/``."""
    if value is None:
        return None
    tag = value.strip().removeprefix("W/").strip('"')
    return tag or None


class _Polling:
    hold: bool  # long polling: the server holds the request until events or ``wait``

    def __init__(self, http: httpx.AsyncClient, options: SubscribeOptions) -> None:
        self.http = http
        self.interval = options.poll_interval
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("channel", p) for p in options.patterns
        ]
        if options.limit is not None:
            params.append(("limit", str(options.limit)))
        self.params = self.first_params = httpx.QueryParams(params)
        self.timeout = httpx.Timeout(options.timeout)
        if self.hold:
            self.params = self.first_params.add("wait", f"{options.wait:g}")
            # The answer may take ``wait`` seconds by design.
            self.timeout = httpx.Timeout(options.timeout + options.wait)

    async def stream(self, cursor: str | None) -> AsyncGenerator[Item, None]:
        while True:
            if cursor is None:
                # Learn the position at once rather than after a held poll, so that a
                # connection lost during that poll resumes from it, not from a later head.
                headers, params = {}, self.first_params
            else:
                headers, params = {"If-None-Match": f'"{cursor}"'}, self.params
            response = await self.http.get(
                "/poll", params=params, headers=headers, timeout=self.timeout
            )
            await check(response)
            more = False
            if response.status_code == 304:
                # Nothing new; the ETag may still have moved past events on other channels.
                cursor = etag_cursor(response.headers.get("etag")) or cursor
                assert cursor is not None  # a 304 answers a request that sent a cursor
                yield Position(cursor)
            else:
                page: Any = parse_json(response.content, "poll answer")
                try:
                    envelopes = page["events"]
                    reason = page.get("reason")
                    position = Position(
                        str(page["cursor"]),
                        bool(page["recovered"]),
                        None if reason is None else str(reason),
                    )
                    more = bool(page.get("more", False))
                except (KeyError, TypeError):
                    raise ProtocolError("protocol", "malformed poll answer") from None
                for envelope in envelopes:
                    yield decode_event(envelope)
                yield position
                cursor = position.cursor
            if not self.hold and not more:
                await asyncio.sleep(self.interval)


class LongPollTransport(_Polling):
    hold = True


class PollTransport(_Polling):
    hold = False
