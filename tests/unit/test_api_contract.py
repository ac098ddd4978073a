"""What Schemathesis found wrong with the API against its description (issue 16), one test
each, so each stays fixed even where the fuzzer's seed would not reach it again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lovd.web.app import load_openapi
from tests.unit.conftest import Api, open_api
from tests.unit.test_api import check_schema, problem

SID = "0123456789abcdef"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/api/sessions", {"GET", "HEAD", "POST"}),
        ("TRACE", f"/api/sessions/{SID}", {"GET", "HEAD", "DELETE"}),
        ("POST", f"/api/sessions/{SID}/health", {"GET", "HEAD"}),
        ("GET", f"/api/sessions/{SID}/stop", {"POST"}),
        ("GET", "/api/cleanup", {"POST"}),
        ("DELETE", "/api/health", {"GET", "HEAD"}),
        ("POST", "/api/livez", {"GET", "HEAD"}),
        ("PATCH", "/metrics", {"GET", "HEAD"}),
        ("PUT", f"/c/{SID}", {"GET", "HEAD", "POST"}),
    ],
)
async def test_every_405_says_what_is_allowed(
    api: Api, method: str, path: str, allow: set[str]
) -> None:
    r = await api.client.request(method, path)
    body = await problem(r, 405)
    assert {m.strip() for m in r.headers["Allow"].split(",")} == allow
    assert method in body["detail"] and "allowed:" in body["detail"]


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/api/sessions/0/health", "/api/sessions/{id}/health"),
        ("/api/sessions/ABCDEF0123456789/health", "/api/sessions/{id}/health"),
        ("/api/sessions/0", "/api/sessions/{id}"),
        ("/c/0?token=x", "/c/{id}"),
    ],
)
async def test_a_malformed_id_is_a_documented_400(api: Api, path: str, template: str) -> None:
    body = await problem(await api.client.get(path, allow_redirects=False), 400)
    assert body["code"] == "invalid-session-id" and "16 lowercase hex" in body["detail"]
    doc = load_openapi()
    assert "400" in doc["paths"][template]["get"]["responses"]
    params = doc["paths"][template].get("parameters", []) + doc["paths"][template]["get"].get(
        "parameters", []
    )
    assert {"$ref": "#/components/parameters/SessionId"} in params
    pattern = doc["components"]["parameters"]["SessionId"]["schema"]["pattern"]
    assert pattern == "^[0-9a-f]{16}$"


@pytest.mark.parametrize(
    ("query", "body"),
    [
        ("?wait=AAA", None),
        ("?wait=yes", None),
        ("?wait=true&wait=false", None),
        ("", {"wait": "true"}),
        ("", {"wait": 1}),
        ("", {"wait": None}),
        ("?wait=AAA", {"wait": True}),  # the body does not excuse a bad query parameter
    ],
)
async def test_create_refuses_a_bad_wait(api: Api, query: str, body: Any) -> None:
    r = await api.client.post(f"/api/sessions{query}", json=body)
    detail = (await problem(r, 400))["detail"]
    assert "wait" in detail
    assert api.store.all() == []  # changing nothing


@pytest.mark.parametrize("query", ["?history=AAA", "?history=1&history=1"])
async def test_get_refuses_a_bad_history(api: Api, query: str) -> None:
    s = await (await api.client.post("/api/sessions")).json()
    await problem(await api.client.get(f"/api/sessions/{s['id']}{query}"), 400)


async def test_scope_outside_its_enum_is_400(api: Api) -> None:
    await problem(await api.client.get("/api/sessions?scope=everything"), 400)


@pytest.mark.parametrize(
    "how", [{"json": {"wait": False}}, {"params": {"wait": "false"}}, {"params": {"wait": "0"}}]
)
async def test_no_wait_answers_a_state_the_description_names(api: Api, how: dict[str, Any]) -> None:
    api.runner.start_delay = 0.3
    r = await api.client.post("/api/sessions", **how)
    s = await r.json()
    assert r.status == 201 and s["status"] in ("creating", "starting")
    check_schema("#/components/schemas/NewSession", s)
    described = load_openapi()["paths"]["/api/sessions"]["post"]["description"]
    assert f"`{s['status']}`" in described


async def test_livez_answers_while_readiness_fails(tmp_path: Path, free_ports: list[int]) -> None:
    """A floor crossed or PostgreSQL down is 503 on readiness (/api/health, /api/readyz),
    never on liveness: a restart wired to /api/livez does not kill a working daemon."""

    async def floor_crossed() -> tuple[bool, str]:
        return False, "disk free 0.2G < floors.disk_free 1G"

    checks = {"floors": floor_crossed}
    async with open_api(tmp_path, free_ports, health_checks=checks, version="9") as api:
        client = api.client
        for path in ("/api/health", "/api/readyz"):
            r = await client.get(path)
            body = await r.json()
            assert r.status == 503 and body["status"] == "degraded", path
            check_schema("#/components/schemas/Health", body)
        r = await client.get("/api/livez")
        assert r.status == 200 and await r.json() == {"status": "alive", "version": "9"}
        assert r.headers["Cache-Control"] == "no-store"
    doc = load_openapi()
    assert {"/api/livez", "/api/health", "/api/readyz"} <= set(doc["paths"])
    assert "liveness" in doc["info"]["description"].lower()


async def test_livez_is_not_activity_for_idle_exit(api: Api) -> None:
    """A socket-activated lovd exits after idle_exit without requests; a liveness probe
    every few seconds must not keep it up (the next real request starts it again)."""
    from lovd.web.app import STATE

    st = api.client.app[STATE]  # type: ignore[index]
    st.requests.last = 0.0
    assert (await api.client.get("/api/livez")).status == 200
    assert st.requests.last == 0.0
    await api.client.get("/api/sessions")
    assert st.requests.last > 0.0
