"""The webhook admin API (``/webhooks``): endpoints, secrets, attempts, failed events, replay.

Every route needs an admin grant. Bodies are JSON objects; an unknown field, a wrong type or a
value out of range is a 400 naming the field. A secret appears in a response only when it is
made (create, rotate): it is never readable again.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ..events import Cursor, format_time, parse_patterns
from ..exceptions import BadRequest, Unavailable
from ..webhooks.delivery import Endpoint, Secret
from ..webhooks.service import Replay, Selection, Webhooks
from ..webhooks.signing import parse_secret
from ..webhooks.store import StoredAttempt
from . import Query, authenticate, context
from .http import json_response, read_body

MAX_BODY = 64 * 1024
MAX_HEADERS = 32
NO_STORE = {"Cache-Control": "no-store"}
# Headers a custom header may not set: they are the request's own, or the signature's.
RESERVED_HEADERS = {"host", "content-type", "content-length", "transfer-encoding", "connection",
                    "webhook-id", "webhook-timestamp", "webhook-signature", "user-agent",
                    "accept-encoding"}  # fmt: skip


def _service(request: Request, query: tuple[str, ...] = ()) -> tuple[Webhooks, Query]:
    checked = Query(request, query)
    authenticate(request).check_admin()
    webhooks = context(request).webhooks
    if webhooks is None:
        raise Unavailable("webhooks are off (webhooks.enabled = false)")
    return webhooks, checked


def _time(t: float | None) -> str | None:
    return None if t is None else format_time(t)


async def view(webhooks: Webhooks, endpoint: Endpoint) -> dict[str, Any]:
    health = endpoint.health
    cursor = await webhooks.cursor_of(endpoint.id)
    now = webhooks.clock()
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "channels": list(endpoint.channels),
        "types": list(endpoint.types),
        "description": endpoint.description,
        "headers": dict(endpoint.headers),
        "enabled": endpoint.enabled,
        "health": health.health.value,
        "health_reason": health.reason,
        "failing_since": _time(health.failing_since),
        "rate_limit": endpoint.rate_limit,
        "concurrency": endpoint.concurrency,
        "strict_order": endpoint.strict_order,
        "timeout": endpoint.timeout,
        "secrets": [
            {"created": _time(s.created), "expires": _time(s.expires)}
            for s in endpoint.secrets
            if s.live(now)
        ],
        "cursor": None if cursor is None else f"{webhooks.log.epoch}:{cursor}",
        "created": _time(endpoint.created),
        "updated": _time(endpoint.updated),
    }


def _answer(body: Any, status: int = 200) -> Response:
    return json_response(orjson.dumps(body), status, NO_STORE)


async def _object(request: Request, allowed: set[str]) -> dict[str, Any]:
    body = await read_body(request, MAX_BODY, "request body")
    try:
        spec: Any = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise BadRequest("request body must be a JSON object")
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; fields: {', '.join(sorted(allowed))}")
    return spec


def _number(spec: dict[str, Any], name: str, low: float, high: float) -> float:
    value = spec[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a number, not {value!r}")
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}, not {value!r}")
    return float(value)


def _strings(spec: dict[str, Any], name: str) -> tuple[str, ...]:
    value = spec[name]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BadRequest(f"{name} must be a list of non-empty strings")
    return tuple(dict.fromkeys(value))


ENDPOINT_FIELDS = {"url", "channels", "types", "description", "headers", "rate_limit",
                   "concurrency", "strict_order", "timeout", "enabled"}  # fmt: skip


def _changes(spec: dict[str, Any]) -> dict[str, Any]:
    """Endpoint fields from a create or update body, checked."""
    out: dict[str, Any] = {}
    if "url" in spec:
        if not isinstance(spec["url"], str) or len(spec["url"]) > 2048:
            raise BadRequest("url must be a string of at most 2048 characters")
        out["url"] = spec["url"]
    if "channels" in spec:
        channels = _strings(spec, "channels")
        if not channels or len(channels) > 64:
            raise BadRequest("channels must list 1 to 64 channels or patterns")
        parse_patterns(channels)  # raises InvalidPattern naming the bad one
        out["channels"] = channels
    if "types" in spec:
        out["types"] = _strings(spec, "types")
    if "description" in spec:
        if not isinstance(spec["description"], str) or len(spec["description"]) > 1000:
            raise BadRequest("description must be a string of at most 1000 characters")
        out["description"] = spec["description"]
    if "headers" in spec:
        out["headers"] = _headers(spec["headers"])
    if "rate_limit" in spec:
        out["rate_limit"] = _number(spec, "rate_limit", 0, 100_000)
    if "concurrency" in spec:
        out["concurrency"] = int(_number(spec, "concurrency", 1, 256))
        if spec["concurrency"] != out["concurrency"]:
            raise BadRequest("concurrency must be a whole number")
    if "timeout" in spec:
        out["timeout"] = _number(spec, "timeout", 0.1, 300)
    for flag in ("strict_order", "enabled"):
        if flag in spec:
            if not isinstance(spec[flag], bool):
                raise BadRequest(f"{flag} must be true or false")
            out[flag] = spec[flag]
    return out


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or len(value) > MAX_HEADERS:
        raise BadRequest(f"headers must be an object of at most {MAX_HEADERS} name: value pairs")
    out = []
    for name, text in value.items():
        if not isinstance(text, str) or not name.isascii() or not name.replace("-", "").isalnum():
            raise BadRequest(f"header {name[:40]!r} must be a token name with a string value")
        if name.lower() in RESERVED_HEADERS:
            raise BadRequest(f"header {name!r} is set by tidings itself and cannot be overridden")
        if not all(" " <= c <= "~" or c == "\t" for c in text) or len(text) > 4096:
            raise BadRequest(
                f"header {name!r} must have a value of printable ASCII, at most 4096 characters"
            )
        out.append((name, text))
    return tuple(out)


async def list_endpoints(request: Request) -> Response:
    webhooks, _ = _service(request)
    return _answer({"endpoints": [await view(webhooks, e) for e in webhooks.endpoints()]})


async def create_endpoint(request: Request) -> Response:
    webhooks, _ = _service(request)
    spec = await _object(request, ENDPOINT_FIELDS)
    for required in ("url", "channels"):
        if required not in spec:
            raise BadRequest(f"field {required!r} is required")
    fields = _changes(spec)
    enabled = fields.pop("enabled", True)
    fields.setdefault("concurrency", webhooks.settings.concurrency)
    fields.setdefault("timeout", float(webhooks.settings.timeout))
    draft = Endpoint(id="", secrets=(Secret("", 0.0),), **fields)
    endpoint, secret = await webhooks.create(draft)
    if not enabled:
        endpoint = await webhooks.update(endpoint.id, {"enabled": False})
    return _answer({**await view(webhooks, endpoint), "secret": secret}, 201)


async def get_endpoint(request: Request) -> Response:
    webhooks, _ = _service(request)
    endpoint = webhooks.get(request.path_params["id"])
    replays = [r.view() for r in webhooks.replays(endpoint.id)]
    return _answer({**await view(webhooks, endpoint), "replays": replays})


async def update_endpoint(request: Request) -> Response:
    webhooks, _ = _service(request)
    id = request.path_params["id"]
    webhooks.get(id)
    changes = _changes(await _object(request, ENDPOINT_FIELDS))
    return _answer(await view(webhooks, await webhooks.update(id, changes)))


async def delete_endpoint(request: Request) -> Response:
    webhooks, _ = _service(request)
    id = request.path_params["id"]
    shown = await view(webhooks, webhooks.get(id))  # as it was: gone once deleted
    await webhooks.delete(id)
    return _answer(shown)


async def rotate_secret(request: Request) -> Response:
    webhooks, _ = _service(request)
    id = request.path_params["id"]
    webhooks.get(id)
    spec = await _object(request, {"grace", "secret"})
    grace = float(webhooks.settings.secret_grace)
    if "grace" in spec:
        grace = _number(spec, "grace", 0, 30 * 86400)
    secret = spec.get("secret")
    if secret is not None:
        if not isinstance(secret, str):
            raise BadRequest("secret must be a string (whsec_ + base64)")
        parse_secret(secret)  # raises naming what is wrong with it
    endpoint, made = await webhooks.rotate(id, grace, secret)
    return _answer({**await view(webhooks, endpoint), "secret": made})


def _attempt(webhooks: Webhooks, attempt: StoredAttempt) -> dict[str, Any]:
    return {
        "id": attempt.id,
        "event": f"{webhooks.log.epoch}:{attempt.seq}",
        "number": attempt.number,
        "time": format_time(attempt.time),
        "duration": round(attempt.duration, 6),
        "status": attempt.status,
        "error": attempt.error,
        "response": attempt.response.decode("utf-8", "replace"),
        "outcome": attempt.outcome,
        "reason": attempt.reason,
        "trigger": attempt.trigger,
    }


async def list_attempts(request: Request) -> Response:
    webhooks, query = _service(request, ("event", "limit", "before"))
    limit = query.integer("limit", 100, 1, 1000)
    before = query.integer("before", 0, 1, 2**62) or None
    found = await webhooks.attempts(request.path_params["id"], query.cursor("event"), before, limit)
    following = found[-1].id if len(found) == limit else None
    return _answer({"attempts": [_attempt(webhooks, a) for a in found], "next": following})


async def list_failed(request: Request) -> Response:
    webhooks, query = _service(request, ("after", "limit"))
    limit = query.integer("limit", 100, 1, 1000)
    found = await webhooks.failed(request.path_params["id"], query.cursor("after"), limit)
    epoch = webhooks.log.epoch
    marks = [
        {"event": f"{epoch}:{f.seq}", "time": format_time(f.time), "reason": f.reason}
        for f in found
    ]
    following = marks[-1]["event"] if len(found) == limit else None
    return _answer({"failed": marks, "next": following})


def _when(spec: dict[str, Any], name: str) -> float | None:
    value = spec.get(name)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            if value.replace(".", "", 1).isdigit():
                return float(value)
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise BadRequest(f"{name} must be unix seconds or an RFC 3339 time, not {value!r}")


def _cursor(spec: dict[str, Any], name: str) -> Cursor | None:
    value = spec.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a cursor string, not {value!r}")
    return Cursor.parse(value)


async def replay(request: Request) -> Response:
    webhooks, _ = _service(request)
    id = request.path_params["id"]
    webhooks.get(id)
    fields = {"event", "since", "until", "from", "to", "failed_only", "dry_run", "rate"}
    spec = await _object(request, fields)
    event, since, until = (_cursor(spec, n) for n in ("event", "since", "until"))
    start, end = _when(spec, "from"), _when(spec, "to")
    if event is not None and (since or until or start is not None or end is not None):
        raise BadRequest("give either event, or a range (since, until, from, to), not both")
    if event is None and not (since or until or start is not None or end is not None):
        raise BadRequest("say what to replay: event, or a range with since, until, from or to")
    for flag in ("failed_only", "dry_run"):
        if not isinstance(spec.get(flag, False), bool):
            raise BadRequest(f"{flag} must be true or false")
    rate = _number(spec, "rate", 0.1, 10_000) if "rate" in spec else None
    seq = webhooks.seq_of  # every cursor must be of this log's epoch
    selection = Selection(
        event=None if event is None else seq(event),
        after=0 if since is None else seq(since),
        until=None if until is None else seq(until),
        start=start,
        end=end,
        failed_only=spec.get("failed_only", False),
    )
    if selection.until is not None and selection.until < selection.after:
        raise BadRequest("until must not come before since")
    if start is not None and end is not None and end < start:
        raise BadRequest("to must not come before from")
    if spec.get("dry_run", False):
        return _answer({"events": len(await webhooks.select(id, selection))})
    started: Replay = await webhooks.replay(id, selection, rate)
    return _answer({"replay": started.view()}, 202)
