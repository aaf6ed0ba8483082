"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``.

Written as data rather than generated: the endpoints are few, and their streaming and
caching behaviour (SSE, long polling, ETags) is not something a generator can infer.
``tests/test_openapi.py`` checks it names every route the app serves.
"""

# ruff: noqa: E501  (a data document: long lines read better than wrapped ones)
from __future__ import annotations

from functools import cache
from typing import Any

import orjson

from . import __version__

_ERROR = {"$ref": "#/components/responses/Error"}


def _param(name: str, description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema, **extra}


# The naming rules of events.py as JSON Schema (dot-only segments are also refused).
SEGMENT = r"[A-Za-z0-9_.:-]+"
CHANNEL_NAME = {"type": "string", "maxLength": 255, "pattern": f"^{SEGMENT}(/{SEGMENT})*$"}
PATTERN_TEXT = {
    "type": "string",
    "maxLength": 255,
    "pattern": rf"^({SEGMENT}|\*)(/({SEGMENT}|\*))*(/\*\*)?$|^\*\*$",
}
CURSOR = {"type": "string", "pattern": "^[a-z0-9]{1,32}:[0-9]{1,19}$"}

CHANNEL = _param(
    "channel",
    "A channel or pattern (`*` one segment, trailing `**` one or more). Repeat for several.",
    {"type": "array", "items": PATTERN_TEXT, "minItems": 1, "maxItems": 64},
    required=True,
    style="form",
    explode=True,
)
SINCE = _param("since", "Resume after this cursor (an event's `id`).", CURSOR)
LIMIT = _param(
    "limit",
    "Most events to return (default 100).",
    {"type": "integer", "minimum": 1, "maximum": 1000},
)
WAIT = _param(
    "wait",
    "Long poll: hold up to this many seconds for an event.",
    {"type": "number", "minimum": 0},
)

TOKEN = _param(
    "token",
    "The credential, for clients that cannot send `Authorization` (EventSource, links). GET only.",
    {"type": "string"},
)
REFUSALS = {"400": _ERROR, "401": _ERROR, "403": _ERROR, "429": _ERROR}

PAGE = {"$ref": "#/components/schemas/Page"}


def _document() -> dict[str, Any]:
    json_page = {"application/json": {"schema": PAGE}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tidings",
            "version": __version__,
            "description": "Publish once; subscribe over SSE, long polling or short polling. "
            "Every event has a cursor `epoch:sequence`, the same on every transport.",
        },
        "paths": {
            "/channels/{channel}": {
                "post": {
                    "summary": "Publish one event; the body is its data",
                    "parameters": [
                        {"name": "channel", "in": "path", "required": True, "schema": CHANNEL_NAME},
                        _param("type", "Event type (default `message`); or the `ce-type` header.", {"type": "string"}),
                        {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"},
                         "description": "A retried publish with the same key returns the same event."},
                    ],
                    "requestBody": {"required": True, "content": {"*/*": {"schema": {}}}},
                    "responses": {
                        "201": {
                            "description": "The event is in history (durable).",
                            "headers": {"Idempotent-Replayed": {"schema": {"type": "string"}}},
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Event"}}},
                        },
                        "400": _ERROR, "401": _ERROR, "403": _ERROR, "413": _ERROR, "429": _ERROR, "503": _ERROR,
                    },
                }
            },
            "/publish": {
                "post": {
                    "summary": "Publish a batch of events atomically, in order",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Batch"}}}},
                    "responses": {
                        "201": {"description": "All events are in history.", "content": {"application/json": {"schema": {
                            "type": "object", "properties": {"events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}}}}}},
                        "400": _ERROR, "401": _ERROR, "403": _ERROR, "413": _ERROR, "429": _ERROR, "503": _ERROR,
                    },
                }
            },
            "/history": {
                "get": {
                    "summary": "Read history after a cursor (default: from the oldest retained event)",
                    "parameters": [CHANNEL, SINCE, LIMIT, TOKEN],
                    "responses": {"200": {"description": "A page of events.", "content": json_page}, **REFUSALS},
                }
            },
            "/poll": {
                "get": {
                    "summary": "Short poll (answers at once) or long poll (`wait`) for events after a cursor",
                    "parameters": [
                        CHANNEL, SINCE, TOKEN, LIMIT, WAIT, TOKEN,
                        {"name": "If-None-Match", "in": "header", "schema": {"type": "string"},
                         "description": "The previous answer's ETag; used as the cursor when `since` is absent."},
                    ],
                    "responses": {
                        "200": {"description": "Events (possibly none) and the cursor to poll from next; ETag is that cursor.",
                                "headers": {"ETag": {"schema": {"type": "string"}}}, "content": json_page},
                        "304": {"description": "Nothing new after the If-None-Match cursor."},
                        **REFUSALS,
                    },
                }
            },
            "/sse": {
                "get": {
                    "summary": "Server-Sent Events stream (resume with Last-Event-ID or `since`)",
                    "parameters": [
                        CHANNEL, SINCE, TOKEN,
                        {"name": "Last-Event-ID", "in": "header", "schema": CURSOR},
                    ],
                    "responses": {
                        "200": {"description": "An endless `text/event-stream`; see docs/sse.md.",
                                "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                        **REFUSALS,
                    },
                }
            },
            "/ws": {
                "get": {
                    "summary": "WebSocket endpoint: subscribe, publish and acks on one connection (docs/websocket.md)",
                    "description": "Connect with a WebSocket client. A plain request that does not ask to upgrade gets 426.",
                    "parameters": [
                        _param("channel", "Open a subscription named `url` at once. Repeat for several.",
                               {"type": "array", "items": PATTERN_TEXT, "maxItems": 64}, style="form", explode=True),
                        SINCE, TOKEN,
                    ],
                    "responses": {
                        "101": {"description": "Switching Protocols: the WebSocket is open."},
                        "426": _ERROR,
                        **REFUSALS,
                        "404": _ERROR,
                        "503": _ERROR,
                    },
                }
            },
            "/healthz": {"get": {"summary": "Liveness and the current cursor", "responses": {"200": {"description": "OK"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (needs an admin grant)", "parameters": [TOKEN],
                                 "responses": {"200": {"description": "text exposition format"}, **REFUSALS}}},
            "/keys": {
                "get": {"summary": "List API keys (admin); never shows a key or its hash", "responses": {"200": {"description": "{keys: [...]}"}, **REFUSALS, "404": _ERROR}},
                "post": {"summary": "Create an API key (admin); the answer is the only time the key is shown",
                         "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object", "required": ["subject"], "properties": {
                             "subject": {"type": "string"}, "subscribe": {"type": "array", "items": PATTERN_TEXT},
                             "publish": {"type": "array", "items": PATTERN_TEXT}, "admin": {"type": "boolean"}, "description": {"type": "string"}}}}}},
                         "responses": {"201": {"description": "The record and its key"}, **REFUSALS, "404": _ERROR}},
            },
            "/keys/{key_id}": {
                "delete": {"summary": "Revoke an API key (admin)", "parameters": [{"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                           "responses": {"200": {"description": "The revoked record"}, **REFUSALS, "404": _ERROR}},
            },
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        },
        "security": [{"bearer": []}, {}],
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                           "description": "Grants under the `tidings` claim; see docs/security.md. Off by default (loopback only)."},
            },
            "schemas": {
                "Event": {
                    "type": "object",
                    "description": "CloudEvents 1.0 JSON envelope.",
                    "required": ["specversion", "id", "source", "type", "channel", "time", "datacontenttype"],
                    "properties": {
                        "specversion": {"const": "1.0"},
                        "id": {"type": "string", "description": "The cursor `epoch:sequence`."},
                        "source": {"type": "string"},
                        "type": {"type": "string"},
                        "channel": {"type": "string"},
                        "time": {"type": "string", "format": "date-time"},
                        "datacontenttype": {"type": "string"},
                        "data": {"description": "JSON data as JSON, text as a string."},
                        "data_base64": {"type": "string", "description": "Any other data, base64."},
                    },
                },
                "Page": {
                    "type": "object",
                    "required": ["events", "cursor", "recovered", "more"],
                    "properties": {
                        "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
                        "cursor": {"type": "string", "description": "Pass as `since` next time."},
                        "recovered": {"type": "boolean", "description": "False: the cursor could not be continued; events were missed."},
                        "reason": {"type": "string"},
                        "more": {"type": "boolean", "description": "More events are already available."},
                    },
                },
                "Batch": {
                    "type": "object",
                    "required": ["events"],
                    "properties": {"events": {"type": "array", "items": {
                        "type": "object", "required": ["channel"],
                        "properties": {
                            "channel": {"type": "string"}, "type": {"type": "string"},
                            "data": {}, "data_base64": {"type": "string"},
                            "datacontenttype": {"type": "string"}, "idempotency_key": {"type": "string"},
                        }}}},
                },
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
                },
            },
            "responses": {
                "Error": {"description": "What was wrong.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            },
        },
    }  # fmt: skip


@cache
def openapi_document() -> bytes:
    return orjson.dumps(_document())
