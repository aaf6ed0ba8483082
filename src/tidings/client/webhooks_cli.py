"""``tidings webhooks …``: manage webhook endpoints from the command line, over the admin API.

Rules:
- Output is one JSON line per object (an endpoint, an attempt, a failed event…) on stdout, so
  the commands compose with ``jq``; notes and problems go to stderr as ``tidings: …`` lines.
- Exit codes are ``tidings.cli``'s: 1 for a refused request or an unreachable server, 2 for bad
  usage. Options are checked before any request is sent; a bad value is one line on stderr.
- ``--url`` is the server's URL on every command, as for ``publish``; ``update`` takes the
  endpoint's new URL as ``--endpoint-url``. ``--token`` (default ``$TIDINGS_TOKEN``) goes as
  ``Authorization: Bearer``; it needs an admin grant when auth is on.
- ``run(args, transport=…)`` runs a parsed command against any httpx transport (tests).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson

from .. import config
from ..exceptions import ConfigError
from .admin import Webhooks
from .cli import _positive, _printing, _url
from .client import DEFAULT_URL, Client
from .errors import ProtocolError

# What a parsed command does once connected.
Action = Callable[[Webhooks], Awaitable[None]]

# RFC 9110 §5.6.2: a field name is a token.
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class UsageError(Exception):
    """A bad option value or combination: one line on stderr, exit 2."""


def _emit(item: object) -> None:
    sys.stdout.buffer.write(orjson.dumps(item) + b"\n")
    sys.stdout.flush()


def _note(message: str) -> None:
    print(f"tidings: {message}", file=sys.stderr, flush=True)


def _duration(option: str, text: str) -> float:
    try:
        return float(config._coerce(option, config.Duration, text))
    except ConfigError as exc:
        raise UsageError(exc.detail) from None


def _headers(values: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    seen: set[str] = set()
    for text in values:
        name, colon, value = text.partition(":")
        name = name.strip()
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise UsageError(f"--header must be 'Name: value', not {text!r}")
        if name.lower() in seen:
            raise UsageError(f"--header {name!r} is given twice")
        seen.add(name.lower())
        headers[name] = value.strip()
    return headers


def _number(minimum: float, exclusive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        ok = value > minimum if exclusive else value >= minimum
        if not (ok and value < float("inf")):
            bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be a number {bound}, not {text!r}")
        return value

    return parse


def _endpoint_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The endpoint settings given on the command line (create and update), as ``Webhooks``
    keyword arguments; those not given are None, so not sent."""
    types = args.types
    if getattr(args, "all_types", False):
        types = []
    headers = _headers(args.headers) if args.headers else None
    if getattr(args, "no_headers", False):
        headers = {}
    return {
        "channels": args.channels,
        "types": types,
        "description": args.description,
        "headers": headers,
        "rate_limit": args.rate_limit,
        "concurrency": args.concurrency,
        "strict_order": args.strict_order,
        "timeout": None if args.timeout is None else _duration("--timeout", args.timeout),
        "enabled": args.enabled,
    }


def _create(args: argparse.Namespace) -> Action:
    fields = _endpoint_fields(args)
    channels = fields.pop("channels")

    async def create(hooks: Webhooks) -> None:
        endpoint = await hooks.create(args.endpoint_url, channels, **fields)
        _emit(endpoint)
        _note(f"endpoint {endpoint.get('id')} created; its secret is shown once, above")

    return create


def _update(args: argparse.Namespace) -> Action:
    fields = _endpoint_fields(args)
    if args.endpoint_url is not None:
        fields["url"] = args.endpoint_url
    if all(value is None for value in fields.values()):
        raise UsageError("update: nothing to change; give at least one option")

    async def update(hooks: Webhooks) -> None:
        _emit(await hooks.update(args.id, **fields))

    return update


def _set_enabled(enabled: bool) -> Callable[[argparse.Namespace], Action]:
    def prepare(args: argparse.Namespace) -> Action:
        async def set_enabled(hooks: Webhooks) -> None:
            _emit(await hooks.update(args.id, enabled=enabled))

        return set_enabled

    return prepare


def _list(args: argparse.Namespace) -> Action:
    async def list_(hooks: Webhooks) -> None:
        for endpoint in await hooks.list():
            _emit(endpoint)

    return list_


def _show(args: argparse.Namespace) -> Action:
    async def show(hooks: Webhooks) -> None:
        _emit(await hooks.get(args.id))

    return show


def _delete(args: argparse.Namespace) -> Action:
    async def delete(hooks: Webhooks) -> None:
        _emit(await hooks.delete(args.id))

    return delete


def _rotate(args: argparse.Namespace) -> Action:
    grace = None if args.grace is None else _duration("--grace", args.grace)

    async def rotate(hooks: Webhooks) -> None:
        _emit(await hooks.rotate(args.id, grace=grace, secret=args.secret))

    return rotate


def _attempts(args: argparse.Namespace) -> Action:
    async def attempts(hooks: Webhooks) -> None:
        async for attempt in hooks.each_attempt(args.id, event=args.event, limit=args.limit):
            _emit(attempt)

    return attempts


def _failed(args: argparse.Namespace) -> Action:
    async def failed(hooks: Webhooks) -> None:
        async for item in hooks.each_failed(args.id, limit=args.limit):
            _emit(item)

    return failed


def _replay(args: argparse.Namespace) -> Action:
    ranges = {
        "--since": args.since,
        "--until": args.until,
        "--from": args.from_time,
        "--to": args.to_time,
    }
    if args.event is not None and any(value is not None for value in ranges.values()):
        given = ", ".join(name for name, value in ranges.items() if value is not None)
        raise UsageError(f"replay: --event names one event; it does not go with {given}")

    async def replay(hooks: Webhooks) -> None:
        answer = await hooks.replay(
            args.id,
            event=args.event,
            since=args.since,
            until=args.until,
            from_time=args.from_time,
            to_time=args.to_time,
            failed_only=args.failed or None,
            dry_run=args.dry_run or None,
            rate=args.rate,
        )
        if args.dry_run:
            _emit(answer)
            return
        job = answer.get("replay")
        if not isinstance(job, dict):
            raise ProtocolError("protocol", "the replay answer has no 'replay' job object")
        _emit(job)

    return replay


_ACTIONS: dict[str, Callable[[argparse.Namespace], Action]] = {
    "create": _create,
    "list": _list,
    "show": _show,
    "update": _update,
    "enable": _set_enabled(True),
    "disable": _set_enabled(False),
    "rotate": _rotate,
    "delete": _delete,
    "attempts": _attempts,
    "failed": _failed,
    "replay": _replay,
}


def run(args: argparse.Namespace, transport: httpx.AsyncBaseTransport | None = None) -> int:
    """Run a parsed ``tidings webhooks`` command; returns the exit code.

    Raises ``ConfigError`` for a bad ``--url`` (``tidings.cli`` reports it, exit 2).
    """
    url = _url(args)
    try:
        action = _ACTIONS[args.action](args)
    except UsageError as exc:
        _note(str(exc))
        return 2
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None

    async def main() -> None:
        async with Client(url, headers=headers, transport=transport) as client:
            await action(Webhooks(client))

    return _printing(main())


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("TIDINGS_URL") or DEFAULT_URL,
        help=f"server URL (default: $TIDINGS_URL or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("TIDINGS_TOKEN") or None,
        help="bearer token or API key with an admin grant (default: $TIDINGS_TOKEN)",
    )


def _endpoint_options(parser: argparse.ArgumentParser, *, update: bool) -> None:
    """The endpoint settings of ``create``; for ``update`` all optional, with ways to undo."""
    parser.add_argument(
        "--channel",
        dest="channels",
        action="append",
        required=not update,
        metavar="PATTERN",
        help="deliver events on channels matching PATTERN; repeat for more"
        + ("; replaces the list" if update else ""),
    )
    types = parser.add_mutually_exclusive_group() if update else parser
    types.add_argument(
        "--type",
        dest="types",
        action="append",
        metavar="TYPE",
        help="deliver only events of this type; repeat for more (default: every type)",
    )
    if update:
        types.add_argument("--all-types", action="store_true", help="drop the type filter")
    parser.add_argument("--description", metavar="TEXT", help="a note for people")
    headers = parser.add_mutually_exclusive_group() if update else parser
    headers.add_argument(
        "--header",
        dest="headers",
        action="append",
        metavar="'NAME: VALUE'",
        help="send this header with every delivery; repeat for more"
        + ("; replaces them all" if update else ""),
    )
    if update:
        headers.add_argument("--no-headers", action="store_true", help="send no extra headers")
    parser.add_argument(
        "--rate-limit",
        metavar="N",
        type=_number(0, exclusive=False),
        help="at most N attempts per second (0: no limit)",
    )
    parser.add_argument(
        "--concurrency", metavar="N", type=_positive, help="at most N attempts at once"
    )
    order = parser.add_mutually_exclusive_group()
    order.add_argument(
        "--strict-order",
        dest="strict_order",
        action="store_const",
        const=True,
        help="deliver one event at a time, in cursor order",
    )
    if update:
        order.add_argument(
            "--no-strict-order",
            dest="strict_order",
            action="store_const",
            const=False,
            help="deliver events concurrently, up to --concurrency",
        )
    parser.add_argument(
        "--timeout", metavar="SECONDS", help="per attempt, e.g. 10, 500ms, 30s (a duration)"
    )
    enabled = parser.add_mutually_exclusive_group()
    enabled.add_argument(
        "--disabled",
        dest="enabled",
        action="store_const",
        const=False,
        help="deliver nothing until enabled",
    )
    if update:
        enabled.add_argument(
            "--enabled", dest="enabled", action="store_const", const=True, help="deliver again"
        )


def add_commands(commands: Any) -> None:
    """Add ``webhooks`` and its actions to the ``tidings`` command's subparsers."""
    webhooks = commands.add_parser(
        "webhooks",
        help="manage webhook endpoints (admin)",
        description="Create, inspect, change and replay webhook endpoints through the server's "
        "admin API. Prints one JSON line per object.",
    )
    actions = webhooks.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help: str, *, with_id: bool = True) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help, description=help)
        if with_id:
            parser.add_argument("id", metavar="ID", help="the endpoint's id")
        _server_options(parser)
        return parser

    create = action(
        "create", "register an endpoint; prints it with its secret, once", with_id=False
    )
    create.add_argument("endpoint_url", metavar="URL", help="where to POST events")
    _endpoint_options(create, update=False)
    action("list", "one JSON line per endpoint", with_id=False)
    action("show", "one endpoint")
    update = action("update", "change an endpoint's settings; prints it")
    update.add_argument("--endpoint-url", metavar="URL", help="POST events here from now on")
    _endpoint_options(update, update=True)
    action("enable", "resume deliveries to an endpoint")
    action("disable", "pause deliveries to an endpoint")
    rotate = action("rotate", "sign with a new secret; prints it, once")
    rotate.add_argument(
        "--grace",
        metavar="DURATION",
        help="the old secret signs too for this long, e.g. 24h, 30m, 0 (default: the server's)",
    )
    rotate.add_argument("--secret", metavar="whsec_…", help="this secret instead of a new one")
    action("delete", "delete an endpoint; prints what it was")
    attempts = action("attempts", "delivery attempts, newest first")
    attempts.add_argument("--event", metavar="CURSOR", help="only this event's attempts")
    attempts.add_argument("--limit", metavar="N", type=_positive, help="at most N (default: all)")
    failed = action("failed", "events given up on")
    failed.add_argument("--limit", metavar="N", type=_positive, help="at most N (default: all)")
    replay = action(
        "replay",
        "deliver past events again: one (--event) or a range; prints the replay job",
    )
    replay.add_argument("--event", metavar="CURSOR", help="just this event")
    replay.add_argument("--since", metavar="CURSOR", help="events after this cursor")
    replay.add_argument("--until", metavar="CURSOR", help="events up to this cursor")
    replay.add_argument(
        "--from", dest="from_time", metavar="TIME", help="events from this RFC 3339 or unix time"
    )
    replay.add_argument(
        "--to", dest="to_time", metavar="TIME", help="events up to this RFC 3339 or unix time"
    )
    replay.add_argument("--failed", action="store_true", help="only events given up on")
    replay.add_argument(
        "--dry-run", action="store_true", help='print {"events": N}, how many; replay nothing'
    )
    replay.add_argument(
        "--rate", metavar="N", type=_number(0, exclusive=True), help="at most N events per second"
    )
    webhooks.set_defaults(handler=run)
