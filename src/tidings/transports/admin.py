"""The admin HTTP API: API keys (``/keys``). Every route needs an admin grant."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ..auth import KeyStore
from ..exceptions import ConfigError, InvalidEvent, NotFound
from . import Query, authenticate, context
from .http import json_response, read_body


def _store(request: Request) -> KeyStore:
    authenticate(request).check_admin()
    store = context(request).auth.api_keys
    if store is None:
        raise NotFound("API keys are off: set auth.api_keys_file (docs/security.md)")
    return store


async def list_keys(request: Request) -> Response:
    Query(request, ())
    store = _store(request)
    body = {"keys": [record.public() for record in store.list()]}
    return json_response(orjson.dumps(body), headers={"Cache-Control": "no-store"})


async def create_key(request: Request) -> Response:
    Query(request, ())
    store = _store(request)
    body = await read_body(request, 64 * 1024, "request body")
    try:
        spec: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"request body is not valid JSON: {exc}") from None
    fields = {"subject", "subscribe", "publish", "admin", "description"}
    if not isinstance(spec, dict) or set(spec) - fields:
        raise InvalidEvent(f"body must be an object with the fields {', '.join(sorted(fields))}")
    subject, description = spec.get("subject"), spec.get("description", "")
    subscribe, publish = spec.get("subscribe", []), spec.get("publish", [])
    admin = spec.get("admin", False)
    lists_ok = all(isinstance(v, list) and all(isinstance(p, str) for p in v)
                   for v in (subscribe, publish))  # fmt: skip
    if not (isinstance(subject, str) and subject and lists_ok and isinstance(admin, bool)
            and isinstance(description, str)):  # fmt: skip
        raise InvalidEvent(
            "subject must be a non-empty string, subscribe and publish lists of patterns, "
            "admin true or false, description a string"
        )
    try:
        key, record = store.create(
            subject, subscribe=subscribe, publish=publish, admin=admin, description=description
        )
    except ConfigError as exc:
        raise InvalidEvent(exc.detail) from None
    shown = {**record.public(), "key": key}  # the only time the key is ever shown
    return json_response(orjson.dumps(shown), 201, {"Cache-Control": "no-store"})


async def revoke_key(request: Request) -> Response:
    Query(request, ())
    record = _store(request).revoke(request.path_params["key_id"])
    return json_response(orjson.dumps(record.public()))
