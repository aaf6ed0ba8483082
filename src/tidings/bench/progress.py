"""A progress bar on stderr: one line redrawn with ``\\r`` on a terminal, a plain line per
step otherwise (a log file gets no control characters)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def bar(fraction: float, width: int = 24) -> str:
    """``[#########---------------]`` for ``fraction`` in 0..1."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


class ProgressBar:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.last_step = ""
        self.drawn = False

    def update(self, fraction: float, step: str) -> None:
        if self.tty:
            elapsed = clock(time.monotonic() - self.started)
            line = f"\r{bar(fraction)} {fraction:4.0%}  {elapsed}  {step}"
            self.stream.write(line[:200] + "\x1b[K")
            self.stream.flush()
            self.drawn = True
        elif step != self.last_step:
            self.stream.write(f"tidings bench: {fraction:4.0%} {step}\n")
            self.stream.flush()
        self.last_step = step

    def note(self, message: str) -> None:
        """A line of its own, above the bar."""
        self.clear()
        self.stream.write(message + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False
