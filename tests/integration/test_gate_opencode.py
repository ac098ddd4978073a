"""The allowlist against the real OpenCode of the session image (localhost/lovd-session).

An OpenCode upgrade must be reviewed before it ships: these tests fail when an allowed
API route is gone from OpenCode's own OpenAPI (``GET /doc``; a rename), when OpenCode's
routes differ from the snapshot next to the allowlist (lovd/web/opencode_routes.txt; an
addition), and when any documented route outside the list gets through the gate.
On a mismatch the new route list is written to $LOVD_ARTIFACTS (or test-artifacts/) as
opencode_routes.txt: review it against lovd/web/allowlist.py, then commit it.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lovd.web.allowlist import OPENCODE_VERSION, Allowlist, read_snapshot
from tests.conftest import ROOT, image_present, need
from tests.integration.caddy_harness import Harness, cookie, harness

pytestmark = [pytest.mark.caddy, pytest.mark.opencode, pytest.mark.podman]

SESSION_IMAGE = os.environ.get("LOVD_SESSION_IMAGE", "localhost/lovd-session:latest")
SNAPSHOT = ROOT / "lovd" / "web" / "opencode_routes.txt"
METHODS = ("get", "post", "put", "patch", "delete", "head", "options")


def _routes(doc: dict[str, Any]) -> set[str]:
    return {f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m in ops if m in METHODS}


def _artifacts() -> Path:
    base = Path(os.environ.get("LOVD_ARTIFACTS", ROOT / "test-artifacts"))
    base.mkdir(parents=True, exist_ok=True)
    return base


@pytest.fixture
async def opencode(podman: str, caddy_bin: str) -> AsyncIterator[tuple[Harness, str, str]]:
    """A real OpenCode session behind Caddy with OpenCode's allowlist alone.
    Yields the harness, the lovd session's cookie value and the OpenCode session id."""
    need(image_present(SESSION_IMAGE), f"{SESSION_IMAGE} missing: run 'lovd image build'")
    async with harness(
        image=SESSION_IMAGE, settings={"ready_timeout": 90}, allowlist=Allowlist()
    ) as h:
        s, token = await h.sessions.create(wait=True)
        c = cookie(s, token)
        async with h.http.post(h.url + "/session", json={}, headers=c) as r:
            assert r.status == 200, await r.text()
            oc = (await r.json())["id"]
        yield h, c["Cookie"], oc


async def _direct(h: Harness, path: str) -> Any:
    """GET from the container itself (the password lovd gives Caddy), not via the gate."""
    [s] = h.sessions.all()
    auth = {"Authorization": h.env.basic_auth(s.id)}
    async with (
        aiohttp.ClientSession() as http,  # the harness's own does not decompress
        http.get(f"http://127.0.0.1:{s.port}{path}", headers=auth) as r,
    ):
        assert r.status == 200, await r.text()
        return await r.json()


async def test_opencode_routes_match_the_reviewed_snapshot(
    opencode: tuple[Harness, str, str],
) -> None:
    h, _, _ = opencode
    health = await _direct(h, "/global/health")
    doc = await _direct(h, "/doc")
    live = _routes(doc)
    recorded = read_snapshot(SNAPSHOT.read_text())
    allowed = Allowlist().api_lines()
    gone = sorted(allowed - live)
    added, removed = sorted(live - recorded), sorted(recorded - live)
    if added or removed or health["version"] != OPENCODE_VERSION:
        header = [ln for ln in SNAPSHOT.read_text().splitlines() if ln.startswith("#")]
        header = [ln.replace(OPENCODE_VERSION, health["version"]) for ln in header]
        body = sorted(live, key=lambda s: (s.split(" ", 1)[1], s))
        (_artifacts() / "opencode_routes.txt").write_text("\n".join(header + body) + "\n")
    assert not gone, f"allowed routes OpenCode {health['version']} no longer has: {gone}"
    assert health["version"] == OPENCODE_VERSION, (
        f"the image runs OpenCode {health['version']}, the allowlist was made for "
        f"{OPENCODE_VERSION}: review lovd/web/allowlist.py"
    )
    assert not added and not removed, (
        f"OpenCode's routes changed (added {added}, removed {removed}): review "
        "lovd/web/allowlist.py, then replace lovd/web/opencode_routes.txt"
    )


def _filled(path: str, oc: str) -> str:
    path = re.sub(r"\{sessionID\}", oc, path)
    path = path.replace("/*", "/x")
    return re.sub(r"\{[^}]+\}", "x_1", path)


async def test_every_other_opencode_route_is_refused_through_caddy(
    opencode: tuple[Harness, str, str],
) -> None:
    h, value, oc = opencode
    doc = await _direct(h, "/doc")
    allowed = Allowlist().api_lines()
    headers = {"Cookie": value, "Accept": "application/json", "Sec-Fetch-Mode": "cors"}
    timeout = aiohttp.ClientTimeout(total=10)
    passed, refused = [], []
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        for line in sorted(_routes(doc)):
            method, path = line.split(" ", 1)
            if line in allowed and (method != "GET" or "event" in path):
                continue  # allowed writes and never-ending streams: not sent here
            body_json = None if method == "GET" else {}
            url = h.url + _filled(path, oc)
            async with http.request(
                method, url, headers=headers, json=body_json, timeout=timeout
            ) as r:
                body = await r.text(errors="replace")
                gate = r.status == 403 and "not available in this service" in body
                (refused if gate else passed).append(line)
                if line not in allowed:
                    assert gate, (line, r.status, body[:300])
    assert refused and passed
    assert set(passed) <= allowed
    print(f"{len(refused)} OpenCode routes refused by the gate, {len(passed)} allowed GETs passed")


async def test_opencode_pages_leave_caddy_unframeable_and_same_origin(
    opencode: tuple[Harness, str, str],
) -> None:
    """OpenCode's own page (its CSP allows connect-src *) as the browser gets it: with
    frame-ancestors 'none', connect-src 'self', X-Frame-Options and no Referer."""
    h, value, _ = opencode
    nav = {"Cookie": value, "Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(h.url + "/", headers=nav, allow_redirects=False) as r:
            assert r.status == 303, await r.text()  # into the latest chat
            where = r.headers["Location"]
        async with http.get(h.url + where, headers=nav, allow_redirects=False) as r:
            assert r.status == 200 and "<html" in (await r.text()).lower()
            policies = r.headers.getall("Content-Security-Policy", [])
            assert r.headers.getall("X-Frame-Options") == ["DENY"]
            assert r.headers.getall("Referrer-Policy") == ["no-referrer"]
    print(f"\nOpenCode page CSP through Caddy: {policies}")
    assert "frame-ancestors 'none'" in policies
    assert not [p for p in policies if re.search(r"connect-src[^;]*\*", p)], policies
    assert any("connect-src 'self'" in p for p in policies if "default-src" in p), policies


async def test_a_chats_record_is_fresh_for_two_seconds_and_nothing_else_is(
    opencode: tuple[Harness, str, str],
) -> None:
    """GET /session/<chat> through Caddy is marked fresh for 2 s, private (the UI's
    identical requests for it then share one answer in Chromium); its messages, the
    chat list, an unknown chat and a refused request are not."""
    h, value, oc = opencode
    api = {"Cookie": value, "Accept": "application/json"}

    async def cache_control(path: str, headers: dict[str, str]) -> tuple[int, str]:
        async with h.http.get(h.url + path, headers=headers, allow_redirects=False) as r:
            await r.read()
            return r.status, r.headers.get("Cache-Control", "")

    assert await cache_control(f"/session/{oc}", api) == (200, "private, max-age=2")
    for path in (f"/session/{oc}/message", "/session", f"/session/{oc}x/message"):
        status, cc = await cache_control(path, api)
        assert "max-age" not in cc, (path, status, cc)
    status, cc = await cache_control("/session/ses_doesnotexist0000000000000", api)
    assert status != 200 and "max-age" not in cc, (status, cc)
    # No cookie: lovd refuses (never OpenCode's answer), and says not to keep it.
    status, cc = await cache_control(f"/session/{oc}", {"Accept": "application/json"})
    assert status in (401, 403) and "max-age" not in cc, (status, cc)
