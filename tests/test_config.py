"""Settings: defaults, TOML file, ``TIDINGS_*`` variables, validation, and the CLI's exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tidings import config
from tidings.cli import main
from tidings.config import Settings
from tidings.exceptions import ConfigError


def write(tmp_path: Path, text: str, name: str = "tidings.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load(path: str | None = None, **env: str) -> Settings:
    return config.load(path, environ=env)


# -- sources and precedence ------------------------------------------------------------------


def test_defaults_with_no_file_and_no_variables() -> None:
    settings = load()
    assert settings == Settings()
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8080
    assert settings.log.backend == "sqlite"
    assert settings.log.path == "tidings.db"
    assert settings.hub.queue_size == 1024
    assert settings.http.max_event_bytes == 64 * 1024
    assert settings.sse.heartbeat == 15.0
    assert settings.poll.max_wait == 60.0


def test_toml_file_overrides_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        host = "0.0.0.0"
        port = 9000
        access_log = true

        [log]
        backend = "memory"
        max_events = 500
        max_age = "7d"

        [http]
        max_event_bytes = "16KiB"

        [sse]
        heartbeat = "500ms"
        retry = 3
        """,
    )
    settings = load(path)
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == 9000
    assert settings.server.access_log is True
    assert settings.log.backend == "memory"
    assert settings.log.max_events == 500
    assert settings.log.max_age == 7 * 86400.0
    assert settings.http.max_event_bytes == 16 * 1024
    assert settings.sse.heartbeat == 0.5
    assert settings.sse.retry == 3.0
    # Untouched keys keep their defaults.
    assert settings.log.path == "tidings.db"
    assert settings.hub.queue_size == 1024


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[log]\nmax_events = 500\npath = 'file.db'\n[server]\nport = 9000\n")
    settings = load(
        path,
        TIDINGS_LOG_MAX_EVENTS="700",
        TIDINGS_SERVER_PORT="9100",
        TIDINGS_HTTP_MAX_EVENT_BYTES="1KiB",
        TIDINGS_SSE_WRITE_TIMEOUT="2m",
        TIDINGS_SERVER_ACCESS_LOG="yes",
        TIDINGS_LOG_DURABILITY="full",
    )
    assert settings.log.max_events == 700
    assert settings.server.port == 9100
    assert settings.log.path == "file.db"  # from the file, not overridden
    assert settings.http.max_event_bytes == 1024
    assert settings.sse.write_timeout == 120.0
    assert settings.server.access_log is True
    assert settings.log.durability == "full"


def test_variables_that_are_not_settings_and_other_prefixes_are_ignored() -> None:
    settings = load(TIDINGS_CONFIG="x.toml", TIDINGS_URL="http://x", HOME="/root", tidings_x="1")
    assert settings == Settings()


# -- unknown names ---------------------------------------------------------------------------


def test_unknown_key_in_the_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, "[log]\nmax_evnets = 5\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert "log.max_evnets" in info.value.detail
    assert path in info.value.detail
    assert "max_events" in info.value.detail  # the keys it could have meant


def test_unknown_section_in_the_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'websockets'"):
        load(write(tmp_path, "[websockets]\nport = 1\n"))


def test_top_level_value_instead_of_a_table_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'port'"):
        load(write(tmp_path, "port = 8080\n"))


@pytest.mark.parametrize(
    "name",
    ["TIDINGS_LOG_NOPE", "TIDINGS_NOPE_KEY", "TIDINGS_PORT", "TIDINGS_", "TIDINGS_LOG_"],
)
def test_unknown_tidings_variable_is_an_error_naming_it(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**{name: "1"})
    assert name in info.value.detail


def test_missing_and_invalid_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[log\nx = "))


# -- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15", 15.0), ("1.5", 1.5), ("500ms", 0.5), ("15s", 15.0), ("5m", 300.0), ("3h", 10800.0),
     ("7d", 604800.0), (" 2 s ", 2.0)],
)  # fmt: skip
def test_durations_accept_numbers_and_units(text: str, seconds: float) -> None:
    assert load(TIDINGS_SSE_WRITE_TIMEOUT=text).sse.write_timeout == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("1000", 1000), ("64KiB", 65536), ("1MiB", 1048576), ("1mib", 1048576), ("2KB", 2000),
     ("1MB", 1000000), ("10B", 10)],
)  # fmt: skip
def test_sizes_accept_numbers_and_units(text: str, size: int) -> None:
    assert load(TIDINGS_HTTP_MAX_EVENT_BYTES=text).http.max_event_bytes == size


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ("[sse]\nheartbeat = '5 minutes'", ["sse.heartbeat", "duration"]),
        ("[sse]\nheartbeat = '-1s'", ["sse.heartbeat", "duration"]),
        ("[sse]\nheartbeat = true", ["sse.heartbeat", "duration"]),
        ("[sse]\nheartbeat = 0", ["sse.heartbeat", "greater than 0"]),
        ("[sse]\nheartbeat = -2", ["sse.heartbeat"]),
        ("[sse]\nheartbeat = nan", ["sse.heartbeat"]),
        ("[sse]\nretry = -1", ["sse.retry"]),
        ("[sse]\nretry = nan", ["sse.retry"]),
        ("[sse]\nretry = inf", ["sse.retry"]),
        ("[sse]\nwrite_timeout = inf", ["sse.write_timeout"]),
        ("[poll]\nmax_wait = -5", ["poll.max_wait"]),
        ("[log]\nmax_age = '3 days'", ["log.max_age", "duration"]),
        ("[http]\nmax_event_bytes = '1.5MiB'", ["http.max_event_bytes", "size"]),
        ("[http]\nmax_event_bytes = '64XB'", ["http.max_event_bytes", "size"]),
        ("[http]\nmax_event_bytes = -1", ["http.max_event_bytes", "greater than 0"]),
        ("[http]\nmax_event_bytes = 1.5", ["http.max_event_bytes", "size"]),
        ("[log]\nbackend = 'mysql'", ["log.backend", "'sqlite'", "'memory'"]),
        ("[log]\ndurability = 'extra'", ["log.durability", "'normal'", "'full'"]),
        ("[hub]\nbroker = 'kafka'", ["hub.broker"]),
        ("[hub]\nqueue_size = 0", ["hub.queue_size", "greater than 0"]),
        ("[hub]\nqueue_size = 'many'", ["hub.queue_size", "integer"]),
        ("[hub]\nqueue_size = true", ["hub.queue_size", "integer"]),
        ("[hub]\nqueue_size = 1.5", ["hub.queue_size", "integer"]),
        ("[server]\nport = 70000", ["server.port", "65535"]),
        ("[server]\nport = -1", ["server.port"]),
        ("[server]\nhost = 1", ["server.host", "string"]),
        ("[server]\naccess_log = 'maybe'", ["server.access_log", "true or false"]),
        ("[log]\npath = ''", ["log.path"]),
        ("[http]\ndefault_limit = 2000", ["default_limit", "max_limit"]),
        ("[http]\nmax_event_bytes = '2MiB'", ["max_event_bytes", "max_request_bytes"]),
    ],
)
def test_bad_values_in_the_file_are_rejected_with_the_key_named(
    tmp_path: Path, toml: str, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, toml))
    for word in words:
        assert word in info.value.detail


@pytest.mark.parametrize(
    ("name", "value"),
    [("TIDINGS_SSE_HEARTBEAT", "soon"), ("TIDINGS_SSE_HEARTBEAT", "0"),
     ("TIDINGS_HTTP_MAX_EVENT_BYTES", "big"), ("TIDINGS_HUB_QUEUE_SIZE", "1e3"),
     ("TIDINGS_HUB_QUEUE_SIZE", "-4"), ("TIDINGS_LOG_BACKEND", "SQLITE"),
     ("TIDINGS_SERVER_ACCESS_LOG", "2"), ("TIDINGS_SERVER_PORT", "65536"),
     ("TIDINGS_SSE_RETRY", "nan")],
)  # fmt: skip
def test_bad_values_in_variables_are_rejected_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**{name: value})
    assert name in info.value.detail


def toml_value(value: object) -> str:
    if isinstance(value, tuple):
        return repr(list(value))  # a TOML array of literal strings
    return repr(value).replace("True", "true").replace("False", "false")


def test_as_dict_round_trips_through_a_file(tmp_path: Path) -> None:
    settings = load(
        TIDINGS_LOG_MAX_EVENTS="42",
        TIDINGS_SSE_HEARTBEAT="2s",
        TIDINGS_AUTH_JWT_ALGORITHMS="HS256,RS256",
    )
    lines = []
    for section, values in config.as_dict(settings).items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
    assert load(write(tmp_path, "\n".join(lines))) == settings


# -- the command line ------------------------------------------------------------------------


def test_serve_help_mentions_the_main_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--config", "--host", "--port", "--log", "--db", "--durability"):
        assert option in text
    assert "TIDINGS_" in text


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    return subprocess.run(
        [sys.executable, "-m", "tidings", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean, **(env or {})},
    )


def assert_config_exit(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]
    assert result.stdout == ""  # it never started: no banner


def test_serve_with_a_bad_config_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[log]\nmax_evnets = 5\n", "bad.toml")
    assert_config_exit(run_cli("serve", "--config", path), "log.max_evnets", "bad.toml")


def test_serve_with_config_from_tidings_config_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "[sse]\nretry = 'often'\n", "env.toml")
    assert_config_exit(run_cli("serve", env={"TIDINGS_CONFIG": path}), "sse.retry")


def test_serve_with_an_unknown_variable_exits_2(tmp_path: Path) -> None:
    assert_config_exit(run_cli("serve", env={"TIDINGS_SERVER_PROT": "1"}), "TIDINGS_SERVER_PROT")


@pytest.mark.parametrize(
    ("args", "words"),
    [(["--port", "99999"], ["server.port"]), (["--port", "-1"], ["server.port"]),
     (["--db", ""], ["log.path"])],
)  # fmt: skip
def test_serve_with_bad_command_line_values_exits_2(
    tmp_path: Path, args: list[str], words: list[str]
) -> None:
    assert_config_exit(run_cli("serve", "--log", "memory", *args), *words)


def test_serve_with_an_unreadable_config_file_exits_2(tmp_path: Path) -> None:
    assert_config_exit(run_cli("serve", "--config", str(tmp_path / "nope.toml")), "nope.toml")


def test_overrides_helper_rejects_what_load_rejects() -> None:
    settings: Any = load()
    with pytest.raises(ConfigError):
        config._apply(settings, "server", "port", 70000, "command line")


def test_serve_on_a_port_in_use_exits_2_with_one_line() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert_config_exit(run_cli("serve", "--log", "memory", "--port", port), port, "in use")


def test_serve_on_an_unknown_host_exits_2_with_one_line() -> None:
    assert_config_exit(
        run_cli("serve", "--log", "memory", "--port", "0", "--host", "no-such-host.invalid"),
        "no-such-host.invalid",
    )


@pytest.mark.parametrize("where", ["directory", "under-a-file"])
def test_serve_with_a_log_path_that_cannot_be_opened_exits_2_with_one_line(
    tmp_path: Path, where: str
) -> None:
    if where == "directory":
        path = tmp_path
    else:
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "tidings.db"
    assert_config_exit(run_cli("serve", "--port", "0", "--db", str(path)), str(path))


def test_grpc_tls_needs_both_files_and_a_valid_port() -> None:
    with pytest.raises(ConfigError, match=r"tls_cert_file and grpc\.tls_key_file go together"):
        config.load(None, environ={"TIDINGS_GRPC_TLS_CERT_FILE": "cert.pem"})
    with pytest.raises(ConfigError, match=r"grpc\.port"):
        config.load(None, environ={"TIDINGS_GRPC_PORT": "70000"})
    settings = config.load(None, environ={"TIDINGS_GRPC_ENABLED": "no"})
    assert settings.grpc.enabled is False


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TIDINGS_AMQP_CHANNELS": "a/**/b"}, "amqp.channels: pattern 'a/**/b' has '**' before"),
        ({"TIDINGS_MQTT_RETAIN": "x*"}, "mqtt.retain: pattern 'x*' has a partial wildcard"),
        (
            {"TIDINGS_AMQP_URL": "amqp://h/", "TIDINGS_AMQP_EXCHANGE": ""},
            "amqp.exchange must name an exchange (RabbitMQ refuses '')",
        ),
        ({"TIDINGS_MQTT_QOS": "2"}, "mqtt.qos must be 0 or 1 (QoS 2 is not supported)"),
    ],
)
def test_relay_settings_are_checked(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(None, environ)
    assert caught.value.detail.startswith(message)
