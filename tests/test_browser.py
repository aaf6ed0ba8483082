"""A real headless Chromium: EventSource with the token in the query, from an allowed origin and
from one that is not on the list.

Needs Debian's ``chromium``. Without it the tests skip with the reason on a laptop, and fail
under ``CI=true`` (CI must never skip them silently).
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import orjson
import pytest

from conftest import RunningServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECRET = "browser-test-secret-with-32-bytes-or-more"
# Headless, as root, and without the background traffic this closed network refuses.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

if CHROMIUM is None:
    reason = "headless Chromium is not installed (Debian: apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the browser tests", pytrace=False)
    pytestmark = pytest.mark.skip(reason=reason)

PAGE = """<!doctype html><meta charset="utf-8"><title>tidings test</title><script>
const report = (what) => fetch("/report", {method: "POST", body: JSON.stringify(what)});
const source = new EventSource(%(url)s);
source.addEventListener("tidings.subscribed", (e) => report({kind: "subscribed", data: e.data}));
source.onmessage = (e) => report({kind: "message", id: e.lastEventId, data: e.data});
source.onerror = () => report({kind: "error", state: source.readyState});
</script>"""


class PageServer:
    """Serves the test page on its own origin and collects what the page reports."""

    def __init__(self, hub_url: str) -> None:
        self.reports: queue.Queue[dict[str, Any]] = queue.Queue()
        self.hub_url = hub_url
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = (PAGE % {"url": orjson.dumps(outer.sse_url).decode()}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                outer.reports.put(orjson.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.sse_url = ""
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def next_report(self, timeout: float = 30) -> dict[str, Any]:
        try:
            return self.reports.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("the page reported nothing in time") from None

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def token(**grants: Any) -> str:
    claims = {"sub": "browser", "exp": int(time.time()) + 600, "tidings": grants}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
def chromium(tmp_path: Any) -> Iterator[Callable[[str], None]]:
    processes: list[subprocess.Popen[bytes]] = []

    def open_page(url: str) -> None:
        assert CHROMIUM is not None
        profile = tmp_path / f"profile{len(processes)}"
        command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url]
        processes.append(
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )

    yield open_page
    for process in processes:
        process.kill()
        process.wait(10)


@pytest.fixture
def pages() -> Iterator[Callable[[str], PageServer]]:
    servers: list[PageServer] = []

    def start(hub_url: str) -> PageServer:
        servers.append(PageServer(hub_url))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_eventsource_with_a_query_token_from_an_allowed_origin_receives_events(
    make_server: Callable[..., RunningServer],
    pages: Callable[[str], PageServer],
    chromium: Callable[[str], None],
) -> None:
    allowed = pages("")
    hub = make_server(
        auth_jwt_algorithms="HS256", auth_jwt_secret=SECRET, http_origins=allowed.origin
    )
    allowed.sse_url = f"{hub.url}/sse?channel=demo/*&token={token(subscribe=['demo/*'])}"
    chromium(allowed.origin + "/")
    opening = allowed.next_report()
    assert opening["kind"] == "subscribed", opening
    assert orjson.loads(opening["data"])["recovered"] is True
    publisher = {"Authorization": f"Bearer {token(publish=['demo/*'])}"}
    sent = httpx.post(f"{hub.url}/channels/demo/news", json={"hi": 1}, headers=publisher)
    assert sent.status_code == 201, sent.text
    got = allowed.next_report()
    assert got["kind"] == "message" and got["id"] == sent.json()["id"]
    assert orjson.loads(got["data"])["data"] == {"hi": 1}


def test_the_same_page_from_an_origin_not_on_the_list_is_refused(
    make_server: Callable[..., RunningServer],
    pages: Callable[[str], PageServer],
    chromium: Callable[[str], None],
) -> None:
    allowed, other = pages(""), pages("")
    hub = make_server(
        auth_jwt_algorithms="HS256", auth_jwt_secret=SECRET, http_origins=allowed.origin
    )
    other.sse_url = f"{hub.url}/sse?channel=demo/*&token={token(subscribe=['demo/*'])}"
    chromium(other.origin + "/")
    refused = other.next_report()
    # A refused EventSource fails for good: readyState CLOSED (2), no reconnect.
    assert refused == {"kind": "error", "state": 2}
    assert hub.hub.subscriber_count == 0
