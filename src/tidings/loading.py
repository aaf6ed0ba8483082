"""Pick implementations by name from small registries of import strings (as uvicorn does)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from .exceptions import ConfigError


def load(registry: Mapping[str, str], name: str, what: str) -> Any:
    """Import and return the object registered under ``name``; ConfigError if unknown."""
    try:
        spec = registry[name]
    except KeyError:
        known = ", ".join(sorted(registry))
        raise ConfigError(f"unknown {what} {name!r}; choose one of: {known}") from None
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise ConfigError(
            f"{what} {name!r} needs a package that is not installed ({exc.name}); "
            f"install the matching extra, e.g. pip install 'tidings[{name}]'"
        ) from None
