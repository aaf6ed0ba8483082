"""Settings: defaults that work with no file, then a TOML file, then ``TIDINGS_*`` variables.

Rules:
- Loaded and validated once; every problem raises ``ConfigError`` naming the key (or variable)
  and what was wrong. Nothing here exits the process: only the CLI decides exit codes.
- Keys are ``section.key``; the variable for ``log.max_events`` is ``TIDINGS_LOG_MAX_EVENTS``.
- Durations are seconds, as a number or a string with a unit: ``"500ms"``, ``"15s"``, ``"5m"``,
  ``"3h"``, ``"7d"``. Sizes are bytes, as a number or with a unit: ``"64KiB"``, ``"1MiB"``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .events import parse_patterns
from .exceptions import BadRequest, ConfigError

# Variables read elsewhere (by the CLI and the client), not configuration keys.
NON_CONFIG_VARIABLES = {"TIDINGS_CONFIG", "TIDINGS_URL", "TIDINGS_TOKEN", "TIDINGS_GRPC_TARGET"}

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2,
               "gb": 1000**3, None: 1}  # fmt: skip


class Duration(float):
    """Seconds; marks fields that accept duration strings."""


class Size(int):
    """Bytes; marks fields that accept size strings."""


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""  # how clients reach this server, for printed examples; derived if empty
    access_log: bool = False
    shutdown_grace: Duration = Duration(5.0)


@dataclass
class LogSettings:
    # sqlite and memory: one node. redis and nats: many nodes sharing the engine at ``url``.
    backend: Literal["sqlite", "memory", "redis", "nats"] = "sqlite"
    path: str = "tidings.db"
    url: str = ""  # the engine, for backend redis (redis://…) or nats (nats://…)
    prefix: str = "tidings"  # names of the deployment's keys / stream / buckets on the engine
    replicas: int = 0  # redis: WAIT for this many replicas; nats: the stream's replicas (0: 1)
    lease_ttl: Duration = Duration(10.0)  # a dead node's durable consumers move within this
    durability: Literal["normal", "full"] = "normal"
    max_events: int = 1_000_000
    max_age: Duration = Duration(3 * 86400)
    idempotency_window: Duration = Duration(86400)
    trim_interval: Duration = Duration(10.0)


@dataclass
class HubSettings:
    broker: Literal["memory"] = "memory"
    queue_size: int = 1024


@dataclass
class HTTPSettings:
    origins: tuple[str, ...] = ()  # browser origins allowed (CORS and the Origin check)
    max_event_bytes: Size = Size(64 * 1024)
    max_request_bytes: Size = Size(1024 * 1024)
    max_batch: int = 1000
    default_limit: int = 100
    max_limit: int = 1000


@dataclass
class SSESettings:
    heartbeat: Duration = Duration(15.0)
    retry: Duration = Duration(2.0)
    write_timeout: Duration = Duration(30.0)


@dataclass
class WebSocketSettings:
    ping_interval: Duration = Duration(20.0)  # ping a connection that sent nothing for this long
    ping_timeout: Duration = Duration(20.0)  # close one that does not answer within this
    auth_timeout: Duration = Duration(10.0)  # auth on: close a connection with no credential
    max_message: Size = Size(256 * 1024)  # the largest client message (close 1009 above)
    max_subscriptions: int = 64  # per connection
    compression: bool = False  # offer permessage-deflate


@dataclass
class GrpcSettings:
    enabled: bool = True
    host: str = ""  # empty: server.host
    port: int = 50051  # 0: any free port
    max_message: Size = Size(1024 * 1024)  # the largest message received or sent
    keepalive_interval: Duration = Duration(20.0)  # ping idle connections this often
    keepalive_timeout: Duration = Duration(20.0)  # drop one that does not answer within this
    tls_cert_file: str = ""  # PEM; with tls_key_file, serve TLS
    tls_key_file: str = ""


@dataclass
class WebhookSettings:
    """Webhook delivery (docs/webhooks.md); endpoints are managed through the admin API."""

    enabled: bool = True
    allow_http: bool = False  # endpoints with plain http:// URLs
    allowed_networks: tuple[str, ...] = ()  # exceptions to the SSRF block list (IPs, CIDRs)
    schedule: tuple[str, ...] = ("0", "5s", "5m", "30m", "2h", "5h", "10h", "10h")
    timeout: Duration = Duration(15.0)  # per attempt, connecting included
    disable_after: Duration = Duration(5 * 86400)  # failing with no success this long: disabled
    concurrency: int = 4  # default attempts in flight per endpoint
    max_retrying: int = 1000  # events of one endpoint waiting for a retry before reading stops
    attempt_retention: Duration = Duration(7 * 86400)  # how long the attempt log keeps rows
    secret_grace: Duration = Duration(86400)  # a rotated-out secret keeps signing this long
    replay_rate: int = 50  # events per second, a replay's default pace
    max_replay: int = 100_000  # events one replay may select
    max_endpoints: int = 1000


@dataclass
class MQTTSettings:
    """The MQTT relay (docs/relays.md); off unless ``url`` is set."""

    url: str = ""  # mqtt://[user:password@]host[:1883] or mqtts://…:8883
    client_id: str = ""  # empty: tidings-<random>
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive: Duration = Duration(30.0)
    tls_ca_file: str = ""  # PEM bundle to verify the broker (mqtts); empty: the system's
    prefix: str = "tidings"  # outbound: each event goes to {prefix}/{channel}
    channels: tuple[str, ...] = ("**",)  # outbound patterns; empty: no outbound
    qos: int = 1  # outbound QoS (0 or 1; 1 waits for PUBACK before the cursor moves)
    retain: tuple[str, ...] = ()  # channel patterns whose messages the broker retains
    inbound_prefix: str = "tidings-in"  # inbound: subscribe {inbound_prefix}/#; empty: off
    inbound_qos: int = 1
    inbound_publish: tuple[str, ...] = ("**",)  # channels inbound messages may publish to


@dataclass
class AMQPSettings:
    """The AMQP 0-9-1 relay (docs/relays.md); off unless ``url`` is set."""

    url: str = ""  # amqp://user:password@host:5672/vhost or amqps://
    exchange: str = "tidings"  # outbound durable topic exchange; routing key = channel, / -> .
    channels: tuple[str, ...] = ("**",)  # outbound patterns; empty: no outbound
    inbound_exchange: str = "tidings-in"  # durable topic exchange the inbound queue binds to
    inbound_queue: str = "tidings-in"  # durable queue; empty: no inbound
    inbound_binding: str = "#"  # binding key of the inbound queue
    dead_letter_exchange: str = "tidings-dlx"  # refused inbound messages go here, with why
    inbound_publish: tuple[str, ...] = ("**",)  # channels inbound messages may publish to
    prefetch: int = 256  # inbound messages in flight


@dataclass
class PollSettings:
    max_wait: Duration = Duration(60.0)


@dataclass
class AuthSettings:
    """JWT verification; with no algorithm configured, auth is off (see docs/security.md)."""

    jwt_algorithms: tuple[str, ...] = ()
    jwt_secret: str = ""
    jwt_secret_file: str = ""
    jwt_public_key_files: tuple[str, ...] = ()
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_leeway: Duration = Duration(5.0)
    jwks_url: str = ""
    api_keys_file: str = ""  # JSON file of hashed API keys (tidings keys ...); "" = no API keys
    claim: str = "tidings"
    cookie: str = "tidings_token"
    allow_anonymous: bool = False  # serve a non-loopback address with auth off (explicit opt-in)


@dataclass
class LimitsSettings:
    """Rates, open streams, channels per subscription, proxies, deadlines (docs/security.md).

    Rates are requests per second (0: no limit); a burst is how many may come at once.
    """

    publish_rate: int = 1000  # publish requests per second per client address
    publish_burst: int = 2000
    subscribe_rate: int = 1000  # opened streams, polls, history reads per second per address
    subscribe_burst: int = 2000
    credential_publish_rate: int = 1000  # the same per credential (token subject), auth on
    credential_publish_burst: int = 2000
    credential_subscribe_rate: int = 100
    credential_subscribe_burst: int = 200
    max_streams_per_address: int = 1000  # open SSE streams and held long polls; 0: no limit
    max_streams: int = 10_000
    max_channels: int = 64  # channel parameters in one subscription
    trusted_proxies: tuple[str, ...] = ()  # peers whose X-Forwarded-For is believed (IPs, CIDRs)
    header_timeout: Duration = Duration(10.0)  # from connecting or a request's first byte
    idle_timeout: Duration = Duration(30.0)  # a keep-alive connection between requests


@dataclass
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    log: LogSettings = field(default_factory=LogSettings)
    hub: HubSettings = field(default_factory=HubSettings)
    http: HTTPSettings = field(default_factory=HTTPSettings)
    sse: SSESettings = field(default_factory=SSESettings)
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
    grpc: GrpcSettings = field(default_factory=GrpcSettings)
    poll: PollSettings = field(default_factory=PollSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    mqtt: MQTTSettings = field(default_factory=MQTTSettings)
    amqp: AMQPSettings = field(default_factory=AMQPSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)


_POSITIVE = {"queue_size", "max_events", "max_batch", "default_limit", "max_limit",
             "max_event_bytes", "max_request_bytes", "heartbeat", "write_timeout", "trim_interval",
             "lease_ttl",
             "max_age", "idempotency_window", "max_channels", "header_timeout",
             "idle_timeout", "ping_interval", "ping_timeout", "auth_timeout", "max_message",
             "max_subscriptions", "keepalive_interval", "keepalive_timeout", "timeout",
             "disable_after", "concurrency", "max_retrying", "attempt_retention",
             "replay_rate", "max_replay", "max_endpoints", "keepalive", "prefetch"}  # fmt: skip
_NON_NEGATIVE = {"publish_rate", "publish_burst", "subscribe_rate", "subscribe_burst",
                 "credential_publish_rate", "credential_publish_burst",
                 "credential_subscribe_rate", "credential_subscribe_burst",
                 "max_streams_per_address", "max_streams", "replicas"}  # fmt: skip


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Convert a TOML or environment value to the field's type, or raise ConfigError."""
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(
                f"{name} must be one of {', '.join(map(repr, choices))}, not {value!r}"
            )
        return value
    if hint == tuple[str, ...]:
        # TOML arrays of strings; in the environment, comma-separated.
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{name} must be a list of strings, not {value!r}")
        return tuple(i.strip() for i in items if i.strip())
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{name} must be true or false, not {value!r}")
    if hint is Duration:
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())):
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        else:
            raise ConfigError(
                f"{name} must be a duration like 15, '500ms', '15s', '5m', '3h' or '7d'; "
                f"got {value!r}"
            )
        # TOML has nan and inf; neither is a usable timeout, and no duration is negative.
        if not math.isfinite(seconds) or seconds < 0:
            raise ConfigError(f"{name} must be a finite, non-negative duration; got {value!r}")
        return Duration(seconds)
    if hint is Size:
        if isinstance(value, int) and not isinstance(value, bool):
            return Size(value)
        if isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
            unit = m.group(2).lower() if m.group(2) else None
            return Size(int(m.group(1)) * _SIZE_UNITS[unit])
        raise ConfigError(f"{name} must be a size like 65536, '64KiB' or '1MiB'; got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        raise ConfigError(f"{name} must be an integer, not {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, not {value!r}")
    raise ConfigError(f"{name}: unsupported setting type {hint!r}")  # pragma: no cover


def _apply(settings: Settings, section: str, key: str, value: Any, where: str) -> None:
    group = getattr(settings, section, None)
    if group is None or not dataclasses.is_dataclass(group):
        known = ", ".join(f.name for f in fields(Settings))
        raise ConfigError(f"{where}: unknown section {section!r}; known sections: {known}")
    hints = get_type_hints(type(group))
    if key not in hints:
        known = ", ".join(f.name for f in fields(group))
        raise ConfigError(f"{where}: unknown key {section}.{key}; keys of [{section}]: {known}")
    coerced = _coerce(f"{where} ({section}.{key})", hints[key], value)
    if key in _POSITIVE and not coerced > 0:
        raise ConfigError(f"{where} ({section}.{key}) must be greater than 0, not {value!r}")
    if key in _NON_NEGATIVE and coerced < 0:
        raise ConfigError(f"{where} ({section}.{key}) must be 0 (no limit) or more, not {value!r}")
    # Checked here rather than in ``_check`` so command-line overrides are checked too.
    if (section, key) == ("server", "port") and not 0 <= coerced < 65536:
        raise ConfigError(
            f"{where} (server.port) must be 0-65535 (0: any free port), not {value!r}"
        )
    if (section, key) == ("grpc", "port") and not 0 <= coerced < 65536:
        raise ConfigError(f"{where} (grpc.port) must be 0-65535 (0: any free port), not {value!r}")
    if (section, key) == ("log", "path") and not coerced.strip():
        raise ConfigError(f"{where} (log.path) must name a file, not {value!r}")
    if (section, key) == ("webhooks", "schedule"):
        if not coerced:
            raise ConfigError(f"{where} (webhooks.schedule) must list at least one delay")
        for item in coerced:
            _coerce(f"{where} (webhooks.schedule)", Duration, item)
    if (section, key) in (("limits", "trusted_proxies"), ("webhooks", "allowed_networks")):
        for item in coerced:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ConfigError(
                    f"{where} ({section}.{key}): {item!r} is not an IP address or a "
                    "CIDR network like 10.0.0.0/8"
                ) from None
    setattr(group, key, coerced)


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from defaults, the TOML file at ``path`` and ``TIDINGS_*`` variables."""
    settings = Settings()
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table")
            for key, value in values.items():
                _apply(settings, section, key, value, path)
    env = os.environ if environ is None else environ
    sections = {f.name for f in fields(Settings)}
    for name, value in env.items():
        if not name.startswith("TIDINGS_") or name in NON_CONFIG_VARIABLES:
            continue
        section, _, key = name[len("TIDINGS_") :].lower().partition("_")
        if section not in sections or not key:
            raise ConfigError(
                f"environment variable {name}: unknown setting; variables are "
                f"TIDINGS_<SECTION>_<KEY> with sections {', '.join(sorted(sections))}"
            )
        _apply(settings, section, key, value, f"environment variable {name}")
    _check(settings)
    return settings


CLUSTER_SCHEMES = {"redis": ("redis://", "rediss://", "unix://"), "nats": ("nats://", "tls://")}


def _check(settings: Settings) -> None:
    log = settings.log
    if log.backend in CLUSTER_SCHEMES:
        schemes = CLUSTER_SCHEMES[log.backend]
        if not log.url.startswith(schemes):
            raise ConfigError(
                f"log.backend = {log.backend!r} needs log.url starting with "
                f"{' or '.join(schemes)}, not {log.url[:40]!r}"
            )
    elif log.url:
        raise ConfigError(f"log.url is for backend redis or nats; log.backend is {log.backend!r}")
    for name in ("mqtt.qos", "mqtt.inbound_qos"):
        if getattr(settings.mqtt, name.split(".")[1]) not in (0, 1):
            raise ConfigError(f"{name} must be 0 or 1 (QoS 2 is not supported)")
    mqtt = settings.mqtt
    if mqtt.url and not mqtt.url.startswith(("mqtt://", "mqtts://")):
        raise ConfigError(f"mqtt.url must start with mqtt:// or mqtts://, not {mqtt.url[:40]!r}")
    amqp = settings.amqp
    if amqp.url and not amqp.url.startswith(("amqp://", "amqps://")):
        raise ConfigError(f"amqp.url must start with amqp:// or amqps://, not {amqp.url[:40]!r}")
    for section, key in (("mqtt", "channels"), ("mqtt", "retain"), ("mqtt", "inbound_publish"),
                         ("amqp", "channels"), ("amqp", "inbound_publish")):  # fmt: skip
        patterns = getattr(getattr(settings, section), key)
        try:
            if patterns:
                parse_patterns(patterns)
        except BadRequest as exc:
            raise ConfigError(f"{section}.{key}: {exc.detail}") from None
    if amqp.url:
        used = [("exchange", bool(amqp.channels))]
        used += [
            (k, bool(amqp.inbound_queue)) for k in ("inbound_exchange", "dead_letter_exchange")
        ]
        for key, needed in used:
            if needed and not getattr(amqp, key):
                raise ConfigError(f"amqp.{key} must name an exchange (RabbitMQ refuses '')")
    grpc = settings.grpc
    if bool(grpc.tls_cert_file) != bool(grpc.tls_key_file):
        raise ConfigError("grpc.tls_cert_file and grpc.tls_key_file go together: set both or none")
    http = settings.http
    if http.default_limit > http.max_limit:
        raise ConfigError("http.default_limit must not exceed http.max_limit")
    if http.max_event_bytes > http.max_request_bytes:
        raise ConfigError("http.max_event_bytes must not exceed http.max_request_bytes")
    limits = settings.limits
    for prefix in ("", "credential_"):
        for action in ("publish", "subscribe"):
            rate = getattr(limits, f"{prefix}{action}_rate")
            if rate and getattr(limits, f"{prefix}{action}_burst") < 1:
                raise ConfigError(
                    f"limits.{prefix}{action}_burst must be at least 1 while "
                    f"limits.{prefix}{action}_rate is set (0 turns the limit off)"
                )


def as_dict(settings: Settings) -> dict[str, dict[str, Any]]:
    return {f.name: dataclasses.asdict(getattr(settings, f.name)) for f in fields(Settings)}


def schedule_seconds(settings: WebhookSettings) -> tuple[float, ...]:
    """``webhooks.schedule`` in seconds (each entry was checked when it was set)."""
    return tuple(float(_coerce("webhooks.schedule", Duration, d)) for d in settings.schedule)
