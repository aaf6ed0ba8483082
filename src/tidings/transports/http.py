"""The HTTP API: publish (one or a batch), history, health, metrics, and the JSON error shape.

Every error a client can cause answers ``{"error": <code>, "detail": <what was wrong>}`` with a
4xx status; ``exception_handlers`` installs that for tidings' own errors and Starlette's.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ..auth import Unauthorized
from ..events import Draft, Pattern, is_json_type, make_draft
from ..exceptions import BadRequest, InvalidEvent, PayloadTooLarge, TidingsError, TooManyRequests
from ..hub import Page
from . import Query, admit, authenticate, context, resume_cursor

JSON = "application/json"


def json_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(body, status_code=status, media_type=JSON, headers=headers)


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> Response:
    return json_response(orjson.dumps({"error": code, "detail": detail}), status, headers)


async def tidings_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TidingsError)
    headers = None
    if isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": exc.challenge}
    elif isinstance(exc, TooManyRequests):
        headers = {"Retry-After": exc.retry_after_header}
    return error_response(exc.status, exc.code, exc.detail, headers)


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
    return error_response(500, "internal", "internal server error; see the server log")


exception_handlers: dict[Any, Any] = {
    TidingsError: tidings_error,
    HTTPException: http_error,
    Exception: server_error,
}


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"{what} is {declared} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"{what} is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _content_type(request: Request) -> str | None:
    value = request.headers.get("content-type")
    # curl -d sends form encoding by default; nobody publishes real forms to a channel, so treat
    # it like no content type and recognise JSON or text from the body.
    if value is None or value.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        return None
    return value


async def publish(request: Request) -> Response:
    """POST /channels/{channel}: the body is the event's data."""
    ctx = context(request)
    grant, _ = admit(request, "publish")
    query = Query(request, ("type",))
    channel = request.path_params["channel"]
    data = await read_body(request, ctx.settings.http.max_event_bytes, "event data")
    event_type = query.one("type") or request.headers.get("ce-type")
    draft = make_draft(
        channel,
        data,
        content_type=_content_type(request),
        type=event_type,
        idempotency_key=request.headers.get("idempotency-key"),
    )
    grant.check_publish(draft.channel)
    [appended] = await ctx.hub.publish([draft])
    headers = {} if appended.created else {"Idempotent-Replayed": "true"}
    return json_response(appended.event.json(), 201, headers)


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
