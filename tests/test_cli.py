"""``tidings publish`` and ``tidings subscribe`` as real subprocesses against a test server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pytest

from conftest import RunningServer

GUARD = 60  # seconds; only a guard against a hang, never a timing assertion


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(extra)
    return env


def tidings(
    *args: str, input: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tidings", *args],
        input=input,
        capture_output=True,
        timeout=GUARD,
        env=environment() if env is None else env,
        check=False,
    )


@contextmanager
def background(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A ``tidings`` subprocess, killed if it outlives the guard or the test."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidings", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(),
    )
    timer = threading.Timer(GUARD, proc.kill)
    timer.start()
    try:
        yield proc
    finally:
        timer.cancel()
        proc.kill()
        proc.communicate()


def lines(output: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in output.splitlines()]


def publish(server: RunningServer, channel: str, body: bytes) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/channels/{channel}", content=body, timeout=10)
    assert response.status_code == 201, response.text
    envelope: dict[str, Any] = response.json()
    return envelope


def head(server: RunningServer) -> str:
    cursor: str = httpx.get(f"{server.url}/healthz", timeout=10).json()["cursor"]
    return cursor


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_publish_prints_the_envelope_as_one_json_line(server: RunningServer) -> None:
    result = tidings("publish", "orders/1", '{"total": 5}', "--url", server.url)
    assert result.returncode == 0, result.stderr
    [envelope] = lines(result.stdout)
    assert envelope["channel"] == "orders/1"
    assert envelope["type"] == "message"
    assert envelope["datacontenttype"] == "application/json"
    assert envelope["data"] == {"total": 5}
    assert result.stderr == b""


@pytest.mark.parametrize("data_args", [[], ["-"]])
def test_publish_reads_data_from_stdin(server: RunningServer, data_args: list[str]) -> None:
    result = tidings(
        "publish", "notes", *data_args, "--type", "note.added", "--url", server.url,
        input=b"line one\nline two\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    [envelope] = lines(result.stdout)
    assert envelope["type"] == "note.added"
    assert envelope["datacontenttype"].startswith("text/plain")
    assert envelope["data"] == "line one\nline two\n"


def test_publish_options_and_url_from_the_environment(server: RunningServer) -> None:
    env = environment(TIDINGS_URL=server.url)
    args = ("publish", "bin", "--content-type", "application/octet-stream")
    key = ("--idempotency-key", "k-1")
    first = tidings(*args, *key, input=b"\x00\x01", env=env)
    again = tidings(*args, *key, input=b"\x00\x01", env=env)
    assert first.returncode == again.returncode == 0, first.stderr
    [envelope] = lines(first.stdout)
    assert envelope["data_base64"] == "AAE="
    assert lines(again.stdout) == [envelope]  # logged once


@pytest.mark.parametrize("via", ["sse", "longpoll", "poll"])
def test_subscribe_prints_events_after_the_cursor_and_exits_after_count(
    server: RunningServer, via: str
) -> None:
    sent = [publish(server, f"s/{i}", b'{"i": %d}' % i) for i in range(5)]
    publish(server, "elsewhere", b"1")
    result = tidings(
        "subscribe", "s/*", "--via", via, "--since", sent[1]["id"], "--count", "3",
        "--poll-interval", "0.05", "--url", server.url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert lines(result.stdout) == sent[2:]
    assert result.stderr == b""


@pytest.mark.parametrize("via", ["sse", "longpoll", "poll"])
def test_subscribe_prints_live_events_as_they_arrive(server: RunningServer, via: str) -> None:
    since = head(server)
    args = ("subscribe", "live/**", "--via", via, "--since", since, "--count", "2")
    with background(*args, "--poll-interval", "0.05", "--url", server.url) as proc:
        assert proc.stdout is not None
        first = publish(server, "live/a", b"1")
        assert orjson.loads(proc.stdout.readline()) == first  # flushed per event
        second = publish(server, "live/b/c", b"2")
        assert orjson.loads(proc.stdout.readline()) == second
        assert proc.wait(GUARD) == 0


def test_subscribe_interrupted_exits_130_quietly(server: RunningServer) -> None:
    args = ("subscribe", "int", "--since", head(server), "--url", server.url)
    with background(*args) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        event = publish(server, "int", b"1")
        assert orjson.loads(proc.stdout.readline()) == event  # it is inside the event loop now
        proc.send_signal(signal.SIGINT)
        assert proc.wait(GUARD) == 130
        assert proc.stderr.read() == b""


def test_subscribe_reports_lost_continuity_on_stderr(server: RunningServer) -> None:
    args = ("subscribe", "gap", "--since", "zz00:3", "--count", "1", "--url", server.url)
    with background(*args) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        notice = proc.stderr.readline().decode()
        assert notice.startswith("tidings: continuity lost")
        assert "another log epoch" in notice
        event = publish(server, "gap", b"1")
        assert orjson.loads(proc.stdout.readline()) == event
        assert proc.wait(GUARD) == 0


@pytest.mark.parametrize(
    "args",
    [
        ("publish", "orders/*", "1"),
        ("publish", "a//b", "1"),
        ("publish", "a", "{not json", "--content-type", "application/json"),
        ("subscribe", "a/**/b"),
        ("subscribe", "a", "--since", "nonsense"),
        ("subscribe", "a", "--via", "longpoll", "--wait", "100000"),
    ],
)
def test_refused_request_exits_1_with_the_server_detail(
    server: RunningServer, args: Sequence[str]
) -> None:
    result = tidings(*args, "--url", server.url)
    assert result.returncode == 1
    assert result.stdout == b""
    [message] = result.stderr.decode().splitlines()
    assert message.startswith("tidings: ")
    assert len(message) > len("tidings: ")


def test_unreachable_server_exits_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = tidings("publish", "a", "1", "--url", url)
    assert result.returncode == 1
    [message] = result.stderr.decode().splitlines()
    assert message.startswith(f"tidings: cannot reach {url}")


@pytest.mark.parametrize("command", [("publish", "a", "1"), ("subscribe", "a")])
@pytest.mark.parametrize("how", ["option", "environment"])
def test_bad_url_is_a_configuration_error_exit_2(command: Sequence[str], how: str) -> None:
    if how == "option":
        result = tidings(*command, "--url", "ftp://example.com")
    else:
        result = tidings(*command, env=environment(TIDINGS_URL="localhost:8080"))
    assert result.returncode == 2
    [message] = result.stderr.decode().splitlines()
    assert message.startswith("tidings: configuration error:")


@pytest.mark.parametrize(
    "args",
    [
        ("subscribe",),
        ("subscribe", "a", "--via", "carrier-pigeon"),
        ("subscribe", "a", "--count", "0"),
        ("subscribe", "a", "--wait", "0"),
        ("publish",),
    ],
)
def test_bad_usage_exits_2(args: Sequence[str]) -> None:
    assert tidings(*args).returncode == 2


def test_status_shows_the_cursor_and_subscribers(server: RunningServer) -> None:
    publish(server, "orders/1", b"1")
    result = tidings("status", "--url", server.url)
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.decode().splitlines()  # no relay configured: no relay lines
    assert line.startswith(f"{server.url}: ok  cursor {head(server)}  subscribers 0")
    as_json = tidings("status", "--json", "--url", server.url)
    assert orjson.loads(as_json.stdout)["cursor"] == head(server)


def test_status_of_an_unreachable_server_exits_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = tidings("status", "--url", url)
    assert result.returncode == 1
    [message] = result.stderr.decode().splitlines()
    assert message.startswith(f"tidings: cannot read {url}/healthz")


def test_serve_refuses_a_relay_url_of_the_wrong_scheme() -> None:
    result = tidings("serve", "--port", "0", "--mqtt", "http://127.0.0.1:1883")
    assert result.returncode == 2
    assert result.stderr.decode().strip() == (
        "tidings: configuration error: mqtt.url must start with mqtt:// or mqtts://, "
        "not 'http://127.0.0.1:1883'"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cluster", "http://10.0.0.5:6379"],
         "--log/--cluster 'http://10.0.0.5:6379': use sqlite, memory, a redis:// URL or "
         "a nats:// URL"),
        (["--log", "redis"],
         "log.backend = 'redis' needs log.url starting with redis:// or rediss:// or unix://, "
         "not ''"),
        (["--log", "cassandra"], None),
    ],
)  # fmt: skip
def test_serve_refuses_a_cluster_url_it_cannot_use(args: list[str], message: str | None) -> None:
    result = tidings("serve", "--port", "0", *args)
    assert result.returncode == 2
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("tidings: configuration error: ")
    if message is not None:
        assert line == f"tidings: configuration error: {message}"
    else:
        assert "log.backend" in line and "cassandra" in line


def test_serve_says_so_when_the_cluster_engine_is_unreachable() -> None:
    result = tidings("serve", "--port", "0", "--cluster", f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 2
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("tidings: configuration error: log: cannot use Redis at redis://")
