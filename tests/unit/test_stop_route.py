"""POST /api/sessions/{id}/stop (and ``lovd session stop``): an operator's stop keeps the
workspace and the chat, frees the place, and the session's next browser request wakes it;
bad input changes nothing."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from lovd.caddy import GATE_HEADER, gate_key
from lovd.session.model import SessionState
from tests.unit.conftest import Api, open_api
from tests.unit.test_api import BAD_IDS, check_schema, problem
from tests.waiting import until

XHR = {"Accept": "application/json", "Sec-Fetch-Mode": "cors"}


async def _running(api: Api) -> dict[str, str]:
    r = await api.client.post("/api/sessions")
    assert r.status == 201
    s: dict[str, str] = await r.json()
    assert s["status"] == "running"
    return s


async def test_a_stop_keeps_the_workspace_and_the_next_request_wakes_it(api: Api) -> None:
    s = await _running(api)
    sid = s["id"]
    workspace = api.config.sessions_path / sid
    (workspace / "chat.db").write_text("the chat")
    # The browser's cookie, from the session's link.
    entry = await api.client.get(f"/c/{sid}?token={s['token']}", allow_redirects=False)
    assert entry.status == 303
    [morsel] = entry.cookies.values()
    cookie = f"{morsel.key}={morsel.value}"

    r = await api.client.post(f"/api/sessions/{sid}/stop")
    assert r.status == 200, await r.text()
    body = await r.json()
    check_schema("#/components/schemas/Session", body)
    assert body["id"] == sid and body["status"] == "stopped" and body["container_id"] == ""
    assert body["reason"] == "stopped by request"
    assert sid not in api.runner.servers  # the container is gone
    assert (workspace / "chat.db").read_text() == "the chat"
    assert api.sessions.running_count() == 0  # its place is free

    # The next request through Caddy's forward_auth wakes it, in the same workspace.
    async with TestClient(
        TestServer(api.host.public_app), cookie_jar=aiohttp.DummyCookieJar()
    ) as public:
        r = await public.get(
            "/_lovd/auth",
            headers={
                GATE_HEADER: gate_key(api.host.env.host_key),
                "X-Forwarded-Method": "GET",
                "X-Forwarded-Uri": "/session",
                "X-Forwarded-For": "192.0.2.1",
                "Cookie": cookie,
                **XHR,
            },
            allow_redirects=False,
        )
        assert r.status in (200, 204), await r.text()
    row = api.store.get(sid)
    assert row is not None and row.serving and sid in api.runner.servers
    assert api.runner.starts[-1].workspace == workspace
    assert (workspace / "chat.db").read_text() == "the chat"


async def test_a_stop_of_a_stopped_session_changes_nothing(api: Api) -> None:
    s = await _running(api)
    first = await api.client.post(f"/api/sessions/{s['id']}/stop")
    assert first.status == 200
    before = api.store.get(s["id"])
    events = (await api.store.history(s["id"]))["events"]
    again = await api.client.post(f"/api/sessions/{s['id']}/stop")
    assert again.status == 200
    assert (await again.json())["status"] == "stopped"
    assert api.store.get(s["id"]) == before
    assert (await api.store.history(s["id"]))["events"] == events


@pytest.mark.parametrize("bad", [*BAD_IDS, "0", "0123456789abcdeg"])
async def test_a_bad_id_is_refused_and_changes_nothing(api: Api, bad: str) -> None:
    s = await _running(api)
    before = api.store.all()
    r = await api.client.post(f"/api/sessions/{bad}/stop")
    assert r.status in (400, 404)
    body = await problem(r, r.status)
    if bad in ("0", "0123456789abcdeg", "ABCDEF0123456789"):
        assert r.status == 400 and body["code"] == "invalid-session-id"
    assert api.store.all() == before and s["id"] in api.runner.servers


async def test_an_unknown_id_is_404_and_changes_nothing(api: Api) -> None:
    s = await _running(api)
    before = api.store.all()
    body = await problem(await api.client.post("/api/sessions/0123456789abcdef/stop"), 404)
    assert body["code"] == "session-not-found"
    assert api.store.all() == before and s["id"] in api.runner.servers


async def test_a_warm_container_is_no_session_to_stop(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """A warm row is nobody's session: 404, and the pool keeps it."""
    async with open_api(tmp_path, free_ports, warm_pool=1) as a:
        assert await a.sessions.pool(a.config.warm_max_age).fill()
        [warm] = a.sessions.warm()
        await problem(await a.client.post(f"/api/sessions/{warm.id}/stop"), 404)
        assert a.store.get(warm.id) == warm and warm.id in a.runner.servers


async def test_a_body_is_refused_and_changes_nothing(api: Api) -> None:
    s = await _running(api)
    before = api.store.get(s["id"])
    body = await problem(await api.client.post(f"/api/sessions/{s['id']}/stop", json={"x": 1}), 400)
    assert "unknown field" in body["detail"]
    await problem(
        await api.client.post(
            f"/api/sessions/{s['id']}/stop", data=b"x", headers={"Content-Type": "text/plain"}
        ),
        415,
    )
    assert api.store.get(s["id"]) == before and s["id"] in api.runner.servers


async def test_a_stop_wins_over_a_start_not_made_yet(api: Api) -> None:
    """Stopped between its create (wait false) and its start: no container is started
    for it afterwards."""
    session, _ = await api.sessions.create(wait=False)
    assert session.status == SessionState.CREATING
    stopped = await api.sessions.stop(session.id, reason="stopped by request")
    assert stopped.status == SessionState.STOPPED
    await until(lambda: not api.sessions.lock(session.id).locked() and not api.sessions._tasks)
    row = api.store.get(session.id)
    assert row is not None and row.status == SessionState.STOPPED
    assert api.runner.starts == [] and session.id not in api.runner.servers
