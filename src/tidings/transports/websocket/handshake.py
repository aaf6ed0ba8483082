"""The WebSocket handshake: what refuses it with an HTTP error, and what it admits.

Refused with an HTTP status and the JSON error body of the rest of the API (the request is
wrong before any WebSocket exists): another path, a malformed upgrade, an Origin not on the
list, bad query parameters, a server shutting down, a rate or connection limit. The credential
is only read here; it is checked after the upgrade, where a browser can see why it failed
(close code 4401), by ``Connection``.
"""

from __future__ import annotations

import http
import time
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import HTTPConnection
from starlette.responses import Response
from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.http11 import Response as HandshakeResponse
from websockets.server import ServerProtocol

from ...exceptions import (
    Forbidden,
    InvalidParameter,
    TidingsError,
    TooManyRequests,
    Unavailable,
)
from ...limits import Slot
from .. import Context, Query, credential
from ..http import error_response
from ..origins import OriginPolicy

PATH = "/ws"
QUERY = ("token", "channel", "since")
URL_SUBSCRIPTION = "url"  # the id of the subscription opened by ?channel=


class OriginNotAllowed(Forbidden):
    code = "origin_not_allowed"


async def upgrade_required(request: HTTPConnection) -> Response:
    """``GET /ws`` without ``Upgrade: websocket``: say what the endpoint is (RFC 9110 §15.5.22)."""
    detail = f"{PATH} is a WebSocket endpoint: connect with a WebSocket client (docs/websocket.md)"
    return error_response(
        426, "upgrade_required", detail, {"Upgrade": "websocket", "Connection": "Upgrade"}
    )


@dataclass(frozen=True, slots=True)
class Admission:
    """An upgrade that passed: the 101 to send and what the connection starts with."""

    response: HandshakeResponse
    address: str
    slot: Slot  # the connection's place in the open-stream count; it releases it
    token: str | None  # the credential given with the handshake, not yet verified
    subscribe: dict[str, Any] | None  # the subscribe message the URL asks for


def admit(
    ctx: Context, origins: OriginPolicy, ws: ServerProtocol, request: Request, peer: Any
) -> Admission | HandshakeResponse:
    """Check one upgrade request; an ``Admission``, or the refusal to send instead."""
    path, _, query_string = request.path.partition("?")
    if path != PATH:
        detail = f"no such endpoint: WebSocket {path[:100]}; the WebSocket endpoint is {PATH}"
        return refusal(404, "not_found", detail)
    response = ws.accept(request)  # the library checks the upgrade itself (RFC 6455 §4.2.1)
    if response.status_code != 101:
        detail = (response.body or b"").decode(errors="replace").strip()
        kept = [(k, v) for k, v in response.headers.raw_items()
                if k.lower() in ("upgrade", "sec-websocket-version", "allow")]  # fmt: skip
        return refusal(response.status_code, "bad_request", detail, kept)
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
               for k, v in request.headers.raw_items()]  # fmt: skip
    scope = {
        "type": "websocket",
        "path": path,
        "query_string": query_string.encode("latin-1"),
        "headers": headers,
        "client": tuple(peer[:2]) if isinstance(peer, tuple) else None,
    }
    try:
        refused = origins.refusal(headers)
        if refused is not None:
            raise OriginNotAllowed(refused)
        connection = HTTPConnection(scope)
        query = Query(connection, QUERY)
        subscribe = None
        if query.params.getlist("channel"):
            patterns = query.patterns(ctx.settings.limits.max_channels)
            since = query.cursor()
            subscribe = {"op": "subscribe", "id": URL_SUBSCRIPTION,
                         "channels": [p.text for p in patterns],
                         "since": None if since is None else str(since)}  # fmt: skip
        elif query.one("since") is not None:
            raise InvalidParameter("query parameter 'since' needs at least one 'channel'")
        if not ctx.hub.running:
            raise Unavailable("the server is shutting down; connect again in a moment")
        address = ctx.limits.address(scope)
        ctx.limits.check_address("subscribe", address, time.monotonic())
        slot = ctx.limits.streams.acquire(address)
    except TidingsError as exc:
        extra = []
        if isinstance(exc, TooManyRequests):
            extra.append(("Retry-After", exc.retry_after_header))
        return refusal(exc.status, exc.code, exc.detail, extra)
    token = credential(connection, query, ctx.settings.auth.cookie)
    return Admission(response, address, slot, token, subscribe)


def refusal(
    status: int, code: str, detail: str, extra: list[tuple[str, str]] | None = None
) -> HandshakeResponse:
    """An HTTP error answer to an upgrade request, with the API's JSON error body."""
    body = orjson.dumps({"error": code, "detail": detail})
    headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            *(extra or []),
        ]
    )
    return HandshakeResponse(status, http.HTTPStatus(status).phrase, headers, body)
