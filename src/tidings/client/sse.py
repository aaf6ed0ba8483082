"""Subscribing over Server-Sent Events (``GET /sse``), with the codec from ``tidings.sse``.

Resume follows EventSource: the cursor goes in ``Last-Event-ID``. The stream opens with
``tidings.subscribed`` (id = where it starts, data = ``recovered``/``reason``), which is how even
a quiet subscription learns a cursor to resume from. ``tidings.lagged`` precedes the server
closing a stream that fell behind; closing is all the client needs to see to reconnect. The
server's ``retry:`` advice is not used: the subscription's backoff decides when to reconnect.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import orjson

from ..sse import Decoder, ServerEvent
from .errors import ProtocolError, check
from .model import Position, decode_event
from .transport import Item, SubscribeOptions

log = logging.getLogger("tidings.client")

SUBSCRIBED = "tidings.subscribed"
LAGGED = "tidings.lagged"


class SSETransport:
    def __init__(self, http: httpx.AsyncClient, options: SubscribeOptions) -> None:
        self.http = http
        self.params = httpx.QueryParams([("channel", p) for p in options.patterns])
        self.timeout = httpx.Timeout(options.timeout, read=options.idle_timeout)

    async def stream(self, cursor: str | None) -> AsyncGenerator[Item, None]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if cursor is not None:
            headers["Last-Event-ID"] = cursor
        request = self.http.stream(
            "GET", "/sse", params=self.params, headers=headers, timeout=self.timeout
        )
        async with request as response:
            await check(response)
            decoder = Decoder()
            async for chunk in response.aiter_bytes():
                for message in decoder.feed(chunk):
                    item = self._item(message)
                    if item is not None:
                        yield item

    @staticmethod
    def _item(message: ServerEvent) -> Item | None:
        try:
            document: Any = orjson.loads(message.data)
        except orjson.JSONDecodeError:
            document = None
        # An event's data is its envelope. Tell it apart by shape, not only by name: a publisher
        # may use a type that looks like a control event's name.
        if isinstance(document, dict) and "specversion" in document:
            return decode_event(document)
        if message.event == SUBSCRIBED:
            if not isinstance(document, dict) or not isinstance(document.get("cursor"), str):
                raise ProtocolError("protocol", f"malformed {SUBSCRIBED} event: {message.data}")
            reason = document.get("reason")
            return Position(
                document["cursor"],
                bool(document.get("recovered", True)),
                None if reason is None else str(reason),
            )
        if message.event == LAGGED:
            log.info("SSE stream lagged and is closing; reconnecting: %s", message.data)
        return None  # control events this client does not know: ignore, as EventSource would
