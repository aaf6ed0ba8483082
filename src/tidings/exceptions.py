"""The errors tidings raises on purpose; each knows how it is told to a client.

The tree::

    TidingsError                    base; ``status`` (HTTP) and ``code`` (machine-readable name)
    ├── BadRequest                  400 — the request is malformed
    │   ├── InvalidChannel          a channel name breaks the naming rules
    │   ├── InvalidPattern          a subscription pattern breaks the naming rules
    │   ├── InvalidCursor           a cursor is not ``epoch:sequence``
    │   ├── InvalidEvent            event type, content type or data is unacceptable
    │   └── InvalidParameter        an unknown, missing or out-of-range query parameter
    ├── PayloadTooLarge             413 — a body over the configured limit
    ├── Unavailable                 503 — the hub is shutting down or not started
    └── ConfigError                 configuration is invalid (the CLI turns it into exit code 2)

Transports map ``status``/``code`` to their own vocabulary (HTTP status + JSON body,
WebSocket close code, gRPC status); the message is always meant for a human.
"""

from __future__ import annotations


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


class PayloadTooLarge(TidingsError):
    status = 413
    code = "payload_too_large"


class Unavailable(TidingsError):
    status = 503
    code = "unavailable"


class ConfigError(TidingsError):
    code = "config"
