"""The HTTP API: publish (one or a batch), history, health, metrics, and the JSON error shape.

Every error a client can cause answers ``{"error": <code>, "detail": <what was wrong>}`` with a
4xx status; ``exception_handlers`` installs that for tidings' own errors and Starlette's.

The hottest request, ``POST /channels/{channel}``, is answered below Starlette when it needs
nothing Starlette's middleware does (``publish_direct``): same checks, same answers.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..auth import Grant, Unauthorized
from ..events import Draft, Pattern, is_json_type, make_draft
from ..exceptions import BadRequest, InvalidEvent, PayloadTooLarge, TidingsError, TooManyRequests
from ..hub import Page
from . import Context, Query, admit, authenticate, bearer, context, gate, resume_cursor

JSON = "application/json"
JSON_BYTES = JSON.encode()
INTERNAL = {"error": "internal", "detail": "internal server error; see the server log"}


def json_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(body, status_code=status, media_type=JSON, headers=headers)


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> Response:
    return json_response(orjson.dumps({"error": code, "detail": detail}), status, headers)


def error_headers(exc: TidingsError) -> dict[str, str] | None:
    """The headers an error's answer carries besides the JSON body."""
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": exc.challenge}
    if isinstance(exc, TooManyRequests):
        return {"Retry-After": exc.retry_after_header}
    return None


async def tidings_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TidingsError)
    return error_response(exc.status, exc.code, exc.detail, error_headers(exc))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if exc.status_code == 404:
        detail = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, detail, dict(exc.headers or {}))


async def server_error(request: Request, exc: Exception) -> Response:
    return error_response(500, INTERNAL["error"], INTERNAL["detail"])


exception_handlers: dict[Any, Any] = {
    TidingsError: tidings_error,
    HTTPException: http_error,
    Exception: server_error,
}


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    return await receive_body(request.receive, request.headers.get("content-length"), limit, what)


async def receive_body(receive: Receive, declared: str | None, limit: int, what: str) -> bytes:
    """``read_body`` from the ASGI ``receive`` and the ``content-length`` header."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"{what} is {declared} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"{what} is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _content_type(value: str | None) -> str | None:
    # curl -d sends form encoding by default; nobody publishes real forms to a channel, so treat
    # it like no content type and recognise JSON or text from the body.
    if value is None or value.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        return None
    return value


async def publish(request: Request) -> Response:
    """POST /channels/{channel}: the body is the event's data."""
    ctx = context(request)
    grant, _ = admit(request, "publish")
    event_type = Query(request, ("type",)).one("type")
    headers = request.headers
    data = await read_body(request, ctx.settings.http.max_event_bytes, "event data")
    envelope, replayed = await append_one(
        ctx, grant, request.path_params["channel"], data, event_type, headers.get
    )
    return json_response(envelope, 201, REPLAYED if replayed else None)


REPLAYED = {"Idempotent-Replayed": "true"}


async def append_one(
    ctx: Context,
    grant: Grant,
    channel: str,
    data: bytes,
    event_type: str | None,
    header: Callable[[str], str | None],
) -> tuple[bytes, bool]:
    """The publish of ``POST /channels/{channel}`` once admitted and read: the envelope, and
    whether it was an idempotent replay. ``header`` reads a request header by name."""
    draft = make_draft(
        channel,
        data,
        content_type=_content_type(header("content-type")),
        type=event_type or header("ce-type"),
        idempotency_key=header("idempotency-key"),
    )
    grant.check_publish(draft.channel)
    [appended] = await ctx.hub.publish([draft])
    return appended.event.json(), not appended.created


# -- POST /channels/{channel} below Starlette --------------------------------------------------

CHANNELS = "/channels/"
VARY = (b"vary", b"Origin")  # what Starlette's CORSMiddleware adds to every answer


def direct_publish(
    scope: Scope,
) -> dict[bytes, bytes] | None:
    """The request's headers (the first of each name, as Starlette reads them) if ``scope`` is
    a publish ``publish_direct`` answers as ``publish`` would: ``POST /channels/{channel}``
    with no query string and no ``Origin`` header, so no CORS and no query check; else None."""
    if scope["type"] != "http" or scope["method"] != "POST" or scope.get("query_string"):
        return None
    path: str = scope["path"]
    if not path.startswith(CHANNELS) or "\n" in path:  # the route's regex: "." stops at "\n"
        return None
    headers = {name: value for name, value in reversed(scope["headers"])}
    return None if b"origin" in headers else headers


async def publish_direct(
    ctx: Context, headers: dict[bytes, bytes], scope: Scope, receive: Receive, send: Send
) -> None:
    """``publish`` without Starlette's routing, middleware, Request and Response, which cost
    about a fifth of a publish (benchmarks/README.md): the same checks in the same order, the
    same answers byte for byte, errors included. The server calls it when ``direct_publish``
    says the request needs nothing else (``server.Tidings``)."""

    def header(name: str) -> str | None:
        value = headers.get(name.encode("latin-1"))
        return None if value is None else value.decode("latin-1")

    extra: dict[str, str] | None = None
    try:
        address = ctx.limits.address(scope)
        grant = gate(ctx, "publish", address, lambda: bearer(header("authorization")))
        limit = ctx.settings.http.max_event_bytes
        data = await receive_body(receive, header("content-length"), limit, "event data")
        channel = scope["path"][len(CHANNELS) :]
        body, replayed = await append_one(ctx, grant, channel, data, None, header)
        status = 201
        extra = REPLAYED if replayed else None
    except TidingsError as exc:
        status, extra = exc.status, error_headers(exc)
        body = orjson.dumps({"error": exc.code, "detail": exc.detail})
    except Exception:
        # As Starlette's ServerErrorMiddleware: answer 500, then let the server log it.
        status, body = 500, orjson.dumps(INTERNAL)
        await _answer(send, status, body, None)
        raise
    await _answer(send, status, body, extra)


async def _answer(send: Send, status: int, body: bytes, extra: dict[str, str] | None) -> None:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (extra or {}).items()]
    raw += ((b"content-length", b"%d" % len(body)), (b"content-type", JSON_BYTES), VARY)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def json_draft(item: Any, where: str, raw: bytes | None = None) -> Draft:
    """The draft of one event given as JSON fields (``POST /publish``, WebSocket ``publish``);
    ``where`` names it in errors; ``raw`` is data that came outside the JSON (binary frame)."""
    if not isinstance(item, dict):
        raise InvalidEvent(f"{where} must be an object")
    known = {"channel", "type", "data", "data_base64", "datacontenttype", "idempotency_key"}
    unknown = sorted(set(item) - known)
    if unknown:
        raise InvalidEvent(
            f"{where} has unknown field {unknown[0]!r}; fields: {', '.join(sorted(known))}"
        )
    channel = item.get("channel")
    if not isinstance(channel, str):
        raise InvalidEvent(f"{where}.channel is required and must be a string")
    content_type = item.get("datacontenttype")
    if content_type is not None and not (isinstance(content_type, str) and content_type.strip()):
        raise InvalidEvent(f"{where}.datacontenttype must be a non-empty string, or left out")
    for name in ("type", "idempotency_key"):
        if item.get(name) is not None and not isinstance(item[name], str):
            raise InvalidEvent(f"{where}.{name} must be a string")
    if "data" in item and "data_base64" in item:
        raise InvalidEvent(f"{where} has both data and data_base64; send one")
    if raw is not None:
        data = raw
        content_type = content_type or "application/octet-stream"
    elif "data_base64" in item:
        if not isinstance(item["data_base64"], str):
            raise InvalidEvent(f"{where}.data_base64 must be a base64 string")
        try:
            data = base64.b64decode(item["data_base64"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidEvent(f"{where}.data_base64 is not valid base64") from None
        content_type = content_type or "application/octet-stream"
    else:
        value = item.get("data")
        if isinstance(value, str) and content_type is not None and not is_json_type(content_type):
            data = value.encode()
        else:
            data = orjson.dumps(value)
            content_type = content_type or JSON
    try:
        return make_draft(
            channel, data, content_type, item.get("type"), item.get("idempotency_key")
        )
    except BadRequest as exc:
        raise type(exc)(f"{where}: {exc.detail}") from None


async def publish_batch(request: Request) -> Response:
    """POST /publish: ``{"events": [...]}``, appended atomically in order."""
    ctx = context(request)
    grant, _ = admit(request, "publish")
    Query(request, ())
    limits = ctx.settings.http
    body = await read_body(request, limits.max_request_bytes, "request body")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("events"), list):
        raise InvalidEvent('request body must be {"events": [...]}')
    items = document["events"]
    if not 1 <= len(items) <= limits.max_batch:
        raise InvalidEvent(f"a batch holds 1 to {limits.max_batch} events, not {len(items)}")
    drafts = [json_draft(item, f"events[{i}]") for i, item in enumerate(items)]
    for i, draft in enumerate(drafts):
        if len(draft.data) > limits.max_event_bytes:
            raise PayloadTooLarge(
                f"events[{i}] data is {len(draft.data)} bytes; "
                f"the limit is {limits.max_event_bytes}"
            )
        grant.check_publish(draft.channel)
    appended = await ctx.hub.publish(drafts)
    body = b'{"events":[' + b",".join(a.event.json() for a in appended) + b"]}"
    return json_response(body, 201)


def page_body(page: Page) -> bytes:
    """The JSON page shared by history and polling; event envelopes are spliced in pre-encoded."""
    tail: dict[str, object] = {"cursor": page.cursor, "recovered": page.recovered}
    tail["more"] = page.more
    if page.reason:
        tail["reason"] = page.reason
    events = b",".join(e.json() for e in page.events)
    return b'{"events":[' + events + b"]," + orjson.dumps(tail)[1:]


async def history(request: Request) -> Response:
    """GET /history: events after ``since`` (default: the oldest retained), up to ``limit``."""
    ctx = context(request)
    query = Query(request, ("channel", "since", "limit", "token"))
    grant, _ = admit(request, "subscribe", query)
    patterns: tuple[Pattern, ...] = query.patterns(ctx.settings.limits.max_channels)
    grant.check_subscribe(patterns)
    limits = ctx.settings.http
    limit = query.integer("limit", limits.default_limit, 1, limits.max_limit)
    since = resume_cursor(query, None)
    page = await ctx.hub.history(patterns, since, limit, "http")
    body = page_body(page)
    return json_response(body, headers={"Cache-Control": "no-store"})


async def healthz(request: Request) -> Response:
    hub = context(request).hub
    head = await hub.log.head()
    body: dict[str, object] = {"status": "ok", "epoch": hub.log.epoch,
                               "cursor": f"{hub.log.epoch}:{head}",
                               "subscribers": hub.subscriber_count}  # fmt: skip
    relays = context(request).relays
    if relays:  # without "error": this route is public, and errors name hosts
        body["relays"] = {
            relay.name: {k: v for k, v in (await relay.status()).items() if k != "error"}
            for relay in relays
        }
    leases = context(request).leases
    if leases is not None:  # a cluster node: the durable consumers it runs now
        body["leases"] = leases.held()
    return json_response(orjson.dumps(body), headers={"Cache-Control": "no-store"})


async def metrics(request: Request) -> Response:
    authenticate(request, Query(request, ("token",))).check_admin()
    hub = context(request).hub
    stats = await hub.log.stats()
    m = hub.metrics
    m.log_events.set(stats.events)
    m.log_head.set(stats.head)
    if stats.bytes is not None:
        m.log_bytes.set(stats.bytes)
    webhooks = context(request).webhooks
    if webhooks is not None:
        await webhooks.refresh_metrics()
    for relay in context(request).relays:
        status = await relay.status()
        lag = status.get("lag")
        m.relay_lag.labels(relay.name).set(lag if isinstance(lag, float) else 0.0)
    return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
