"""Every error lovd answers is rendered by web/problems.py: problem+json, or the HTML page
for a browser's navigation; an unexpected exception is a 500 that leaks nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from lovd import ids
from lovd.errors import LovdError
from lovd.sync import routing
from lovd.web.problems import is_navigation
from tests.unit.conftest import Api
from tests.unit.test_gate import NAV, XHR, Gate, open_gate

PROBLEM = "application/problem+json"
SECRET = "boom-internal-detail-/var/lib/lovd/state.db"


@pytest.fixture
async def g(tmp_path: Path, free_ports: list[int]) -> AsyncIterator[Gate]:
    async with open_gate(tmp_path, free_ports) as gate:
        yield gate


def _explode(*_a: Any, **_kw: Any) -> Any:
    raise RuntimeError(SECRET)


async def expect(r: aiohttp.ClientResponse, status: int, page: bool) -> str:
    body = await r.text()
    assert r.status == status, body
    if page:
        assert r.content_type == "text/html", (r.content_type, body)
        assert "<html" in body
    else:
        assert r.content_type == PROBLEM, (r.content_type, body)
        problem = json.loads(body)
        assert problem["status"] == status and problem["code"] and problem["detail"]
    assert SECRET not in body and "Traceback" not in body and "RuntimeError" not in body
    return body


@pytest.mark.parametrize("page", [False, True], ids=["xhr", "navigation"])
async def test_public_app_error_paths(g: Gate, page: bool) -> None:
    h = NAV if page else XHR
    get = g.client.get
    # Unknown routes, aiohttp's own 404 (a missing static file) and bad ids.
    await expect(await get("/nothing/here", headers=h), 404, page)
    await expect(await get("/_lovd/static/nope.css", headers=h), 404, page)
    await expect(await get("/c/not-an-id?token=x", headers=h), 400, page)
    await expect(await get(f"/c/{ids.new_session_id()}?token=x", headers=h), 401, page)
    # The auth path without Caddy's key, and a cookie of no session.
    await expect(await get("/_lovd/auth", headers=h), 404, page)
    r = await get("/_lovd/auth", headers={**h, "Cookie": "lovd_session=x.y"})
    assert r.status == 404  # no gate key: learns nothing
    # A form post too large for the public socket: 413 (the form's target answers a page).
    sid = ids.new_session_id()
    form = {"Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin"}
    r = await g.client.post(f"/c/{sid}", data=b"token=" + b"x" * 10_000, headers={**h, **form})
    await expect(r, 413, page)


@pytest.mark.parametrize("page", [False, True], ids=["xhr", "navigation"])
async def test_public_app_unexpected_exception_leaks_nothing(
    g: Gate, page: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    h = NAV if page else XHR
    s, token = await g.session()
    monkeypatch.setattr(g.sessions, "find", _explode)
    body = await expect(await g.auth(s, token, headers=h), 500, page)
    monkeypatch.setattr(g.gate.pages, "landing_page", _explode)
    await expect(await g.client.get("/", headers=h), 500, page)
    r = await g.client.get("/_lovd/status", headers={**h, "Cookie": f"lovd_session={s.id}.x"})
    await expect(r, 500, page)
    if not page:
        assert "request id" in json.loads(body)["detail"]
    assert SECRET in caplog.text  # the log has it, the answer does not


async def test_api_app_error_paths(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    c = api.client
    await expect(await c.get("/api/nothing", headers=NAV), 404, False)  # the API: never a page
    r = await c.put("/api/sessions")
    await expect(r, 405, False)
    assert "POST" in r.headers["Allow"]
    await expect(await c.get("/api/sessions/not-an-id"), 400, False)
    await expect(await c.get(f"/api/sessions/{ids.new_session_id()}"), 404, False)
    monkeypatch.setattr(api.sessions, "all", _explode)
    await expect(await c.get("/api/sessions"), 500, False)


async def test_an_unreachable_owning_host_is_a_problem_not_text() -> None:
    """Browser routing (sync/routing.py): the host holding the session does not answer."""
    request = make_mocked_request("GET", f"/c/{ids.new_session_id()}?token=x", headers=NAV)
    with pytest.raises(LovdError) as e:
        await routing.forward_entry("127.0.0.1:9", request)  # discard port: refused
    assert e.value.status == 503 and e.value.retry_after


def test_one_navigation_decision() -> None:
    def req(method: str = "GET", **headers: str) -> Any:
        return make_mocked_request(method, "/x", headers=headers)

    assert is_navigation(req(**{"Sec-Fetch-Mode": "navigate"}))
    assert not is_navigation(req(**{"Sec-Fetch-Mode": "cors", "Accept": "text/html"}))
    assert is_navigation(req(Accept="text/html,application/xhtml+xml"))  # no Fetch metadata
    assert not is_navigation(req("POST", Accept="text/html"))
    assert not is_navigation(req(Accept="application/json"))
    # Caddy's forward_auth subrequest is a GET; the browser's method is forwarded.
    assert not is_navigation(req(Accept="text/html", **{"X-Forwarded-Method": "POST"}))
