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

# The webhook admin API (transports/webhooks.py): admin grant, Authorization header only.
ENDPOINT_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}, "description": "The endpoint's id (`ep_…`)."}  # fmt: skip
WEBHOOK_REFUSALS = {"400": _ERROR, "401": _ERROR, "403": _ERROR, "404": _ERROR, "503": _ERROR}
ENDPOINT = {"$ref": "#/components/schemas/WebhookEndpoint"}
TIME = {"type": "string", "format": "date-time"}
WHEN = {"oneOf": [{"type": "number"}, {"type": "string"}], "description": "Unix seconds, or an RFC 3339 time with `Z` or an offset."}  # fmt: skip
WEBHOOK_FIELDS: dict[str, Any] = {
    "url": {"type": "string", "format": "uri", "maxLength": 2048, "description": "`https://` (or `http://` with `webhooks.allow_http`); checked against the SSRF block list, a hostname as resolved now."},
    "channels": {"type": "array", "items": PATTERN_TEXT, "minItems": 1, "maxItems": 64, "description": "Channels or patterns whose events are delivered."},
    "types": {"type": "array", "items": {"type": "string", "minLength": 1}, "description": "Deliver only events of these types; empty: every type."},
    "description": {"type": "string", "maxLength": 1000},
    "headers": {"type": "object", "maxProperties": 32, "propertyNames": {"pattern": "^[A-Za-z0-9-]+$"},
                "additionalProperties": {"type": "string", "maxLength": 4096},
                "description": "Sent with every attempt. Not `host`, `content-type`, `content-length`, `transfer-encoding`, `connection` or the `webhook-*` headers."},
    "rate_limit": {"type": "number", "minimum": 0, "maximum": 100000, "description": "Attempts per second; 0: no limit."},
    "concurrency": {"type": "integer", "minimum": 1, "maximum": 256, "description": "Attempts in flight at once (default `webhooks.concurrency`)."},
    "strict_order": {"type": "boolean", "description": "One event in flight at a time, retries included, in cursor order."},
    "timeout": {"type": "number", "minimum": 0.1, "maximum": 300, "description": "Seconds per attempt (default `webhooks.timeout`)."},
    "enabled": {"type": "boolean", "description": "false: deliver nothing (operator disable); true: enable again, health back to `healthy`."},
}  # fmt: skip


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
                        CHANNEL, SINCE, TOKEN, LIMIT, WAIT,
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
            "/webhooks": {
                "get": {"summary": "List webhook endpoints (admin); secrets are never shown",
                        "responses": {"200": {"description": "Every endpoint, oldest first.", "content": {"application/json": {"schema": {
                            "type": "object", "required": ["endpoints"], "properties": {"endpoints": {"type": "array", "items": ENDPOINT}}}}}},
                                      "400": _ERROR, "401": _ERROR, "403": _ERROR, "503": _ERROR}},
                "post": {"summary": "Register a webhook endpoint (admin); the answer is the only time its secret is shown",
                         "description": "The endpoint receives the events published from now on; replay sends older ones. See docs/webhooks.md.",
                         "requestBody": {"required": True, "content": {"application/json": {"schema": {
                             "type": "object", "required": ["url", "channels"], "additionalProperties": False, "properties": WEBHOOK_FIELDS}}}},
                         "responses": {"201": {"description": "The endpoint and its `secret` (`whsec_…`).", "content": {"application/json": {"schema": {
                             "allOf": [ENDPOINT, {"type": "object", "required": ["secret"], "properties": {"secret": {"type": "string"}}}]}}}},
                                       "409": _ERROR, "413": _ERROR, **WEBHOOK_REFUSALS}},
            },
            "/webhooks/{id}": {
                "get": {"summary": "One webhook endpoint (admin), with its recent replays", "parameters": [ENDPOINT_ID],
                        "responses": {"200": {"description": "The endpoint and its last 20 replays since the server started.", "content": {"application/json": {"schema": {
                            "allOf": [ENDPOINT, {"type": "object", "required": ["replays"], "properties": {
                                "replays": {"type": "array", "items": {"$ref": "#/components/schemas/WebhookReplay"}}}}]}}}},
                                      **WEBHOOK_REFUSALS}},
                "patch": {"summary": "Change a webhook endpoint (admin): the fields given; lists and maps are replaced whole", "parameters": [ENDPOINT_ID],
                          "requestBody": {"required": True, "content": {"application/json": {"schema": {
                              "type": "object", "additionalProperties": False, "properties": WEBHOOK_FIELDS}}}},
                          "responses": {"200": {"description": "The endpoint as changed.", "content": {"application/json": {"schema": ENDPOINT}}},
                                        "413": _ERROR, **WEBHOOK_REFUSALS}},
                "delete": {"summary": "Delete a webhook endpoint (admin) with its cursor, retries, failed marks and attempt log", "parameters": [ENDPOINT_ID],
                           "responses": {"200": {"description": "The endpoint as it was.", "content": {"application/json": {"schema": ENDPOINT}}}, **WEBHOOK_REFUSALS}},
            },
            "/webhooks/{id}/rotate": {
                "post": {"summary": "Sign with a new secret (admin); the old ones keep signing for `grace` seconds", "parameters": [ENDPOINT_ID],
                         "requestBody": {"content": {"application/json": {"schema": {"type": "object", "additionalProperties": False, "properties": {
                             "grace": {"type": "number", "minimum": 0, "maximum": 2592000, "description": "Seconds the current secrets keep signing (default `webhooks.secret_grace`, 24 h); 0: stop at once."},
                             "secret": {"type": "string", "pattern": "^whsec_[A-Za-z0-9+/]+={0,2}$", "description": "Use this secret (24 to 64 bytes, standard base64) instead of a generated one."}}}}}},
                         "responses": {"200": {"description": "The endpoint and its new `secret`, shown this once.", "content": {"application/json": {"schema": {
                             "allOf": [ENDPOINT, {"type": "object", "required": ["secret"], "properties": {"secret": {"type": "string"}}}]}}}},
                                       "413": _ERROR, **WEBHOOK_REFUSALS}},
            },
            "/webhooks/{id}/attempts": {
                "get": {"summary": "Delivery attempts of a webhook endpoint (admin), newest first",
                        "parameters": [ENDPOINT_ID,
                                       _param("event", "Only this event's attempts (its cursor).", CURSOR),
                                       _param("limit", "Most attempts to return (default 100).", {"type": "integer", "minimum": 1, "maximum": 1000}),
                                       _param("before", "Attempts with an id below this: the previous page's `next`.", {"type": "integer", "minimum": 1})],
                        "responses": {"200": {"description": "A page of attempts.", "content": {"application/json": {"schema": {
                            "type": "object", "required": ["attempts", "next"], "properties": {
                                "attempts": {"type": "array", "items": {"$ref": "#/components/schemas/WebhookAttempt"}},
                                "next": {"type": ["integer", "null"], "description": "Pass as `before` for the next page; null: no more."}}}}}},
                                      **WEBHOOK_REFUSALS}},
            },
            "/webhooks/{id}/failed": {
                "get": {"summary": "Events a webhook endpoint gave up on after the last attempt (admin), oldest first",
                        "parameters": [ENDPOINT_ID,
                                       _param("after", "Events after this cursor: the previous page's `next`.", CURSOR),
                                       _param("limit", "Most events to return (default 100).", {"type": "integer", "minimum": 1, "maximum": 1000})],
                        "responses": {"200": {"description": "A page of failed events.", "content": {"application/json": {"schema": {
                            "type": "object", "required": ["failed", "next"], "properties": {
                                "failed": {"type": "array", "items": {"type": "object", "required": ["event", "time", "reason"], "properties": {
                                    "event": CURSOR, "time": TIME, "reason": {"type": "string"}}}},
                                "next": {"type": ["string", "null"], "description": "Pass as `after` for the next page; null: no more."}}}}}},
                                      **WEBHOOK_REFUSALS}},
            },
            "/webhooks/{id}/replay": {
                "post": {"summary": "Deliver past events again (admin): one event, or a cursor and time range; one attempt each",
                         "description": "Give `event`, or at least one of `since`, `until`, `from`, `to`. The endpoint must be enabled.",
                         "parameters": [ENDPOINT_ID],
                         "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object", "additionalProperties": False, "properties": {
                             "event": {**CURSOR, "description": "Just this event."},
                             "since": {**CURSOR, "description": "Events after this cursor."},
                             "until": {**CURSOR, "description": "Events up to and including this cursor."},
                             "from": {**WHEN, "description": "Events published at or after this time (unix seconds or RFC 3339)."},
                             "to": {**WHEN, "description": "Events published before this time (unix seconds or RFC 3339)."},
                             "failed_only": {"type": "boolean", "description": "Only events marked failed for this endpoint."},
                             "dry_run": {"type": "boolean", "description": "Count the events; send nothing."},
                             "rate": {"type": "number", "minimum": 0.1, "maximum": 10000, "description": "Events per second (default `webhooks.replay_rate`)."}}}}}},
                         "responses": {
                             "200": {"description": "Dry run: how many events the replay would send.", "content": {"application/json": {"schema": {
                                 "type": "object", "required": ["events"], "properties": {"events": {"type": "integer"}}}}}},
                             "202": {"description": "The replay started; follow it in `GET /webhooks/{id}` (`replays`).", "content": {"application/json": {"schema": {
                                 "type": "object", "required": ["replay"], "properties": {"replay": {"$ref": "#/components/schemas/WebhookReplay"}}}}}},
                             "409": _ERROR, "413": _ERROR, **WEBHOOK_REFUSALS}},
            },
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
                "WebhookEndpoint": {
                    "type": "object",
                    "description": "A webhook endpoint as the admin API shows it; its secrets are never shown again after create and rotate.",
                    "required": ["id", "url", "channels", "types", "description", "headers", "enabled", "health", "health_reason", "failing_since",
                                 "rate_limit", "concurrency", "strict_order", "timeout", "secrets", "cursor", "created", "updated"],
                    "properties": {
                        "id": {"type": "string"},
                        "url": {"type": "string"},
                        "channels": {"type": "array", "items": {"type": "string"}},
                        "types": {"type": "array", "items": {"type": "string"}},
                        "description": {"type": "string"},
                        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                        "enabled": {"type": "boolean", "description": "False exactly when `health` is `disabled`."},
                        "health": {"enum": ["healthy", "failing", "disabled"]},
                        "health_reason": {"type": ["string", "null"], "description": "Why it is failing or disabled."},
                        "failing_since": {"oneOf": [TIME, {"type": "null"}]},
                        "rate_limit": {"type": "number"},
                        "concurrency": {"type": "integer"},
                        "strict_order": {"type": "boolean"},
                        "timeout": {"type": "number"},
                        "secrets": {"type": "array", "description": "The current secret first; older ones sign until `expires`.", "items": {
                            "type": "object", "required": ["created", "expires"], "properties": {"created": TIME, "expires": {"oneOf": [TIME, {"type": "null"}]}}}},
                        "cursor": {"oneOf": [CURSOR, {"type": "null"}], "description": "Every matching event up to here is delivered, failed or waiting for a retry; null while the endpoint is not running."},
                        "created": TIME,
                        "updated": TIME,
                    },
                },
                "WebhookAttempt": {
                    "type": "object",
                    "required": ["id", "event", "number", "time", "duration", "status", "error", "response", "outcome", "reason", "trigger"],
                    "properties": {
                        "id": {"type": "integer"},
                        "event": CURSOR,
                        "number": {"type": "integer", "description": "0 for the first attempt of the event."},
                        "time": TIME,
                        "duration": {"type": "number", "description": "Seconds."},
                        "status": {"type": ["integer", "null"], "description": "The HTTP status; null when there was no response."},
                        "error": {"type": ["string", "null"], "description": "`timeout`, or why the connection failed (a refused address included)."},
                        "response": {"type": "string", "description": "The first KiB of the response body (invalid UTF-8 replaced)."},
                        "outcome": {"enum": ["delivered", "retry", "gone"]},
                        "reason": {"type": "string"},
                        "trigger": {"enum": ["delivery", "replay"]},
                    },
                },
                "WebhookReplay": {
                    "type": "object",
                    "required": ["id", "endpoint", "events", "rate", "sent", "delivered", "failed", "state", "reason", "started", "finished"],
                    "properties": {
                        "id": {"type": "string"},
                        "endpoint": {"type": "string"},
                        "events": {"type": "integer", "description": "Events selected."},
                        "rate": {"type": "number"},
                        "sent": {"type": "integer"},
                        "delivered": {"type": "integer"},
                        "failed": {"type": "integer"},
                        "state": {"enum": ["running", "done", "stopped"]},
                        "reason": {"type": ["string", "null"], "description": "Why it stopped."},
                        "started": TIME,
                        "finished": {"oneOf": [TIME, {"type": "null"}]},
                    },
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
