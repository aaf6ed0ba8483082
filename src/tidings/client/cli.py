"""Placeholder replaced by the client CLI."""

from __future__ import annotations

from typing import Any


def add_commands(commands: Any) -> None:
    pass
