"""Browser safety: the Origin allow-list, and CORS configured from the same list.

Rules:
- A request that carries an ``Origin`` header (every cross-origin request a browser makes, and
  every ``EventSource`` or ``fetch`` to tidings, which serves no pages itself) is refused with
  403 unless that origin is on ``http.origins``. Requests without ``Origin`` (curl, services)
  are not concerned.
- ``Origin: null`` (sandboxed frames, ``file:`` pages, some redirects) is refused unless
  ``"null"`` is on the list; ``"*"`` allows every origin and is for development only.
- Allowed origins get CORS headers (Starlette's ``CORSMiddleware``), so their pages can read
  the responses, send ``Authorization`` and read ``ETag``.

Without the check, any web page a developer opens could publish to or read from a hub on
localhost (CSRF, DNS rebinding); a simple cross-origin POST is sent without a preflight.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from ..exceptions import ConfigError
from .http import error_response

HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "ce-type", "Last-Event-ID",
           "If-None-Match")  # fmt: skip
EXPOSED = ("ETag", "Idempotent-Replayed", "WWW-Authenticate", "Retry-After")


class OriginPolicy:
    """The allow-list of ``http.origins``: which browser origins may call tidings."""

    def __init__(self, origins: Collection[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(origins)

    def refusal(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """Why a request with these (lower-case) headers is refused, or None if it is not."""
        if self.any:
            return None
        origin = next((v for k, v in headers if k == b"origin"), None)
        if origin is None or origin.decode("latin-1") in self.origins:
            return None
        text = origin.decode("latin-1")[:100]
        if text == "null":
            return (
                "origin 'null' (a sandboxed or file: page) is not allowed unless "
                'http.origins includes "null"'
            )
        return f"origin {text!r} is not allowed: add it to http.origins (see docs/security.md)"


class OriginGuard:
    """Refuses HTTP requests from browser origins that are not on the allow-list. (The
    WebSocket handshake does not pass through ASGI: ``transports.websocket`` asks the policy.)"""

    def __init__(self, app: ASGIApp, policy: OriginPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            detail = self.policy.refusal(scope["headers"])
            if detail is not None:
                response = error_response(403, "origin_not_allowed", detail)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_ORIGIN = re.compile(r"https?://[^/\s?#]+")  # RFC 6454 §6.2 serialisation: scheme://host[:port]


def check(origins: Collection[str]) -> OriginPolicy:
    """The policy for ``http.origins``, or ConfigError naming an entry that is not an origin."""
    for origin in origins:
        if origin not in ("*", "null") and not _ORIGIN.fullmatch(origin):
            raise ConfigError(
                f"http.origins: {origin!r} is not an origin; write scheme://host[:port] "
                'with no path or trailing slash, "null" or "*"'
            )
    return OriginPolicy(origins)


def guard(app: ASGIApp, policy: OriginPolicy) -> ASGIApp:
    """``app`` behind CORS (outermost, it answers preflights) and the Origin allow-list."""
    origins = sorted(policy.origins)
    return CORSMiddleware(
        OriginGuard(app, policy),
        allow_origins=list(origins),
        allow_methods=("GET", "POST"),
        allow_headers=HEADERS,
        allow_credentials="*" not in origins,  # cookies only with an explicit list
        expose_headers=EXPOSED,
        max_age=600,
    )
