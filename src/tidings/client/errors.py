"""The errors the client raises; each carries the server's machine-readable ``code``.

The tree::

    TidingsClientError          base; ``code``, ``detail`` and ``status`` (None without a reply)
    ├── RequestRejected         4xx — the server refused the request; retrying will not help
    ├── ServerUnavailable       5xx or no connection — may work later (``subscribe`` retries it)
    └── ProtocolError           the server answered something this client cannot read

A ``subscribe`` iterator raises only ``RequestRejected`` and ``ProtocolError``; it rides out
``ServerUnavailable`` and dropped connections by reconnecting. ``publish`` raises all of them:
whether to repeat a publish is the caller's decision (use an idempotency key to make it safe).
"""

from __future__ import annotations

import httpx
import orjson


class TidingsClientError(Exception):
    def __init__(self, code: str, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.detail!r}, status={self.status})"


class RequestRejected(TidingsClientError):
    pass


class ServerUnavailable(TidingsClientError):
    pass


class ProtocolError(TidingsClientError):
    pass


# Retrying these is pointless: the same request gets the same answer. 408 and 429 are not here.
def _is_rejection(status: int) -> bool:
    return 400 <= status < 500 and status not in (408, 429)


def error_for(status: int, body: bytes) -> TidingsClientError:
    """The error for a non-2xx reply, from the ``{"error", "detail"}`` body when it has one."""
    code, detail = "http_error", f"HTTP {status}"
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", errors="replace").strip()
        if text:
            detail = f"HTTP {status}: {text[:200]}"
    else:
        if isinstance(document, dict):
            code = str(document.get("error", code))
            detail = str(document.get("detail", detail))
    kind = RequestRejected if _is_rejection(status) else ServerUnavailable
    return kind(code, detail, status)


async def check(response: httpx.Response) -> None:
    """Raise the matching error unless ``response`` is a success (works on streamed replies)."""
    if response.is_success or response.status_code == 304:
        return
    raise error_for(response.status_code, await response.aread())


def unreachable(url: object, exc: httpx.TransportError) -> ServerUnavailable:
    reason = str(exc) or type(exc).__name__
    return ServerUnavailable("unreachable", f"cannot reach {url}: {reason}")
