"""``tidings serve`` as a process of its own, for the tests that ``kill -9`` it or signal it.

The in-process server for everything else is conftest's ``RunningServer``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

STARTUP = 20.0  # seconds for a fresh interpreter to import everything and listen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Serve:
    """``python -m tidings serve --port <free> --db <db> *args``, its output kept in
    ``directory/serve-<port>.log`` for failure reports.

    Its environment is this one without any ``TIDINGS_*`` variable, plus ``env``. Unless
    ``wait`` is false, the constructor returns once ``/healthz`` answers.
    """

    def __init__(
        self,
        db: Path,
        directory: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = directory / f"serve-{self.port}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
        environ.update(env or {})
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tidings", "serve", "--port", str(self.port),
                 "--db", str(db), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=environ,
            )  # fmt: skip
        if wait:
            self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"tidings exited {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"tidings did not answer /healthz within {STARTUP} s: {self.log()}")

    def log(self) -> str:
        return self.output.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
