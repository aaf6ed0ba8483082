"""``tidings webhooks …``: option checks, and the requests sent to a fake admin API.

The fake is an ``httpx.MockTransport`` given to ``webhooks_cli.run``: it records each request
and answers as the API would. End-to-end tests against a real server live elsewhere.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from tidings import cli
from tidings.client import webhooks_cli

SERVER = "http://tidings.test:8080"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the Standard Webhooks spec's example
GUARD = 60  # seconds; a guard against a hang in the subprocess test, not a timing assertion

VIEW = {
    "id": "wh_1",
    "url": "https://example.com/hook",
    "channels": ["orders/**"],
    "types": [],
    "description": "",
    "headers": {},
    "enabled": True,
    "health": "healthy",
    "health_reason": None,
    "failing_since": None,
    "rate_limit": 0,
    "concurrency": 1,
    "strict_order": False,
    "timeout": 10.0,
    "secrets": [{"created": "2026-01-01T00:00:00Z", "expires": None}],
    "cursor": None,
    "created": "2026-01-01T00:00:00Z",
    "updated": "2026-01-01T00:00:00Z",
}


@dataclass
class Sent:
    method: str
    path: str
    params: dict[str, str]
    body: Any
    authorization: str | None


@dataclass
class Result:
    code: int
    out: list[Any]
    err: list[str]
    sent: list[Sent] = field(default_factory=list)


Answer = Callable[[Sent], tuple[int, Any]]


def view_answer(sent: Sent) -> tuple[int, Any]:
    """An endpoint view for any request: enough where only the request matters."""
    return (201 if sent.method == "POST" else 200), {**VIEW, "secret": "whsec_AAAA"}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The parser reads its defaults from the environment when it is built.
    monkeypatch.delenv("TIDINGS_URL", raising=False)
    monkeypatch.delenv("TIDINGS_TOKEN", raising=False)


def tidings(
    capsys: pytest.CaptureFixture[str],
    *argv: str,
    answer: Answer = view_answer,
    url: str | None = SERVER,
) -> Result:
    """Run ``tidings webhooks ARGV`` in-process against the fake; argparse errors exit too."""
    sent: list[Sent] = []

    def handle(request: httpx.Request) -> httpx.Response:
        record = Sent(
            method=request.method,
            path=request.url.raw_path.decode().partition("?")[0],
            params=dict(request.url.params),
            body=orjson.loads(request.content) if request.content else None,
            authorization=request.headers.get("authorization"),
        )
        sent.append(record)
        status, body = answer(record)
        return httpx.Response(status, json=body)

    args = ["webhooks", *argv] + (["--url", url] if url else [])
    try:
        parsed = cli.build_parser().parse_args(args)
        code = webhooks_cli.run(parsed, transport=httpx.MockTransport(handle))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return Result(code, [orjson.loads(line) for line in out.splitlines()], err.splitlines(), sent)


def only(result: Result) -> Sent:
    assert result.code == 0, result.err
    [sent] = result.sent
    return sent


# Options checked before any request

CREATE = ("create", "https://example.com/hook", "--channel", "a")


@pytest.mark.parametrize(
    "argv",
    [
        ("create", "https://example.com/hook"),  # no --channel
        ("create", "--channel", "a"),  # no URL
        ("create", "https://example.com/hook", "--channel", "a", "--concurrency", "0"),
        ("create", "https://example.com/hook", "--channel", "a", "--rate-limit", "-1"),
        ("show",),
        ("update", "wh_1", "--strict-order", "--no-strict-order"),
        ("update", "wh_1", "--type", "a", "--all-types"),
        ("attempts", "wh_1", "--limit", "0"),
        ("replay", "wh_1", "--rate", "0"),
        ("frobnicate", "wh_1"),
    ],
)
def test_bad_usage_exits_2_without_a_request(
    capsys: pytest.CaptureFixture[str], argv: Sequence[str]
) -> None:
    result = tidings(capsys, *argv)
    assert result.code == 2
    assert result.sent == []


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (("rotate", "wh_1", "--grace", "a day"), "--grace"),
        (("rotate", "wh_1", "--grace=-5m"), "--grace"),
        ((*CREATE, "--timeout", "soon"), "--timeout"),
        (("replay", "wh_1", "--event", "e:1", "--since", "e:0"), "--since"),
        (("replay", "wh_1", "--event", "e:1", "--from", "2026-01-01T00:00:00Z"), "--from"),
        ((*CREATE, "--header", "no colon"), "--header"),
        ((*CREATE, "--header", "Bad Name: 1"), "--header"),
        ((*CREATE, "--header", "X-A: 1", "--header", "x-a: 2"), "x-a"),
        (("update", "wh_1"), "nothing to change"),
    ],
)
def test_bad_option_value_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: Sequence[str], mentions: str
) -> None:
    result = tidings(capsys, *argv)
    assert result.code == 2
    assert result.sent == []
    assert result.out == []
    [line] = result.err
    assert line.startswith("tidings: ")
    assert mentions in line


def test_bad_server_url_is_a_configuration_error_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli.main(["webhooks", "list", "--url", "ftp://example.com"])
    [line] = capsys.readouterr().err.splitlines()
    assert code == 2
    assert line.startswith("tidings: configuration error: --url")


# Requests and output


def test_create_sends_every_option_and_prints_the_endpoint_with_its_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = tidings(
        capsys,
        "create",
        "https://example.com/hook",
        "--channel", "orders/**",
        "--channel", "users/*",
        "--type", "paid",
        "--type", "refunded",
        "--description", "billing",
        "--header", "X-Team: billing",
        "--header", "Authorization:Basic Zm9vOmJhcg==",
        "--rate-limit", "2.5",
        "--concurrency", "4",
        "--strict-order",
        "--timeout", "500ms",
        "--disabled",
        "--token", "t0ken",
    )  # fmt: skip
    sent = only(result)
    assert (sent.method, sent.path) == ("POST", "/webhooks")
    assert sent.authorization == "Bearer t0ken"
    assert sent.body == {
        "url": "https://example.com/hook",
        "channels": ["orders/**", "users/*"],
        "types": ["paid", "refunded"],
        "description": "billing",
        "headers": {"X-Team": "billing", "Authorization": "Basic Zm9vOmJhcg=="},
        "rate_limit": 2.5,
        "concurrency": 4,
        "strict_order": True,
        "timeout": 0.5,
        "enabled": False,
    }
    assert result.out == [{**VIEW, "secret": "whsec_AAAA"}]
    assert result.err == ["tidings: endpoint wh_1 created; its secret is shown once, above"]


def test_create_sends_only_the_options_given(capsys: pytest.CaptureFixture[str]) -> None:
    sent = only(tidings(capsys, "create", "https://example.com/hook", "--channel", "a/*"))
    assert sent.body == {"url": "https://example.com/hook", "channels": ["a/*"]}
    assert sent.authorization is None


def test_server_url_and_token_come_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDINGS_URL", "http://elsewhere.test:9000")
    monkeypatch.setenv("TIDINGS_TOKEN", "from-env")

    def answer(sent: Sent) -> tuple[int, Any]:
        return 200, {"endpoints": []}

    result = tidings(capsys, "list", answer=answer, url=None)
    assert only(result).authorization == "Bearer from-env"
    # An empty --token overrides the variable: no Authorization header at all.
    result = tidings(capsys, "list", "--token", "", answer=answer, url=None)
    assert only(result).authorization is None


def test_list_prints_one_line_per_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    endpoints = [{**VIEW, "id": "wh_1"}, {**VIEW, "id": "wh_2"}]
    result = tidings(capsys, "list", answer=lambda sent: (200, {"endpoints": endpoints}))
    sent = only(result)
    assert (sent.method, sent.path, sent.body) == ("GET", "/webhooks", None)
    assert result.out == endpoints


@pytest.mark.parametrize(
    ("argv", "method", "body"),
    [
        (("show", "wh_1"), "GET", None),
        (("delete", "wh_1"), "DELETE", None),
        (("enable", "wh_1"), "PATCH", {"enabled": True}),
        (("disable", "wh_1"), "PATCH", {"enabled": False}),
    ],
)
def test_one_endpoint_commands_print_the_view(
    capsys: pytest.CaptureFixture[str], argv: Sequence[str], method: str, body: Any
) -> None:
    result = tidings(capsys, *argv, answer=lambda sent: (200, VIEW))
    sent = only(result)
    assert (sent.method, sent.path, sent.body) == (method, "/webhooks/wh_1", body)
    assert result.out == [VIEW]
    assert result.err == []


def test_an_id_is_sent_as_one_path_segment(capsys: pytest.CaptureFixture[str]) -> None:
    assert only(tidings(capsys, "show", "a/../b?c")).path == "/webhooks/a%2F..%2Fb%3Fc"
    assert only(tidings(capsys, "show", "..")).path == "/webhooks/%2E%2E"


@pytest.mark.parametrize(
    ("argv", "body"),
    [
        (("--endpoint-url", "https://new.example.com/h"), {"url": "https://new.example.com/h"}),
        (("--channel", "a", "--channel", "b"), {"channels": ["a", "b"]}),
        (("--no-strict-order",), {"strict_order": False}),
        (("--strict-order",), {"strict_order": True}),
        (("--all-types",), {"types": []}),
        (("--no-headers",), {"headers": {}}),
        (("--header", "X-A: 1"), {"headers": {"X-A": "1"}}),
        (("--description", ""), {"description": ""}),
        (("--timeout", "30s", "--rate-limit", "0"), {"timeout": 30.0, "rate_limit": 0.0}),
        (("--enabled",), {"enabled": True}),
    ],
)
def test_update_sends_only_what_changes(
    capsys: pytest.CaptureFixture[str], argv: Sequence[str], body: dict[str, Any]
) -> None:
    result = tidings(capsys, "update", "wh_1", *argv, answer=lambda sent: (200, VIEW))
    sent = only(result)
    assert (sent.method, sent.path, sent.body) == ("PATCH", "/webhooks/wh_1", body)
    assert result.out == [VIEW]


@pytest.mark.parametrize(
    ("argv", "body"),
    [
        ((), {}),
        (("--grace", "24h"), {"grace": 86400.0}),
        (("--grace", "30m"), {"grace": 1800.0}),
        (("--grace", "0"), {"grace": 0.0}),
        (("--secret", SECRET), {"secret": SECRET}),
    ],
)  # fmt: skip
def test_rotate_sends_grace_in_seconds_and_prints_the_new_secret(
    capsys: pytest.CaptureFixture[str], argv: Sequence[str], body: dict[str, Any]
) -> None:
    rotated = {**VIEW, "secret": "whsec_BBBB"}
    result = tidings(capsys, "rotate", "wh_1", *argv, answer=lambda sent: (200, rotated))
    sent = only(result)
    assert (sent.method, sent.path, sent.body) == ("POST", "/webhooks/wh_1/rotate", body)
    assert result.out == [rotated]


def attempt(n: int) -> dict[str, Any]:
    return {
        "id": f"at_{n}",
        "event": f"e:{n}",
        "number": 1,
        "time": "2026-01-01T00:00:00Z",
        "duration": 0.01,
        "status": 500,
        "error": None,
        "response": "oops",
        "outcome": "retry",
        "reason": "HTTP 500",
        "trigger": "delivery",
    }


def attempts_server(total: int, page: int) -> Answer:
    """Attempts at_{total}…at_1, newest first, ``page`` at most per answer."""

    def answer(sent: Sent) -> tuple[int, Any]:
        start = (
            int(sent.params["before"].removeprefix("at_")) - 1 if "before" in sent.params else total
        )
        size = min(page, int(sent.params.get("limit", page)))
        numbers = list(range(start, max(start - size, 0), -1))
        following = f"at_{numbers[-1]}" if numbers and numbers[-1] > 1 else None
        return 200, {"attempts": [attempt(n) for n in numbers], "next": following}

    return answer


def test_attempts_follows_next_until_the_last_page(capsys: pytest.CaptureFixture[str]) -> None:
    result = tidings(capsys, "attempts", "wh_1", "--event", "e:7", answer=attempts_server(5, 2))
    assert result.code == 0
    assert [a["id"] for a in result.out] == ["at_5", "at_4", "at_3", "at_2", "at_1"]
    assert [s.path for s in result.sent] == ["/webhooks/wh_1/attempts"] * 3
    assert [s.params for s in result.sent] == [
        {"event": "e:7"},
        {"event": "e:7", "before": "at_4"},
        {"event": "e:7", "before": "at_2"},
    ]


def test_attempts_stops_at_the_limit_and_asks_for_no_more(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = tidings(capsys, "attempts", "wh_1", "--limit", "3", answer=attempts_server(9, 2))
    assert [a["id"] for a in result.out] == ["at_9", "at_8", "at_7"]
    assert [s.params for s in result.sent] == [{"limit": "3"}, {"limit": "1", "before": "at_8"}]


def test_attempts_asks_for_pages_of_at_most_100(capsys: pytest.CaptureFixture[str]) -> None:
    result = tidings(capsys, "attempts", "wh_1", "--limit", "5000", answer=attempts_server(3, 100))
    assert result.sent[0].params == {"limit": "100"}
    assert len(result.out) == 3


def test_a_next_that_does_not_move_is_an_error_not_a_loop(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stuck = {"attempts": [attempt(1)], "next": "at_1"}
    result = tidings(capsys, "attempts", "wh_1", answer=lambda sent: (200, stuck))
    assert result.code == 1
    assert len(result.sent) == 2
    [line] = result.err
    assert line.startswith("tidings: ") and "next" in line


def test_failed_follows_next_with_after(capsys: pytest.CaptureFixture[str]) -> None:
    pages = {
        None: {"failed": [{"event": "e:1", "time": "t", "reason": "gone"}], "next": "e:1"},
        "e:1": {"failed": [{"event": "e:4", "time": "t", "reason": "HTTP 410"}], "next": None},
    }
    result = tidings(
        capsys, "failed", "wh_1", answer=lambda sent: (200, pages[sent.params.get("after")])
    )
    assert result.code == 0
    assert [f["event"] for f in result.out] == ["e:1", "e:4"]
    assert [(s.method, s.path) for s in result.sent] == [("GET", "/webhooks/wh_1/failed")] * 2


def test_replay_of_a_range_sends_times_as_given_and_prints_the_job(
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = {"id": "rp_1", "events": 12, "state": "running"}
    result = tidings(
        capsys,
        "replay", "wh_1",
        "--since", "e:10",
        "--until", "e:90",
        "--from", "2026-01-01T00:00:00Z",
        "--to", "1767312000",
        "--failed",
        "--rate", "5",
        answer=lambda sent: (202, {"replay": job}),
    )  # fmt: skip
    sent = only(result)
    assert (sent.method, sent.path) == ("POST", "/webhooks/wh_1/replay")
    assert sent.body == {
        "since": "e:10",
        "until": "e:90",
        "from": "2026-01-01T00:00:00Z",
        "to": "1767312000",
        "failed_only": True,
        "rate": 5.0,
    }
    assert result.out == [job]


def test_replay_dry_run_prints_the_count(capsys: pytest.CaptureFixture[str]) -> None:
    result = tidings(
        capsys, "replay", "wh_1", "--event", "e:7", "--dry-run",
        answer=lambda sent: (200, {"events": 1}),
    )  # fmt: skip
    assert only(result).body == {"event": "e:7", "dry_run": True}
    assert result.out == [{"events": 1}]


def test_refused_request_exits_1_with_the_server_detail(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def answer(sent: Sent) -> tuple[int, Any]:
        return 403, {"error": "forbidden", "detail": "managing webhooks needs an admin grant"}

    result = tidings(capsys, "list", "--token", "not-admin", answer=answer)
    assert result.code == 1
    assert result.out == []
    assert result.err == ["tidings: managing webhooks needs an admin grant"]


def test_unreachable_server_exits_1_as_a_real_command() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: refused
        result = subprocess.run(
            [sys.executable, "-m", "tidings", "webhooks", "list", "--url", url],
            capture_output=True,
            timeout=GUARD,
            env={k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")},
            check=False,
        )
    assert result.returncode == 1
    [line] = result.stderr.decode().splitlines()
    assert line.startswith(f"tidings: cannot reach {url}")
