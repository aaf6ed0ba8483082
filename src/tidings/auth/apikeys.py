"""API keys for services: shown once, stored hashed in a JSON file, revocable.

Rules:
- A key is ``tdk_<id>_<secret>``: the id (public, listed) finds the record, the secret (32
  random bytes) is never stored, only the SHA-256 of the whole key. Keys are random, not chosen
  by people, so a fast hash is enough (no password stretching needed); comparison is constant
  time.
- Verification is a dict lookup and one hash: no I/O on the request path. The file is read at
  start-up and re-read when it changes (``watch``), so ``tidings keys …`` run beside a live
  server takes effect within seconds.
- Writers (the CLI, the admin API) take an exclusive lock on ``<file>.lock`` and replace the
  file atomically, so concurrent writers never lose each other's changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import orjson

from ..events import Pattern, format_time, parse_patterns
from ..exceptions import ConfigError, NotFound, TidingsError, Unauthorized
from ..periodic import every
from .grants import Grant

PREFIX = "tdk_"
_KEY = re.compile(r"tdk_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")


@dataclass(frozen=True)
class KeyRecord:
    id: str
    hash: str
    subject: str
    subscribe: tuple[str, ...]
    publish: tuple[str, ...]
    admin: bool = False
    description: str = ""
    created: float = 0.0
    revoked: float | None = None

    def grant(self) -> Grant:
        return Grant(
            subject=self.subject,
            subscribe=tuple(Pattern.parse(p) for p in self.subscribe),
            publish=tuple(Pattern.parse(p) for p in self.publish),
            admin=self.admin,
        )

    def public(self) -> dict[str, object]:
        """What listing shows: everything but the hash."""
        shown = asdict(self)
        del shown["hash"]
        shown["created"] = format_time(self.created)
        shown["revoked"] = None if self.revoked is None else format_time(self.revoked)
        return shown


def _record(fields: dict[str, Any]) -> KeyRecord:
    """A record from the file, where JSON made the pattern tuples lists."""
    return KeyRecord(
        **{**fields, "subscribe": tuple(fields["subscribe"]), "publish": tuple(fields["publish"])}
    )


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._records: dict[str, KeyRecord] = {}
        self._grants: dict[str, Grant] = {}
        self._mtime: float | None = None

    # -- reading ---------------------------------------------------------------------------

    def load(self) -> None:
        """(Re)read the file; a missing file is an empty store."""
        try:
            mtime = os.stat(self.path).st_mtime
            with open(self.path, "rb") as fh:
                document = orjson.loads(fh.read())
        except FileNotFoundError:
            self._records, self._grants, self._mtime = {}, {}, None
            return
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ConfigError(f"auth.api_keys_file {self.path}: unreadable: {exc}") from None
        try:
            records = {r["id"]: _record(r) for r in document["keys"]}
            grants = {i: r.grant() for i, r in records.items() if r.revoked is None}
        except (KeyError, TypeError, TidingsError) as exc:
            raise ConfigError(f"auth.api_keys_file {self.path}: malformed: {exc}") from None
        self._records, self._grants, self._mtime = records, grants, mtime

    def changed(self) -> bool:
        try:
            return os.stat(self.path).st_mtime != self._mtime
        except FileNotFoundError:
            return self._mtime is not None

    async def watch(self, stopping: asyncio.Event, interval: float = 2.0) -> None:
        """Re-read the file when it changes, until ``stopping`` (owned by the server)."""
        async for _ in every(interval, stopping):
            if self.changed():
                with contextlib.suppress(ConfigError):  # keep serving the last good keys
                    self.load()

    def verify(self, key: str) -> Grant:
        match = _KEY.fullmatch(key)
        if match is None:
            raise Unauthorized("malformed API key: expected tdk_<id>_<secret>")
        record = self._records.get(match.group(1))
        if record is None or not hmac.compare_digest(record.hash, _digest(key)):
            raise Unauthorized("unknown API key")
        if record.revoked is not None:
            raise Unauthorized(f"API key {record.id} was revoked at {format_time(record.revoked)}")
        return self._grants[record.id]

    def list(self) -> list[KeyRecord]:
        return sorted(self._records.values(), key=lambda r: r.created)

    # -- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, KeyRecord]]:
        """Lock, re-read, let the caller change the records, write atomically."""
        with open(self.path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.load()
            records = dict(self._records)
            yield records
            document = {"keys": [asdict(r) for r in records.values()]}
            temporary = f"{self.path}.{os.getpid()}.tmp"
            with open(temporary, "wb") as fh:
                fh.write(orjson.dumps(document, option=orjson.OPT_INDENT_2))
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)
            self.load()

    def create(
        self,
        subject: str,
        *,
        subscribe: Sequence[str] = (),
        publish: Sequence[str] = (),
        admin: bool = False,
        description: str = "",
    ) -> tuple[str, KeyRecord]:
        """A new key and its record; the key itself is returned this once and never again."""
        for patterns in (subscribe, publish):
            if patterns:
                parse_patterns(patterns)
        if not subject:
            raise ConfigError("an API key needs a subject (who it is for)")
        key_id = secrets.token_hex(6)
        key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        record = KeyRecord(
            id=key_id,
            hash=_digest(key),
            subject=subject,
            subscribe=tuple(subscribe),
            publish=tuple(publish),
            admin=admin,
            description=description,
            created=time.time(),
        )
        with self._editing() as records:
            records[key_id] = record
        return key, record

    def revoke(self, key_id: str) -> KeyRecord:
        with self._editing() as records:
            record = records.get(key_id)
            if record is None:
                raise NotFound(f"no API key with id {key_id[:40]!r}")
            if record.revoked is None:
                record = records[key_id] = replace(record, revoked=time.time())
        return record
