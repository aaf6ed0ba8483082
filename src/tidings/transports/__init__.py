"""Transports: each module turns one protocol into calls on the hub, and nothing more.

Shared here: the per-server context every HTTP route reads, the parsing of the query
parameters all subscribe endpoints share (``channel`` repeatable, ``since``, ``limit``, ``wait``),
so one URL shape serves every subscribe endpoint and every one rejects input the same way, and
``admit``, the gate (rate limits and authentication) every publish and subscribe passes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.datastructures import QueryParams
from starlette.requests import HTTPConnection, Request

from ..auth import Authenticator, Grant, Unauthorized
from ..config import Settings
from ..events import Cursor, Pattern, parse_patterns
from ..exceptions import InvalidCursor, InvalidParameter
from ..hub import Hub
from ..limits import Action, Limits

if TYPE_CHECKING:
    from ..leases import Leases
    from ..relays import Relay
    from ..webhooks.service import Webhooks
    from .sse import Streams


@dataclass(frozen=True, slots=True)
class Context:
    hub: Hub
    settings: Settings
    streams: Streams
    auth: Authenticator
    limits: Limits
    webhooks: Webhooks | None = None  # None: webhooks.enabled is off
    relays: tuple[Relay, ...] = ()  # MQTT, AMQP: the ones configured
    leases: Leases | None = None  # in a cluster: which durable consumers run on this node


def context(request: Request) -> Context:
    ctx: Context = request.app.state.tidings
    return ctx


class Query:
    """The query string of one request, checked against the parameters its endpoint accepts."""

    def __init__(self, request: HTTPConnection, allowed: tuple[str, ...]) -> None:
        self.params: QueryParams = request.query_params
        unknown = sorted(set(self.params.keys()) - set(allowed))
        if unknown:
            raise InvalidParameter(
                f"unknown query parameter {unknown[0]!r}; this endpoint accepts: "
                + ", ".join(allowed)
            )

    def one(self, name: str) -> str | None:
        values = self.params.getlist(name)
        if len(values) > 1:
            raise InvalidParameter(f"query parameter {name!r} was given {len(values)} times")
        return values[0] if values else None

    def patterns(self, limit: int) -> tuple[Pattern, ...]:
        values = self.params.getlist("channel")
        if not values:
            raise InvalidParameter(
                "query parameter 'channel' is required (a channel or pattern; repeat it for more)"
            )
        if len(values) > limit:
            raise InvalidParameter(
                f"at most {limit} channel parameters (limits.max_channels), not {len(values)}"
            )
        return parse_patterns(values)

    def cursor(self, name: str = "since") -> Cursor | None:
        value = self.one(name)
        return None if value is None else Cursor.parse(value)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.one(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise InvalidParameter(
                f"query parameter {name!r} must be an integer, not {value[:40]!r}"
            ) from None
        if not low <= number <= high:
            raise InvalidParameter(
                f"query parameter {name!r} must be between {low} and {high}, not {number}"
            )
        return number

    def seconds(self, name: str, default: float, high: float) -> float:
        value = self.one(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise InvalidParameter(
                f"query parameter {name!r} must be a number of seconds, not {value[:40]!r}"
            ) from None
        if not math.isfinite(number) or not 0 <= number <= high:
            raise InvalidParameter(
                f"query parameter {name!r} must be between 0 and {high:g} seconds, not {value[:40]}"
            )
        return number


def resume_cursor(query: Query, header: str | None) -> Cursor | None:
    """A resume cursor from a header (``Last-Event-ID``, ``If-None-Match``) or ``since``.

    The header wins: a browser reconnecting an ``EventSource`` sends ``Last-Event-ID`` with the
    URL it first used, whose ``since`` is older.
    """
    since = query.cursor()
    if header is None or not header.strip():
        return since
    try:
        return Cursor.parse(header.strip())
    except InvalidCursor as exc:
        raise InvalidCursor(f"{exc.detail} (from a request header)") from None


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750 §2.1), if any."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            f"Authorization header must be 'Bearer <token>', not a {scheme[:20]!r} credential"
        )
    return token.strip()


def authenticate(request: Request, query: Query | None = None) -> Grant:
    """Who is asking. ``Authorization: Bearer`` everywhere; for GET endpoints (pass their
    ``query``) also the ``token`` query parameter and the auth cookie, which is all an
    ``EventSource`` or a plain link can send. Never cookies on POST: that would let any web page
    publish with a visitor's cookie (cross-site request forgery)."""
    ctx = context(request)
    return ctx.auth.authenticate(credential(request, query, ctx.settings.auth.cookie))


def credential(connection: HTTPConnection, query: Query | None, cookie: str) -> str | None:
    """The token a request brings: ``Authorization: Bearer``, else (when ``query`` is given)
    the ``token`` query parameter or the ``cookie``."""
    token = bearer(connection.headers.get("authorization"))
    if token is None and query is not None:
        token = query.one("token") or connection.cookies.get(cookie)
    return token


def gate(ctx: Context, action: Action, address: str, token: Callable[[], str | None]) -> Grant:
    """The gate of every publish and subscribe, on every transport: the client address's rate
    limit (before any work, so refused floods stay cheap), then the credential ``token()``
    reads, then its rate limit. Returns the grant; raises the TidingsError that refuses."""
    now = time.monotonic()
    ctx.limits.check_address(action, address, now)
    grant = ctx.auth.authenticate(token())
    if ctx.auth.enabled:  # with auth off every client is "anonymous": one shared key is no limit
        ctx.limits.check_credential(action, grant.subject, now)
    return grant


def admit(request: Request, action: Action, query: Query | None = None) -> tuple[Grant, str]:
    """``gate`` for an HTTP request; returns the grant and the client address."""
    ctx = context(request)
    address = ctx.limits.address(request.scope)
    cookie = ctx.settings.auth.cookie
    return gate(ctx, action, address, lambda: credential(request, query, cookie)), address
