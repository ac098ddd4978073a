"""Fair places (web/gate.py, session/admission.py): only chat activity keeps a place or
wakes a session nobody used, and one client address holds at most
browser.max_running_per_client places. In-process gate, real Sessions and SQLite, the
fake runner, a clock the test moves; each test tries the attack."""

from __future__ import annotations

import json
import time
from pathlib import Path

import aiohttp

from lovd.session.housekeeping import UNUSED_REASON
from lovd.web.ratelimit import client_key
from tests.unit.test_allowlist import SES
from tests.unit.test_gate import NAV, START, XHR, Gate, open_gate


async def _start(g: Gate, addr: str) -> aiohttp.ClientResponse:
    headers = {**START, "X-Forwarded-For": addr}
    return await g.client.post("/_lovd/start", headers=headers, allow_redirects=False)


async def test_a_poll_every_30_s_neither_keeps_nor_wakes_an_unused_session(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_gate(tmp_path, free_ports, unused_timeout=300, idle_timeout=600) as g:
        now = [time.time()]
        g.clock.use(lambda: now[0])
        s, secret = await g.session()
        # The reproduction: GET /global/health every 30 s, for longer than unused_timeout.
        for _ in range(11):
            now[0] += 30
            # As a probe would: the fake row has no container to answer the gate's check.
            g.sessions.health.answered(s.id)
            assert (await g.auth(s, secret, "GET", "/global/health", XHR)).status == 204
        assert s.id not in g.sessions.activity  # a poll is no activity
        await g.sessions.cleanup()
        row = g.store.get(s.id)
        assert row is not None and (row.status, row.reason) == ("idle-stopped", UNUSED_REASON)
        # The next polls (health, the event stream) do not wake it: 503, nothing started.
        for uri in ("/global/health", "/global/event", f"/session/{SES}/message"):
            r = await g.auth(s, secret, "GET", uri, XHR)
            assert r.status == 503 and "Authorization" not in r.headers, uri
            assert "nobody used it" in json.loads(await r.text())["detail"]
        assert not g.sessions.wakes.waking(s.id)
        assert g.store.get(s.id).status == "idle-stopped"  # type: ignore[union-attr]
        # A person reloading the page wakes it (the progress page, then the chat).
        r = await g.auth(s, secret, "GET", "/", NAV)
        assert r.status == 503 and "Waking up your session" in await r.text()
        assert g.sessions.wakes.waking(s.id)
        await g.sessions.wait(s.id, lambda row: row.serving, 5)
        assert g.store.get(s.id).status == "running"  # type: ignore[union-attr]


async def test_a_prompt_wakes_an_unused_session_and_keeps_a_session_alive(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_gate(tmp_path, free_ports, unused_timeout=300, idle_timeout=600) as g:
        now = [time.time()]
        g.clock.use(lambda: now[0])
        s, secret = await g.session("idle-stopped", reason=UNUSED_REASON)
        r = await g.auth(s, secret, "POST", f"/session/{SES}/prompt_async", XHR)
        assert r.status == 204  # held while it woke, then allowed
        assert g.store.get(s.id).status == "running"  # type: ignore[union-attr]
        assert g.sessions.activity[s.id] == now[0]
        # Used now: only chat keeps it; polls for longer than idle_timeout do not.
        for _ in range(21):
            now[0] += 30
            await g.auth(s, secret, "GET", "/global/health", XHR)
        await g.sessions.cleanup()
        row = g.store.get(s.id)
        assert row is not None and row.status == "idle-stopped"
        assert row.reason == "no activity for idle_timeout"


async def test_one_address_cannot_take_every_place(tmp_path: Path, free_ports: list[int]) -> None:
    settings = {"limits": {"max_running": 4},
                "browser": {"max_running_per_client": 3, "start_limit": 10}}  # fmt: skip
    async with open_gate(tmp_path, free_ports, **settings) as g:
        for _ in range(3):
            r = await _start(g, "198.51.100.7")
            assert r.status == 303, await r.text()
        r = await _start(g, "198.51.100.7")
        assert r.status == 429 and int(r.headers["Retry-After"]) > 0
        text = await r.text()
        assert "Your address already has 3 session(s) running" in text
        assert 'action="/_lovd/start"' in text  # the landing page, with its refusal
        assert len(g.sessions.all()) == 3
        # Another visitor still gets the free place.
        assert (await _start(g, "203.0.113.9")).status == 303
        assert len(g.sessions.all()) == 4


async def test_an_ipv6_64_is_one_client(tmp_path: Path, free_ports: list[int]) -> None:
    assert client_key("2001:db8:0:0:1::7") == client_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1" == client_key("192.0.2.1")
    settings = {"browser": {"max_running_per_client": 1}}
    async with open_gate(tmp_path, free_ports, **settings) as g:
        assert (await _start(g, "2001:db8::1")).status == 303
        r = await _start(g, "2001:db8::2")  # another address of the same line
        assert r.status == 429
        nb = await g.client.post(
            "/_lovd/start",
            headers={"Sec-Fetch-Site": "same-origin", "X-Forwarded-For": "2001:db8::3"},
            allow_redirects=False,
        )
        assert "Adressen din har allerede 1 økt(er) i gang" in await nb.text()
        assert (await _start(g, "2001:db8:0:1::1")).status == 303  # the next /64


async def test_a_wake_counts_against_the_address(tmp_path: Path, free_ports: list[int]) -> None:
    settings = {"browser": {"max_running_per_client": 1}}
    async with open_gate(tmp_path, free_ports, **settings) as g:
        assert (await _start(g, "198.51.100.7")).status == 303
        other, secret = await g.session("idle-stopped", reason="no activity for idle_timeout")
        r = await g.auth(other, secret, "GET", "/global/health", XHR, addr="198.51.100.7")
        body = json.loads(await r.text())
        assert r.status == 429 and body["code"] == "too-many-sessions"
        assert body["per_client"] == 1
        assert g.store.get(other.id).status == "idle-stopped"  # type: ignore[union-attr]
        # From another address it wakes.
        r = await g.auth(other, secret, "GET", "/global/health", XHR, addr="203.0.113.9")
        assert r.status == 204
