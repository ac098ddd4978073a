"""The gate's security rules through a real Caddy 2.6 (the harness of test_caddy.py):
the container password never reaches a browser, the OpenCode route allowlist, and a fair
public start. The allowlist tests use OpenCode's list alone, as production does; the
upstream is a host stand-in that records what reached it.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from yarl import URL

from lovd.caddy import GATE_HEADER, gate_key
from lovd.web.allowlist import Allowlist
from lovd.web.pages import human_seconds
from tests.integration.caddy_harness import Harness, cookie, harness
from tests.unit.test_allowlist import ATTACKS, SES
from tests.waiting import until

pytestmark = [pytest.mark.caddy]

NAV = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate"}
XHR = {"Accept": "application/json", "Sec-Fetch-Mode": "cors"}


async def _req(
    h: Harness, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    url = URL(h.url + path, encoded=True)  # exactly these bytes: no client-side cleaning
    async with h.http.request(method, url, headers=headers or {}, allow_redirects=False) as r:
        return r.status, dict(r.headers), await r.text()


async def _start(h: Harness, c: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    headers = {"Origin": h.url, "Sec-Fetch-Site": "same-origin", **(c or {})}
    return await _req(h, "POST", "/_lovd/start", headers)


# --- part 4: what lovd tells Caddy never reaches the browser ---------------------------


async def test_auth_answer_never_reaches_a_browser(caddy_bin: str) -> None:
    async with harness() as h:
        up = await h.upstream("a")
        s, token = await h.fake_session(up)
        password = h.env.password(s.id)
        c = cookie(s, token)
        tries = [
            "/_lovd/auth",
            "/_lovd/auth?x=1",
            "/_lovd/authx",
            "/_lovd/auth/",
            "/_LOVD/AUTH",
            "/_lovd/%61uth",
            "/_lovd/./auth",
            "/_lovd//auth",
            "/c/../_lovd/auth",
        ]
        outcomes: dict[str, int] = {}
        for path in tries:
            for extra in ({}, NAV, {GATE_HEADER: "forged", "X-Forwarded-Uri": "/x"}):
                status, headers, body = await _req(h, "GET", path, {**c, **extra})
                outcomes[path] = status
                assert status >= 400, (path, extra, status)
                assert "Authorization" not in headers, path
                assert "X-Lovd-Upstream" not in headers, path
                assert password not in body and str(up.port) not in body, path
        print(json.dumps(outcomes, indent=1))
        # The plain path is answered by Caddy itself.
        status, _, body = await _req(h, "GET", "/_lovd/auth", c)
        assert status == 404 and "only for Caddy itself" in body
        assert up.seen == []


async def test_lovd_answers_auth_only_with_caddys_gate_key(caddy_bin: str) -> None:
    async with harness() as h:
        up = await h.upstream("a")
        s, token = await h.fake_session(up)
        # The key in Caddy's config is the one lovd derives from its host key.
        server = await h.manager.current()
        forward_auth = server["routes"][-1]["handle"][0]
        [pushed] = forward_auth["headers"]["request"]["set"][GATE_HEADER]
        assert pushed == gate_key(h.env.host_key)
        conn = aiohttp.UnixConnector(path=h.auth_socket)
        headers = {**cookie(s, token), "X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/x"}
        async with aiohttp.ClientSession(connector=conn) as direct:
            for key in (None, "", "forged"):
                extra = {} if key is None else {GATE_HEADER: key}
                async with direct.get("http://lovd/_lovd/auth", headers={**headers, **extra}) as r:
                    assert r.status == 404
                    assert "Authorization" not in r.headers
                    assert "X-Lovd-Upstream" not in r.headers
            async with direct.get(
                "http://lovd/_lovd/auth", headers={**headers, GATE_HEADER: pushed}
            ) as r:
                assert r.status == 204 and r.headers["X-Lovd-Upstream"].endswith(str(up.port))
        # And through Caddy the session works as before.
        status, _, body = await _req(h, "GET", "/global/health", cookie(s, token))
        assert status == 200 and json.loads(body)["upstream"] == "a"


# --- part 2: the OpenCode route allowlist ---------------------------------------------


async def test_routes_the_chat_does_not_need_get_403_and_never_reach_opencode(
    caddy_bin: str,
) -> None:
    async with harness(allowlist=Allowlist()) as h:
        up = await h.upstream("opencode")
        s, token = await h.fake_session(up)
        c = {**XHR, **cookie(s, token)}
        outcomes: dict[str, int] = {}
        for method, path in ATTACKS:
            if not path.startswith("/"):
                continue  # not an HTTP request target
            status, headers, body = await _req(h, method, path, c)
            outcomes[f"{method} {path}"] = status
            assert status >= 400, (method, path, status)
            assert "Authorization" not in headers
            if status == 403:
                problem = json.loads(body)
                assert headers["Content-Type"].startswith("application/problem+json")
                assert "not available in this service" in problem["detail"], (method, path)
        print(json.dumps(outcomes, indent=1))
        assert up.seen == [], [x.get("X-Forwarded-Uri") for x in up.seen]
        # The named attacks are the gate's 403, not some other refusal on the way.
        for method, path in [
            ("GET", "/pty"),
            ("POST", f"/session/{SES}/shell"),
            ("GET", "/file/content?path=/run/secrets/lovd.env"),
            ("GET", "/find?pattern=x"),
            ("POST", "/tui/submit-prompt"),
            ("PATCH", "/config"),
            ("PUT", "/auth/openai"),
        ]:
            assert (await _req(h, method, path, c))[0] == 403, (method, path)


async def test_allowed_routes_reach_opencode_with_their_query(caddy_bin: str) -> None:
    async with harness(allowlist=Allowlist()) as h:
        up = await h.upstream("opencode")
        s, token = await h.fake_session(up)
        c = {**XHR, **cookie(s, token)}
        status, _, body = await _req(h, "GET", "/session?directory=%2Fwork&roots=true", c)
        assert status == 200
        assert json.loads(body)["path"] == "/session?directory=%2Fwork&roots=true"
        prompt = {"parts": [{"type": "text", "text": "Hei"}]}
        url = URL(f"{h.url}/session/{SES}/prompt_async?directory=%2Fwork", encoded=True)
        async with h.http.post(url, json=prompt, headers=c) as r:
            status, echoed = r.status, await r.json()
        # Checked by lovd (bodycheck.py), then sent on with the container's password.
        assert status == 200 and echoed["method"] == "POST", echoed
        assert echoed["path"] == f"/session/{SES}/prompt_async?directory=%2Fwork"
        assert json.loads(echoed["body"]) == prompt
        assert echoed["headers"]["Authorization"] == h.env.basic_auth(s.id)
        assert "Cookie" not in echoed["headers"]
        async with h.http.post(url, json={**prompt, "tools": {"bash": True}}, headers=c) as r:
            assert r.status == 403 and "tools" in (await r.json())["detail"]
        # The GET, lovd's one look at the chat's title before its first prompt
        # (web/chattitle.py) and the checked prompt; not the refused one.
        assert len(up.seen) == 3
        await h.sessions.flush_activity()
        assert h.store.get(s.id).used_at > 0  # type: ignore[union-attr]


async def test_no_websocket_through_the_gate(caddy_bin: str) -> None:
    async with harness(allowlist=Allowlist()) as h:
        up = await h.upstream("opencode")
        s, token = await h.fake_session(up)
        ws = h.url.replace("http", "ws")
        for path in ("/global/event", "/pty/pty_1/connect"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await h.http.ws_connect(ws + path, headers=cookie(s, token))
            assert e.value.status == 403
        assert up.seen == []


# --- part 5: a fair public start ----------------------------------------------------


async def test_a_stopped_session_is_woken_not_replaced(caddy_bin: str, test_image: str) -> None:
    async with harness() as h:
        s, token = await h.sessions.create(wait=True)
        await h.sessions.stop(s.id, "idle-stopped", "no activity for idle_timeout")
        c = cookie(s, token)
        status, headers, _ = await _start(h, c)
        assert status == 303 and "Set-Cookie" not in headers
        assert [x.id for x in h.sessions.all()] == [s.id]
        status, _, body = await _req(h, "GET", "/cgi-bin/echo", {**XHR, **c})  # held, woken
        assert status == 200 and json.loads(body)["session_id"] == s.id


async def test_three_anonymous_starts_then_a_fourth_visitor(
    caddy_bin: str, test_image: str
) -> None:
    """The acceptance test: served, or told a wait of at most unused_timeout; after that
    wait and a cleanup pass, a place is free."""
    unused = 6
    settings = {
        "unused_timeout": unused,
        "limits": {"max_running": 3},
        # Three starts from one address (127.0.0.1) is the point here.
        "browser": {"start_limit": 10, "max_running_per_client": 3},
    }
    async with harness(settings=settings) as h:
        cookies = []
        for _ in range(3):
            status, headers, _ = await _start(h)
            assert status == 303, headers
            cookies.append({"Cookie": headers["Set-Cookie"].split(";", 1)[0]})
        await until(
            lambda: all(s.status == "running" for s in h.sessions.all()),
            30,
            "the three sessions running",
            step=0.1,
        )
        # The fourth visitor: the landing page and the refused start tell the same wait.
        status, headers, body = await _req(h, "GET", "/", NAV)
        assert status == 200 and "All 3 places are in use right now" in body
        told = int(headers["Retry-After"])
        assert 1 <= told <= unused
        assert f"one should free up within {human_seconds(told)}" in body
        status, headers, body = await _start(h)
        if status == 303:  # served after all (a place freed meanwhile)
            return
        assert status == 429, body
        told = int(headers["Retry-After"])
        assert 1 <= told <= unused
        assert f"try again in {human_seconds(told)}" in body
        await asyncio.sleep(told + 0.2)
        await h.sessions.cleanup()  # the housekeeping pass lovd runs periodically
        assert "idle-stopped" in [s.status for s in h.sessions.all()]
        status, headers, _ = await _start(h)
        assert status == 303 and headers["Set-Cookie"].startswith("lovd_session=")
        # The unused sessions kept their cookies: they wake when a place is free again.
        for c in cookies:
            assert (await _req(h, "GET", "/_lovd/status", c))[0] == 200


# --- issue 15: planted links, headers, places per address ---------------------------


def _form(page: str) -> dict[str, str]:
    import re

    return dict(re.findall(r'name="(\w+)" value="([^"]*)"', page))


async def test_a_planted_link_never_replaces_a_live_cookie(caddy_bin: str) -> None:
    async with harness() as h:
        mine, theirs = await h.upstream("victim"), await h.upstream("attacker")
        victim, secret = await h.fake_session(mine)
        attacker, _ = await h.fake_session(theirs)
        planted = await h.sessions.new_link(attacker.id)
        vc = cookie(victim, secret)
        # The victim follows the attacker's link from another site: a page, no cookie.
        cross = {**NAV, "Sec-Fetch-Site": "cross-site", **vc}
        status, headers, page = await _req(h, "GET", f"/c/{attacker.id}?token={planted}", cross)
        assert status == 200 and "Set-Cookie" not in headers
        assert victim.id in page and attacker.id in page
        assert headers["X-Frame-Options"] == "DENY"  # the page cannot be framed either
        status, _, body = await _req(h, "GET", "/x", {**XHR, **vc})
        assert status == 200 and json.loads(body)["upstream"] == "victim"
        # The attacker's site submits the page's form for the victim: refused.
        form = _form(page)
        post = {"Content-Type": "application/x-www-form-urlencoded", "Origin": h.url, **vc}
        async with h.http.post(
            h.url + f"/c/{attacker.id}", data=form, allow_redirects=False,
            headers={**post, "Sec-Fetch-Site": "cross-site"},
        ) as r:  # fmt: skip
            assert r.status == 403 and "Set-Cookie" not in r.headers
        status, _, body = await _req(h, "GET", "/x", {**XHR, **vc})
        assert status == 200 and json.loads(body)["upstream"] == "victim"
        assert theirs.seen == []
        # The person asks to switch on the page itself (same-origin): switched.
        async with h.http.post(
            h.url + f"/c/{attacker.id}", data=form, allow_redirects=False,
            headers={**post, "Sec-Fetch-Site": "same-origin"},
        ) as r:  # fmt: skip
            assert r.status == 303, await r.text()
            assert r.headers["Set-Cookie"].startswith(f"lovd_session={attacker.id}.")
        # The link is spent: a second use (any browser) is refused and says so.
        status, headers, page = await _req(h, "GET", f"/c/{attacker.id}?token={planted}", NAV)
        assert status == 410 and "Set-Cookie" not in headers
        assert "already used" in page and "lovd session link ID" in page


async def test_ui_responses_cannot_be_framed_or_leak_a_referer(caddy_bin: str) -> None:
    """What OpenCode's pages send (a CSP with connect-src *, its own Referrer-Policy)
    leaves Caddy with frame-ancestors 'none', connect-src 'self', X-Frame-Options: DENY
    and Referrer-Policy: no-referrer."""
    from urllib.parse import quote

    async with harness() as h:
        up = await h.upstream("ui")
        s, token = await h.fake_session(up)
        csp = "default-src 'self'; connect-src * data:; img-src 'self' data:"
        path = f"/x?csp={quote(csp)}&referrer=unsafe-url"
        async with h.http.get(h.url + path, headers=cookie(s, token)) as r:
            assert r.status == 200
            policies = r.headers.getall("Content-Security-Policy")
            assert r.headers.getall("X-Frame-Options") == ["DENY"]
            assert r.headers.getall("Referrer-Policy") == ["no-referrer"]
        assert "frame-ancestors 'none'" in policies
        [opencode] = [p for p in policies if "default-src" in p]
        assert "connect-src 'self' data:" in opencode and "connect-src *" not in opencode
        assert "img-src 'self' data:" in opencode  # the rest of OpenCode's policy stays
        # lovd's own pages (the landing page) too.
        async with h.http.get(h.url + "/", headers=NAV) as r:
            assert r.headers.getall("X-Frame-Options") == ["DENY"]
            assert r.headers.getall("Referrer-Policy") == ["no-referrer"]
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]


async def test_a_fourth_start_from_one_address_while_another_gets_a_place(
    caddy_bin: str, test_image: str
) -> None:
    """browser.max_running_per_client through Caddy: the client address is the one
    Caddy sees (127.0.0.1 and 127.0.0.2 here), whatever X-Forwarded-For a client sends."""
    settings = {"limits": {"max_running": 4},
                "browser": {"start_limit": 10, "max_running_per_client": 3}}  # fmt: skip
    async with harness(settings=settings) as h:
        for _ in range(3):
            status, headers, body = await _start(h, {"X-Forwarded-For": "203.0.113.1"})
            assert status == 303, body
        status, headers, body = await _start(h, {"X-Forwarded-For": "203.0.113.2"})
        assert status == 429 and int(headers["Retry-After"]) > 0
        assert "Your address already has 3 session(s) running" in body
        assert len(h.sessions.all()) == 3
        conn = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(
            connector=conn, cookie_jar=aiohttp.DummyCookieJar()
        ) as other, other.post(
            h.url + "/_lovd/start", allow_redirects=False,
            headers={"Origin": h.url, "Sec-Fetch-Site": "same-origin"},
        ) as r:  # fmt: skip
            assert r.status == 303, await r.text()
        assert len(h.sessions.all()) == 4
