"""The errors tidings raises on purpose; each knows how it is told to a client.

The tree::

    TidingsError                    base; ``status`` (HTTP) and ``code`` (machine-readable name)
    ├── BadRequest                  400 — the request is malformed
    │   ├── InvalidChannel          a channel name breaks the naming rules
    │   ├── InvalidPattern          a subscription pattern breaks the naming rules
    │   ├── InvalidCursor           a cursor is not ``epoch:sequence``
    │   ├── InvalidEvent            event type, content type or data is unacceptable
    │   ├── InvalidParameter        an unknown, missing or out-of-range query parameter
    │   └── InvalidMessage          a WebSocket message that is not a valid command; ``id`` is
    │                               the message's id when it could be read
    ├── Unauthorized                401 — no credential, or one that fails verification;
    │                               ``challenge`` is the ``WWW-Authenticate`` value (RFC 6750 §3)
    ├── Forbidden                   403 — a valid credential that does not grant the request
    ├── PayloadTooLarge             413 — a body over the configured limit
    ├── TooManyRequests             429 ``rate_limited`` — over a rate limit of ``[limits]``;
    │                               ``retry_after`` seconds (the ``Retry-After`` header)
    ├── TooManyConnections          429 ``too_many_connections`` — an address holds its limit
    │                               of open streams; 503 when the whole server holds its limit
    ├── DuplicateSubscription       409 — a WebSocket subscription id that is already open
    ├── NotSubscribed               404 — unsubscribing a WebSocket subscription not open
    ├── TooManySubscriptions        429 — a WebSocket connection holds its limit
    ├── Unavailable                 503 — the hub is shutting down or not started
    └── ConfigError                 configuration is invalid (the CLI turns it into exit code 2)

Transports map ``status``/``code`` to their own vocabulary (HTTP status + JSON body,
WebSocket close code, gRPC status); the message is always meant for a human.
"""

from __future__ import annotations

import math


class TidingsError(Exception):
    status: int = 500
    code: str = "internal"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(TidingsError):
    status = 400
    code = "bad_request"


class InvalidChannel(BadRequest):
    code = "invalid_channel"


class InvalidPattern(BadRequest):
    code = "invalid_pattern"


class InvalidCursor(BadRequest):
    code = "invalid_cursor"


class InvalidEvent(BadRequest):
    code = "invalid_event"


class InvalidParameter(BadRequest):
    code = "invalid_parameter"


class InvalidMessage(BadRequest):
    code = "invalid_message"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.id: str | int | None = None


def bearer_challenge(error: str | None = None, description: str | None = None) -> str:
    """A ``WWW-Authenticate: Bearer`` value (RFC 6750 §3).

    Without ``error`` only the realm is named, as §3.1 asks for a request with no credential.
    The description is cut to the characters §3 allows in ``error_description`` (no quote,
    no backslash, no control character), so text quoted from a token can't break the header.
    """
    challenge = 'Bearer realm="tidings"'
    if error is not None:
        challenge += f', error="{error}"'
        if description:
            safe = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in description)
            challenge += f', error_description="{safe[:300]}"'
    return challenge


class Unauthorized(TidingsError):
    status = 401
    code = "unauthorized"

    def __init__(self, detail: str, *, error: str | None = "invalid_token") -> None:
        super().__init__(detail)
        self.error = error
        self.challenge = bearer_challenge(error, detail)


class Forbidden(TidingsError):
    status = 403
    code = "forbidden"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        # RFC 6750 §3.1: a valid token without the needed grant is "insufficient_scope".
        self.challenge = bearer_challenge("insufficient_scope", detail)


class PayloadTooLarge(TidingsError):
    status = 413
    code = "payload_too_large"


class TooManyRequests(TidingsError):
    status = 429
    code = "rate_limited"

    def __init__(self, detail: str, *, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = retry_after

    @property
    def retry_after_header(self) -> str:
        """``Retry-After`` in whole seconds (RFC 9110 §10.2.3), at least 1."""
        return str(max(1, math.ceil(self.retry_after)))


class TooManyConnections(TidingsError):
    status = 429
    code = "too_many_connections"

    def __init__(self, detail: str, *, total: bool = False) -> None:
        super().__init__(detail)
        if total:  # the server is full, not this client's fault: RFC 9110 §15.6.4
            self.status = 503


class NotFound(TidingsError):
    status = 404
    code = "not_found"


class Conflict(TidingsError):
    """The request is valid but the resource's state does not allow it now."""

    status = 409
    code = "conflict"


class DuplicateSubscription(TidingsError):
    status = 409
    code = "duplicate_subscription"


class NotSubscribed(TidingsError):
    status = 404
    code = "not_subscribed"


class TooManySubscriptions(TidingsError):
    status = 429
    code = "too_many_subscriptions"


class Unavailable(TidingsError):
    status = 503
    code = "unavailable"


class ConfigError(TidingsError):
    code = "config"
