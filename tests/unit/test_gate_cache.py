"""The gate's answer to Caddy stays cheap (web/cookies.py, issue 17): a cookie verified
once, its revocation still immediate, no store write and no wait on that path."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from lovd import ids
from lovd.caddy import GATE_HEADER
from lovd.store import Session
from lovd.web import gate as gate_mod
from lovd.web.allowlist import Allowlist
from lovd.web.cookies import CookieHeaders, VerifiedCookies
from tests.unit.test_allowlist import SES
from tests.unit.test_gate import NAV, XHR, Gate, open_gate


@pytest.fixture
async def g(tmp_path: Path, free_ports: list[int]) -> AsyncIterator[Gate]:
    async with open_gate(tmp_path, free_ports) as gate:
        yield gate


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every full token check the gate makes (ids.token_matches), by token."""
    seen: list[str] = []
    real = ids.token_matches

    def counted(token: str, token_hash: str) -> bool:
        seen.append(token)
        return real(token, token_hash)

    monkeypatch.setattr(gate_mod.ids, "token_matches", counted)
    yield seen


def value(s: Session, token: str) -> str:
    return f"{s.id}.{token}"


async def test_a_verified_cookie_is_not_hashed_again(g: Gate, hashes: list[str]) -> None:
    s, token = await g.session()
    for _ in range(5):
        r = await g.auth(s, token, "GET", "/session", XHR)
        assert r.status == 204 and r.headers["X-Lovd-Upstream"] == f"127.0.0.1:{s.port}"
        assert r.headers["Authorization"] == g.sessions.container_auth(s.id)
    assert hashes == [token]  # the first request only
    assert value(s, token) in g.gate.verified


async def test_a_forged_cookie_is_never_cached(g: Gate, hashes: list[str]) -> None:
    s, token = await g.session()
    forged = [
        (s, "A" * len(token)),  # a real session, a guessed token
        (s, token[:-1]),
        (s, ""),
    ]
    for row, guess in forged:
        for _ in range(2):
            r = await g.auth(row, guess, addr="203.0.113.5")
            assert r.status in (401, 429)
    other = Session(ids.new_session_id(), "running", "", "", 0, "", "", 0.0, 0.0, 0.0, 0.0)
    assert (await g.auth(other, token, addr="203.0.113.6")).status == 401
    assert len(g.gate.verified) == 0
    # Each guess was checked in full every time (those under the limit reached the hash).
    assert hashes.count("A" * len(token)) >= 1 and hashes.count(token[:-1]) >= 1


async def test_a_deleted_sessions_cached_cookie_is_refused_at_once(g: Gate) -> None:
    s, token = await g.session()
    assert (await g.auth(s, token)).status == 204
    await g.sessions.delete(s.id)
    r = await g.auth(s, token, headers=XHR)
    assert r.status == 401 and "X-Lovd-Upstream" not in r.headers
    assert "does not exist" in (await r.json())["detail"]
    assert value(s, token) not in g.gate.verified


async def test_a_new_link_revokes_the_cached_cookie_at_once(g: Gate) -> None:
    s, token = await g.session()
    assert (await g.auth(s, token)).status == 204
    link = await g.sessions.new_link(s.id)
    _, fresh = await g.sessions.redeem_link(s.id, link)  # another browser took the session
    r = await g.auth(s, token, headers=XHR)
    assert r.status == 401 and "X-Lovd-Upstream" not in r.headers
    assert "wrong or old token" in (await r.json())["detail"]
    assert (await g.auth(s, fresh)).status == 204


async def test_an_expired_sessions_cached_cookie_is_refused_at_once(g: Gate) -> None:
    s, token = await g.session()
    assert (await g.auth(s, token)).status == 204
    await g.store.update(s.id, expires_at=time.time() - 1)
    r = await g.auth(s, token, headers=XHR)
    assert r.status == 403 and "expired" in (await r.json())["detail"]


async def test_a_stopped_sessions_cached_cookie_no_longer_reaches_its_container(g: Gate) -> None:
    """The state is read from the row on every request: a stopped session's cookie gets
    the waking page, never the old container's address (it wakes the session, as an
    uncached cookie does: stopping is not revoking)."""
    s, token = await g.session()
    assert (await g.auth(s, token, headers=NAV, uri="/session")).status == 204
    await g.sessions.stop(s.id)
    r = await g.auth(s, token, headers=NAV, uri="/session")
    assert r.status == 503 and r.headers["Content-Type"].startswith("text/html")
    assert "X-Lovd-Upstream" not in r.headers and "Authorization" not in r.headers


def _request(g: Gate, s: Session, token: str, method: str, uri: str) -> web.Request:
    return make_mocked_request(
        "GET",
        "/_lovd/auth",
        headers={
            GATE_HEADER: g.key,
            "X-Forwarded-Method": method,
            "X-Forwarded-Uri": uri,
            "X-Forwarded-For": "192.0.2.1",
            "Cookie": f"lovd_session={value(s, token)}",
            **XHR,
        },
    )


async def test_the_answer_neither_waits_nor_writes_the_store(
    g: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running session's requests, a prompt among them: the handler finishes without
    ever suspending (so it awaits no Podman, PostgreSQL or lock) and writes nothing."""
    s, token = await g.session()
    g.sessions.health.answered(s.id)  # a probe vouched for it: no background check
    writes: list[str] = []
    for name in ("insert", "update", "touch", "tombstone"):
        real = getattr(g.store, name)

        def counted(*a: Any, _name: str = name, _real: Any = real, **kw: Any) -> Any:
            writes.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(g.store, name, counted)
    uris = [("GET", "/session"), ("GET", f"/session/{SES}/message"), ("GET", "/global/event")]
    uris.append(("POST", f"/session/{SES}/abort"))
    for method, uri in uris * 3:
        coro = g.gate.auth(_request(g, s, token, method, uri))
        with pytest.raises(StopIteration) as done:
            coro.send(None)  # one step: it never waited for anything
        assert done.value.value.status == 204
    assert writes == []


def test_cookie_headers_read_as_aiohttp_reads_them() -> None:
    names = ("__Host-lovd_session", "lovd_session")
    headers = CookieHeaders(names, size=4)
    parsed = 0

    def parse(cookies: dict[str, str]) -> Any:
        def read() -> dict[str, str]:
            nonlocal parsed
            parsed += 1
            return cookies

        return read

    assert headers.value("a=1; lovd_session=x.y", parse({"a": "1", "lovd_session": "x.y"})) == "x.y"
    assert headers.value("a=1; lovd_session=x.y", parse({})) == "x.y"  # remembered
    assert parsed == 1
    both = {"lovd_session": "plain", "__Host-lovd_session": "host"}
    assert headers.value("both", parse(both)) == "host"  # the __Host- one first
    assert headers.value("empty", parse({"__Host-lovd_session": "", "lovd_session": "p"})) == "p"
    assert headers.value("none", parse({"other": "1"})) is None
    for i in range(10):  # bounded
        headers.value(f"h{i}", parse({}))
    assert len(headers._seen) <= 4
    secure = CookieHeaders(names[:1])
    assert secure.value("x", parse({"lovd_session": "tossed"})) is None


def test_verified_cookies_are_bounded_and_follow_the_row() -> None:
    now = time.time()
    rows: dict[str, Session] = {}

    def row(sid: str, token_hash: str) -> Session:
        s = Session(sid, "running", "", token_hash, 1, "", "", now, now, now + 60, now)
        rows[sid] = s
        return s

    cache = VerifiedCookies(rows.get, lambda: now, size=3)
    sids = [ids.new_session_id() for _ in range(5)]
    for sid in sids:
        cache.put(f"{sid}.t", row(sid, "h" * 64))
    assert len(cache) == 3 and f"{sids[0]}.t" not in cache  # the oldest went first
    assert cache.get(f"{sids[4]}.t") is rows[sids[4]]
    row(sids[4], "g" * 64)  # a new token hash (a redeemed link)
    assert cache.get(f"{sids[4]}.t") is None and f"{sids[4]}.t" not in cache
    del rows[sids[3]]
    assert cache.get(f"{sids[3]}.t") is None


def test_allowlist_decisions_are_remembered_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from lovd.web import allowlist

    monkeypatch.setattr(allowlist, "MAX_DECISIONS", 8)
    al = Allowlist()
    first = al.check("GET", f"/session/{SES}/message?limit=1")
    assert first.allowed
    assert al.check("GET", f"/session/{SES}/message?limit=2") is first
    assert not al.check("GET", "/pty").allowed
    assert not al.check("GET", "/global/event", websocket=True).allowed
    assert al.check("GET", "/global/event").allowed
    assert al.check("get", "/session").allowed  # the method's case as before
    for i in range(20):
        al.check("GET", f"/nothing/{i}")
    assert len(al._decided) <= 8
