"""``GET /openapi.json`` describes exactly the routes the app serves, and is a sound document."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from conftest import RunningServer
from tidings import __version__

# HEAD is served implicitly for every GET (Starlette adds it); OpenAPI does not list it.
IMPLICIT = {"HEAD"}


@pytest.fixture
def document(server: RunningServer) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    return body


def served_routes(server: RunningServer) -> dict[str, set[str]]:
    """Path template (OpenAPI style, converters stripped) -> methods, from the live app."""
    routes: dict[str, set[str]] = {}
    for route in server.node.app.routes:
        assert isinstance(route, Route), f"unexpected route type {route!r}"
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        routes.setdefault(path, set()).update(m for m in route.methods or () if m not in IMPLICIT)
    return routes


def test_document_lists_every_served_route_and_method(
    server: RunningServer, document: dict[str, Any]
) -> None:
    described = {
        path: {method.upper() for method in item} for path, item in document["paths"].items()
    }
    assert described == served_routes(server)


def test_document_header_and_version(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    assert document["info"]["title"] == "tidings"
    assert document["info"]["version"] == __version__


def test_every_path_parameter_is_declared(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        names = set(re.findall(r"\{(\w+)\}", path))
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == names, (path, method)
            for p in operation.get("parameters", []):
                if p["in"] == "path":
                    assert p["required"] is True


def test_every_operation_has_a_summary_and_responses(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation.get("summary"), (path, method)
            assert operation.get("responses"), (path, method)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        for value in node.values():
            found.extend(_refs(value))
        return found
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    refs = _refs(document)
    assert refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        node: Any = document
        for part in ref[2:].split("/"):
            assert part in node, f"{ref} does not resolve"
            node = node[part]


QUERY_CHECKED = {("/channels/{channel}", "post"), ("/publish", "post"), ("/history", "get"),
                 ("/poll", "get"), ("/sse", "get")}  # fmt: skip


@pytest.mark.parametrize(("path", "method"), sorted(QUERY_CHECKED))
def test_documented_query_parameters_are_the_ones_the_endpoint_accepts(
    server: RunningServer, document: dict[str, Any], path: str, method: str
) -> None:
    # An unknown parameter is refused with 400, and the refusal lists what is accepted.
    operation = document["paths"][path][method]
    documented = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
    url = path.replace("{channel}", "doc")
    response = httpx.request(
        method, f"{server.url}{url}", params={"channel": "a", "zz_undocumented": "1"}, timeout=10
    )
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "zz_undocumented" in detail or "'channel'" in detail
    accepted = {n.strip() for n in detail.partition("accepts:")[2].split(",") if n.strip()}
    assert accepted == documented


def test_event_schema_names_the_fields_a_published_event_has(
    server: RunningServer, document: dict[str, Any]
) -> None:
    schema = document["components"]["schemas"]["Event"]
    event = httpx.post(f"{server.url}/channels/doc", json={"x": 1}, timeout=10).json()
    assert set(schema["required"]) <= set(event)
    assert set(event) <= set(schema["properties"])
    page = httpx.get(f"{server.url}/history", params={"channel": "doc"}, timeout=10).json()
    page_schema = document["components"]["schemas"]["Page"]
    assert set(page_schema["required"]) <= set(page) <= set(page_schema["properties"])
