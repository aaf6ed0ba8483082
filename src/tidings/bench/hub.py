"""The hub under test: ``python -m tidings serve`` on a fresh SQLite file (pinned with
``taskset`` when there are cores to spare), or one already running at ``--url``.

Synchronous on purpose: the controller only starts, waits and stops; the load generator does
the I/O in its own process.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# The generator is one address publishing and subscribing far past the per-address defaults
# of [limits]: the benchmark measures the hub, not its rate limiter.
UNLIMITED = {
    "TIDINGS_LIMITS_PUBLISH_RATE": "0",
    "TIDINGS_LIMITS_SUBSCRIBE_RATE": "0",
    "TIDINGS_LIMITS_MAX_STREAMS_PER_ADDRESS": "0",
}
WEBHOOKS_TO_LOOPBACK = {
    "TIDINGS_WEBHOOKS_ALLOW_HTTP": "true",
    "TIDINGS_WEBHOOKS_ALLOWED_NETWORKS": "127.0.0.1/32",
}


class Unreachable(Exception):
    """The hub (or a broker) does not answer."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def answers(host: str, port: int, within: float = 2.0) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=within):
            return True
    except OSError:
        return False


def get_json(host: str, port: int, path: str, within: float = 5.0) -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=within)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise Unreachable(f"GET {path} answered {response.status}")
        answer: dict[str, Any] = json.loads(body)
        return answer
    finally:
        conn.close()


def split_url(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return parts.hostname or "127.0.0.1", parts.port or default_port


class Hub:
    """Where the hub listens, and its process when the benchmark owns it."""

    def __init__(self, host: str, port: int, grpc_port: int, pid: int | None) -> None:
        self.host, self.port, self.grpc_port, self.pid = host, port, grpc_port, pid

    def health(self) -> dict[str, Any]:
        return get_json(self.host, self.port, "/healthz")

    def stop(self) -> None:
        """Nothing to stop: the hub is someone else's."""

    def log(self) -> str:
        return ""


class RemoteHub(Hub):
    """A hub already running at ``--url`` (``--pid`` lets its CPU and memory be read)."""

    @classmethod
    def attach(cls, url: str, grpc_port: int, pid: int | None) -> RemoteHub:
        host, port = split_url(url, 80)
        hub = cls(host, port, grpc_port or 50051, pid)
        try:
            hub.health()
        except (OSError, Unreachable, ValueError) as exc:
            raise Unreachable(f"cannot reach {url} ({exc})") from exc
        if pid is not None and not Path(f"/proc/{pid}/stat").exists():
            raise Unreachable(f"no process {pid} to measure (--pid)")
        return hub


class LocalHub(Hub):
    """``[taskset -c CORE] python -m tidings serve`` on a fresh temporary SQLite file."""

    def __init__(
        self,
        cores: list[int],
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__("127.0.0.1", free_port(), free_port(), None)
        self.tmp = tempfile.mkdtemp(prefix="tidings-bench-")
        self.logfile = os.path.join(self.tmp, "server.log")
        command = [
            sys.executable,
            "-m",
            "tidings",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--grpc-port",
            str(self.grpc_port),
            "--db",
            os.path.join(self.tmp, "bench.db"),
            "--durability",
            "normal",
            *args,
        ]
        if cores:
            command = ["taskset", "-c", ",".join(map(str, cores)), *command]
        self.command = command
        # The user's TIDINGS_* settings would make runs incomparable: none are passed on.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
        self.env.update(UNLIMITED)
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, within: float = 30.0) -> LocalHub:
        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(
                self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.tmp
            )
        self.pid = self.proc.pid  # taskset execs the server: the same process
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the hub exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError, Unreachable, ValueError):
                self.health()
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the hub did not answer /healthz within {within:g} s:\n{self.log()}")

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return Path(self.logfile).read_text(errors="replace")[-3000:]
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)
