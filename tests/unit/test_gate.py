"""The forward_auth gate in-process (lovd/web/gate.py, public.py): the public app on a test server,
real Sessions and SQLite, the fake runner. The same rules through a real Caddy are in
tests/integration/test_gate_caddy.py.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from lovd import ids
from lovd.caddy import GATE_HEADER, gate_key
from lovd.session.launcher import SessionEnv, load_host_key
from lovd.session.lifecycle import Sessions
from lovd.store import Session, Store
from lovd.web.gate import BrowserGate
from lovd.wiring import Host
from tests.fakes import FakeRunner
from tests.stack import Clock, open_stack, settings_merged
from tests.unit.conftest import unit_settings
from tests.unit.test_allowlist import ATTACKS, SES

# These tests read lovd's English texts; Norwegian, the default, is in test_pages_i18n.py.
NAV = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate", "Accept-Language": "en"}
XHR = {"Accept": "application/json", "Sec-Fetch-Mode": "cors"}
START = {"Sec-Fetch-Site": "same-origin", "Accept-Language": "en"}
AUTH_SOCKET = "/run/lovd-test/auth.sock"  # never bound: the test server serves the app


@dataclass
class Gate:
    client: TestClient  # type: ignore[type-arg]
    gate: BrowserGate
    sessions: Sessions
    store: Store
    key: str
    env: SessionEnv
    clock: Clock
    host: Host
    ports: int = 40000

    async def session(self, status: str = "running", **changes: Any) -> tuple[Session, str]:
        token = ids.new_token()
        now = time.time()
        self.ports += 1
        s = await self.store.insert(
            Session(
                id=ids.new_session_id(),
                status=status,
                reason="",
                token_hash=ids.hash_token(token),
                port=self.ports,
                container_id="",
                host_id="h1",
                created_at=now,
                updated_at=now,
                expires_at=now + 3600,
                last_activity=now,
                started_at=now,
            )
        )
        if changes:
            s = await self.store.update(s.id, **changes)
        return s, token

    async def auth(
        self,
        s: Session | None,
        token: str,
        method: str = "GET",
        uri: str = "/global/health",
        headers: dict[str, str] | None = None,
        *,
        key: str | None = None,
        addr: str = "192.0.2.1",
    ) -> aiohttp.ClientResponse:
        h = {
            "X-Forwarded-Method": method,
            "X-Forwarded-Uri": uri,
            "X-Forwarded-For": addr,
            GATE_HEADER: self.key if key is None else key,
            **(headers or {}),
        }
        if s is not None:
            h["Cookie"] = f"lovd_session={s.id}.{token}"
        return await self.client.get("/_lovd/auth", headers=h, allow_redirects=False)


@contextlib.asynccontextmanager
async def open_gate(
    tmp_path: Path, ports: list[int], *, reconcile_hold: float | None = None, **settings: Any
) -> AsyncIterator[Gate]:
    runner = FakeRunner()
    clock = Clock()
    try:
        # The address Caddy dials for the chat requests lovd checks.
        where = {"public_url": "http://localhost", "caddy": {"auth_socket": AUTH_SOCKET}}
        async with (
            open_stack(
                unit_settings(tmp_path, ports, **settings_merged(where, settings)),
                runner=lambda _: runner,
                clock=clock,
                reconcile_hold=reconcile_hold,
            ) as host,
            # No cookie jar: each request carries exactly the cookie the test gives it.
            TestClient(TestServer(host.public_app), cookie_jar=aiohttp.DummyCookieJar()) as client,
        ):
            yield Gate(
                client,
                host.gate,
                host.sessions,
                host.store,
                gate_key(host.env.host_key),
                host.env,
                clock,
                host,
            )
    finally:
        await runner.close()


@pytest.fixture
async def g(tmp_path: Path, free_ports: list[int]) -> AsyncIterator[Gate]:
    async with open_gate(tmp_path, free_ports) as gate:
        yield gate


# --- the container password is only for Caddy's forward_auth -------------------------


async def test_auth_answer_needs_the_gate_key(g: Gate) -> None:
    s, token = await g.session()
    for key in ("", "0" * 64, g.key[:-1], g.key + "0"):
        r = await g.auth(s, token, key=key)
        assert r.status == 404, key
        assert "Authorization" not in r.headers and "X-Lovd-Upstream" not in r.headers
        assert g.env.password(s.id) not in await r.text()
    r = await g.auth(s, token)
    assert r.status == 204
    assert r.headers["X-Lovd-Upstream"] == f"127.0.0.1:{s.port}"
    assert r.headers["Authorization"] == g.env.basic_auth(s.id)


def test_gate_key_comes_from_the_host_key_only(tmp_path: Path) -> None:
    key = load_host_key(tmp_path)
    assert gate_key(key) == gate_key(load_host_key(tmp_path))  # stable across restarts
    assert gate_key(key) != gate_key(bytes(32)) and len(gate_key(key)) == 64


# --- the OpenCode route allowlist ---------------------------------------------------


@pytest.mark.parametrize(("method", "uri"), ATTACKS)
async def test_attack_routes_get_403_problem(g: Gate, method: str, uri: str) -> None:
    s, token = await g.session()
    g.sessions.activity.clear()
    r = await g.auth(s, token, method, uri, XHR)
    assert r.status == 403
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert "Authorization" not in r.headers and "X-Lovd-Upstream" not in r.headers
    body = json.loads(await r.text())
    assert body["code"] == "forbidden" and body["refused"] == "opencode-route"
    assert "not available in this service" in body["detail"]
    assert s.id not in g.sessions.activity  # a refused request is no activity


async def test_allowed_route_passes_with_its_query(g: Gate) -> None:
    s, token = await g.session()
    r = await g.auth(s, token, "GET", "/session?directory=%2Fwork&roots=true", XHR)
    assert r.status == 204 and r.headers["X-Lovd-Upstream"] == f"127.0.0.1:{s.port}"


async def test_websocket_upgrade_refused_on_an_allowed_route(g: Gate) -> None:
    s, token = await g.session()
    ws = {"Upgrade": "websocket", "Connection": "Upgrade", **XHR}
    r = await g.auth(s, token, "GET", "/global/event", ws)
    assert r.status == 403 and "Authorization" not in r.headers
    assert "WebSocket" in json.loads(await r.text())["detail"]


async def test_navigation_to_a_refused_route_gets_a_page(g: Gate) -> None:
    s, token = await g.session()
    r = await g.auth(s, token, "GET", "/file/content?path=/etc/passwd", NAV)
    assert r.status == 403 and r.headers["Content-Type"].startswith("text/html")
    text = await r.text()
    assert "Not available here" in text and "not available in this service" in text
    assert "Set-Cookie" not in r.headers  # the session stays


async def test_refused_route_does_not_wake_a_stopped_session(g: Gate) -> None:
    s, token = await g.session("idle-stopped")
    r = await g.auth(s, token, "POST", "/pty", XHR)
    assert r.status == 403
    assert not g.sessions.wakes.waking(s.id)
    assert g.store.get(s.id).status == "idle-stopped"  # type: ignore[union-attr]


async def test_a_prompt_marks_the_session_used_and_reads_do_not(g: Gate) -> None:
    s, token = await g.session()
    for uri in ("/session", f"/session/{SES}/message", "/global/event"):
        assert (await g.auth(s, token, "GET", uri, XHR)).status == 204
    await g.sessions.flush_activity()
    assert g.store.get(s.id).used_at == 0  # type: ignore[union-attr]
    r = await g.auth(s, token, "POST", f"/session/{SES}/prompt_async", XHR)
    assert r.status == 204
    # Its body is checked by lovd first (bodycheck.py): Caddy is sent back to lovd.
    assert r.headers["X-Lovd-Upstream"] == "unix//run/lovd-test/auth.sock"
    await g.sessions.flush_activity()
    assert g.store.get(s.id).used_at > 0  # type: ignore[union-attr]


# --- failures from one address never lock out valid cookies (NAT) --------------------


async def test_valid_cookie_passes_while_its_address_is_rate_limited(g: Gate) -> None:
    s, token = await g.session()
    nat = "198.51.100.7"
    statuses = [(await g.auth(s, f"bad{i}", addr=nat)).status for i in range(20)]
    assert statuses[0] == 401 and statuses[-1] == 429
    # Another user behind the same address, with a valid cookie:
    r = await g.auth(s, token, addr=nat)
    assert r.status == 204, await r.text()
    status = await g.client.get(
        "/_lovd/status",
        headers={"Cookie": f"lovd_session={s.id}.{token}", "X-Forwarded-For": nat},
    )
    assert status.status == 200 and (await status.json())["ready"]
    link = await g.sessions.new_link(s.id)
    entry = await g.client.get(
        f"/c/{s.id}?token={link}", headers={"X-Forwarded-For": nat}, allow_redirects=False
    )
    assert entry.status == 303
    # Invalid attempts from there are still limited, everywhere.
    assert (await g.auth(s, "bad-again", addr=nat)).status == 429
    entry = await g.client.get(
        f"/c/{s.id}?token=bad", headers={"X-Forwarded-For": nat}, allow_redirects=False
    )
    assert entry.status == 429
    # And another address is not affected by them.
    assert (await g.auth(s, "bad", addr="203.0.113.9")).status == 401


# --- a fair public start --------------------------------------------------------------


async def _start(g: Gate, s: Session | None = None, token: str = "") -> aiohttp.ClientResponse:
    headers = dict(START)
    if s is not None:
        headers["Cookie"] = f"lovd_session={s.id}.{token}"
    return await g.client.post("/_lovd/start", headers=headers, allow_redirects=False)


@pytest.mark.parametrize("status", ["running", "starting", "stopped", "idle-stopped", "failed"])
async def test_a_browser_with_a_live_session_gets_it_back(g: Gate, status: str) -> None:
    s, token = await g.session(status)
    r = await _start(g, s, token)
    assert r.status == 303 and r.headers["Location"] == "/"
    assert "Set-Cookie" not in r.headers
    assert [x.id for x in g.sessions.all()] == [s.id]  # no second session


@pytest.mark.parametrize("gone", ["expired", "deleted"])
async def test_a_dead_session_allows_a_new_start(g: Gate, gone: str) -> None:
    # A failed session is not dead: it keeps its chat history and wakes (see above).
    if gone == "expired":
        s, token = await g.session(expires_at=time.time() - 1)
    else:
        s, token = await g.session("stopped")
    if gone == "deleted":
        await g.store.delete(s.id, "test")
    r = await _start(g, s, token)
    assert r.status == 303 and r.headers["Set-Cookie"].startswith("lovd_session=")
    assert s.id not in r.headers["Set-Cookie"]


async def test_full_landing_page_tells_the_real_wait(tmp_path: Path, free_ports: list[int]) -> None:
    async with open_gate(
        tmp_path, free_ports, unused_timeout=300, idle_timeout=3600, limits={"max_running": 2}
    ) as g:
        now = time.time()
        g.clock.use(lambda: now)
        await g.session(created_at=now - 100, started_at=now - 100)  # unused: frees in 200 s
        used, _ = await g.session(started_at=now - 250)
        g.sessions.mark_used(used.id)  # used: its idle hour counts, not unused_timeout
        assert g.sessions.retry_after() == 200
        r = await g.client.get("/", headers=NAV)
        text = await r.text()
        assert r.status == 200 and r.headers["Retry-After"] == "200"
        assert "All 2 places are in use right now" in text
        assert "one should free up within 4 min" in text  # 200 s, rounded up
        r = await _start(g)
        assert r.status == 429 and r.headers["Retry-After"] == "200"
        assert "All 2 places are in use — try again in 4 min." in await r.text()


async def test_landing_page_with_room_has_no_wait(g: Gate) -> None:
    r = await g.client.get("/", headers=NAV)
    assert r.status == 200 and "Retry-After" not in r.headers
    assert "0 of 3 places are in use" in await r.text()


@pytest.mark.parametrize(
    ("uri", "headers", "field"),
    [
        ("/session?directory=%2Fetc", {}, "directory"),
        ("/session?directory=%2Fwork&directory=%2F", {}, "directory"),
        ("/session?roots=true&workspace=w1", {}, "workspace"),
        ("/session", {"x-opencode-directory": "%2F"}, "directory"),
        ("/session", {"X-OpenCode-Directory": "/root"}, "directory"),
        ("/session", {"x-opencode-workspace": "ws"}, "workspace"),
        ("/session?directory=%2Fwork", {"x-opencode-directory": "%2Ftmp"}, "directory"),
    ],
)
async def test_every_route_stays_in_the_chats_folder(
    g: Gate, uri: str, headers: dict[str, str], field: str
) -> None:
    """OpenCode opens a project (its config, chats and files) wherever ``directory``
    points: on any allowed route another folder or a workspace is refused, naming it."""
    s, token = await g.session()
    r = await g.auth(s, token, "GET", uri, {**XHR, **headers})
    assert r.status == 403, r.status
    assert field in (await r.json())["detail"]
    # The UI's own forms pass: /work in the query or the header, or nothing.
    for ok_uri, ok_headers in [
        ("/session?directory=%2Fwork&roots=true", {}),
        ("/session", {"x-opencode-directory": "%2Fwork"}),
        ("/session?limit=5", {}),
    ]:
        r = await g.auth(s, token, "GET", ok_uri, {**XHR, **ok_headers})
        assert r.status == 204, (ok_uri, r.status)
