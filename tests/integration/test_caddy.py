"""The browser path against a real Caddy 2.6: config management, auth, routing, waking.

Session containers are real (the test image: busybox httpd with the OpenCode contract —
Basic auth with the session password, /cgi-bin/echo names the session). Streaming tests
are in test_caddy_streaming.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest

from lovd.caddy import GATE_KEY_PLACEHOLDER, CaddyAdmin, Site, render_server
from tests.conftest import ROOT
from tests.integration.caddy_harness import Harness, cookie, free_port, harness
from tests.waiting import until

pytestmark = [pytest.mark.caddy]

NAV = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate"}
XHR = {"Accept": "application/json", "Sec-Fetch-Mode": "cors"}


async def _get(
    h: Harness, path: str, headers: dict[str, str] | None = None, **kw: object
) -> tuple[int, dict[str, str], str]:
    async with h.http.get(h.url + path, headers=headers or {}, allow_redirects=False, **kw) as r:  # type: ignore[arg-type]
        return r.status, dict(r.headers), await r.text()


async def _container_session(h: Harness) -> tuple[str, str]:
    s, token = await h.sessions.create(wait=True)
    return s.id, token


# --- Caddy config management -------------------------------------------------------


def test_shipped_json_is_what_lovd_pushes() -> None:
    shipped = json.loads((ROOT / "caddy" / "lovd.caddy.json").read_text())
    assert shipped == render_server(Site("lovd", (":80",), "/run/lovd/auth.sock"))
    # The documentation shows a placeholder, never a gate key.
    text = (ROOT / "caddy" / "lovd.caddy.json").read_text()
    assert GATE_KEY_PLACEHOLDER in text
    assert GATE_KEY_PLACEHOLDER in (ROOT / "caddy" / "lovd.caddyfile").read_text()


async def test_apply_is_idempotent_and_touches_only_lovds_id(caddy_bin: str) -> None:
    async with harness(run_manager=False) as h:
        admin = CaddyAdmin(h.caddy.admin_address)
        try:
            # An operator's own server must survive everything lovd does.
            other = {
                "listen": ["127.0.0.1:0"],
                "routes": [{"handle": [{"handler": "static_response", "body": "operator"}]}],
            }
            await admin.send("POST", "/config/apps", {"http": {"servers": {"op": other}}})
            assert await h.manager.apply() is True
            assert await h.manager.apply() is False  # unchanged: no write, no reload
            assert h.manager.applies == 1
            assert await admin.get("/config/apps/http/servers/op") == other
            assert await admin.get("/id/lovd") == h.manager.desired
            await h.routable()
            # Somebody loads a config without lovd's server: the check puts it back.
            await admin.send("POST", "/load", json.loads(h.caddy.base.read_text()))
            assert await admin.get("/id/lovd") is None
            await h.manager.check()
            assert h.manager.ok and await admin.get("/id/lovd") == h.manager.desired
            # Drift inside lovd's object is repaired too.
            await admin.send("PATCH", "/id/lovd/listen", [f"127.0.0.1:{free_port()}"])
            assert await h.manager.apply() is True
            assert await admin.get("/id/lovd") == h.manager.desired
        finally:
            await admin.close()


async def test_unreachable_caddy_is_reported_not_fatal(caddy_bin: str) -> None:
    async with harness(run_manager=False) as h:
        await h.caddy.kill9()
        await h.manager.check()
        ok, detail = await h.manager.health()
        assert not ok and "unreachable" in detail
        await h.caddy.start()
        await h.manager.check()
        assert (await h.manager.health())[0]


async def test_caddy_kill9_restart_routes_again_within_5s(caddy_bin: str, test_image: str) -> None:
    async with harness() as h:
        sid, token = await _container_session(h)
        c = {"Cookie": f"lovd_session={sid}.{token}"}
        status, _, body = await _get(h, "/cgi-bin/echo", c)
        assert status == 200 and json.loads(body)["session_id"] == sid
        await h.caddy.kill9()
        await h.caddy.start()  # fresh Caddy: admin only, lovd's server is gone
        answered: list[str] = []

        async def routed() -> bool:
            try:
                status, _, body = await _get(
                    h, "/cgi-bin/echo", c, timeout=aiohttp.ClientTimeout(total=1)
                )
            except (aiohttp.ClientError, TimeoutError):
                return False
            answered[:] = [body]
            return status == 200

        elapsed = await until(routed, 5, "routing back after Caddy's restart", step=0.05)
        assert json.loads(answered[0])["session_id"] == sid
        print(f"routing back {elapsed:.2f} s after Caddy restart")


# --- auth ---------------------------------------------------------------------------


async def test_no_cookie_gets_landing_page_or_401(caddy_bin: str) -> None:
    async with harness() as h:
        status, headers, body = await _get(h, "/", NAV)
        assert status == 200 and "Start a new session" in body
        assert 'action="/_lovd/start"' in body
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        status, headers, body = await _get(h, "/global/health", XHR)
        assert status == 401 and headers["Content-Type"].startswith("application/problem+json")
        assert "WWW-Authenticate" not in headers
        status, _, body = await _get(h, "/some/page", NAV)
        assert status == 401 and "<h1>" in body and "Start a new session" in body
        # Static assets are local (no CDN).
        status, headers, _ = await _get(h, "/_lovd/static/lovd.css")
        assert status == 200 and headers["Content-Type"].startswith("text/css")


async def test_entry_link_sets_cookie_and_proxies_with_container_password(
    caddy_bin: str, test_image: str
) -> None:
    async with harness() as h:
        sid, _ = await _container_session(h)
        link = await h.sessions.new_link(sid)
        status, headers, _ = await _get(h, f"/c/{sid}?token={link}")
        assert status == 303 and headers["Location"] == "/"
        set_cookie = headers["Set-Cookie"]
        assert set_cookie.startswith(f"lovd_session={sid}.")
        token = set_cookie.split(";", 1)[0].split(".", 1)[1]  # a fresh secret, not the link's
        assert token != link
        assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
        assert "Path=/" in set_cookie and "Secure" not in set_cookie  # plain HTTP here
        # The container demands its own password; the proxy path adds it.
        status, headers, body = await _get(
            h, "/cgi-bin/echo", {"Cookie": f"lovd_session={sid}.{token}"}
        )
        assert status == 200, body
        assert json.loads(body)["session_id"] == sid
        assert "X-Lovd-Upstream" not in headers
        assert "Authorization" not in headers  # never shown to the browser
        # A client-sent Authorization is replaced, not passed through.
        status, _, _ = await _get(
            h,
            "/cgi-bin/echo",
            {"Cookie": f"lovd_session={sid}.{token}", "Authorization": "Basic b3BlbmNvZGU6eA=="},
        )
        assert status == 200
        # Directly (without the proxy) the container refuses: the password matters.
        port = h.store.get(sid).port  # type: ignore[union-attr]
        async with h.http.get(f"http://127.0.0.1:{port}/cgi-bin/echo") as r:
            assert r.status == 401


async def test_secure_cookie_over_https(caddy_bin: str) -> None:
    async with harness() as h:
        up = await h.upstream("a")
        s, _ = await h.fake_session(up)
        link = await h.sessions.new_link(s.id)
        conn = aiohttp.UnixConnector(path=h.auth_socket)
        async with (
            aiohttp.ClientSession(connector=conn) as direct,
            direct.get(
                f"http://lovd/c/{s.id}?token={link}",
                allow_redirects=False,
                headers={"X-Forwarded-Proto": "https"},
            ) as r,
        ):
            sc = r.headers["Set-Cookie"]
        assert sc.startswith(f"__Host-lovd_session={s.id}.")
        token = sc.split(";", 1)[0].split(".", 1)[1]
        assert "Secure" in sc and "HttpOnly" in sc and "Path=/" in sc and "Domain" not in sc
        # The __Host- cookie works through Caddy as well.
        status, _, body = await _get(h, "/x", {"Cookie": f"__Host-lovd_session={s.id}.{token}"})
        assert status == 200 and json.loads(body)["upstream"] == "a"


async def test_wrong_and_expired_tokens(caddy_bin: str) -> None:
    async with harness() as h:
        up = await h.upstream("a")
        s, token = await h.fake_session(up)
        link = await h.sessions.new_link(s.id)
        status, _, _ = await _get(h, f"/c/{s.id}?token=wrong")
        assert status == 401
        status, _, _ = await _get(h, "/x", {"Cookie": f"lovd_session={s.id}.wrong"})
        assert status == 401
        status, headers, body = await _get(h, "/x", {**NAV, "Cookie": f"lovd_session={s.id}.x"})
        assert status == 401 and "Max-Age=0" in headers.get("Set-Cookie", "")
        await h.store.update(s.id, expires_at=time.time() - 1)
        status, _, body = await _get(h, "/x", cookie(s, token))
        assert status == 403 and "expired" in body
        status, _, _ = await _get(h, f"/c/{s.id}?token={link}")
        assert status == 403
        assert up.seen == []  # nothing reached the upstream


async def test_forged_internal_headers_are_ignored(caddy_bin: str) -> None:
    async with harness() as h:
        a, b = await h.upstream("a"), await h.upstream("b")
        sa, ta = await h.fake_session(a)
        await h.fake_session(b)
        forged = {"X-Lovd-Upstream": f"127.0.0.1:{b.port}", "X-Lovd-Anything": "1"}
        status, _, _ = await _get(h, "/x", forged)
        assert status == 401 and b.seen == []
        status, _, body = await _get(h, "/x", {**forged, **cookie(sa, ta)})
        assert status == 200
        got = json.loads(body)
        assert got["upstream"] == "a"
        assert not any(k.lower().startswith("x-lovd") for k in got["headers"])
        assert b.seen == []


async def test_cookie_of_b_never_reaches_a(caddy_bin: str, test_image: str) -> None:
    async with harness() as h:
        a_id, a_token = await _container_session(h)
        b_id, b_token = await _container_session(h)
        # B's token with A's id (and vice versa) is refused.
        for sid, tok in ((a_id, b_token), (b_id, a_token)):
            status, _, _ = await _get(h, "/cgi-bin/echo", {"Cookie": f"lovd_session={sid}.{tok}"})
            assert status == 401
        # Each cookie reaches its own container only, whatever else the request says.
        for sid, tok, other in ((a_id, a_token, b_id), (b_id, b_token, a_id)):
            other_port = h.store.get(other).port  # type: ignore[union-attr]
            status, _, body = await _get(
                h,
                "/cgi-bin/echo",
                {
                    "Cookie": f"lovd_session={sid}.{tok}",
                    "X-Lovd-Upstream": f"127.0.0.1:{other_port}",
                },
            )
            assert status == 200 and json.loads(body)["session_id"] == sid


async def test_twenty_bad_tokens_get_429(caddy_bin: str) -> None:
    async with harness() as h:
        up = await h.upstream("a")
        s, token = await h.fake_session(up)
        statuses = []
        for i in range(20):
            status, headers, _ = await _get(h, "/x", {"Cookie": f"lovd_session={s.id}.bad{i}"})
            statuses.append(status)
        assert statuses[0] == 401
        assert 429 in statuses and statuses[-1] == 429
        status, headers, body = await _get(h, "/x", {**NAV, "Cookie": f"lovd_session={s.id}.x"})
        assert status == 429 and int(headers["Retry-After"]) > 0
        assert "try again in" in body
        status, _, _ = await _get(h, f"/c/{s.id}?token=bad")
        assert status == 429  # the entry link is limited by the same counter
        # Everybody here shares 127.0.0.1, like users behind one NAT: the valid cookie
        # and the valid link still work (tests/integration/test_gate_caddy.py).
        status, _, body = await _get(h, "/x", {**NAV, **cookie(s, token)})
        assert status == 200 and json.loads(body)["upstream"] == "a"
        link = await h.sessions.new_link(s.id)
        assert (await _get(h, f"/c/{s.id}?token={link}"))[0] == 303


async def test_delete_revokes(caddy_bin: str, test_image: str) -> None:
    async with harness() as h:
        sid, token = await _container_session(h)
        c = {"Cookie": f"lovd_session={sid}.{token}"}
        assert (await _get(h, "/cgi-bin/echo", c))[0] == 200
        await h.sessions.delete(sid)
        status, _, body = await _get(h, "/cgi-bin/echo", c)
        assert status == 401 and "does not exist" in body


async def test_a_request_that_is_not_chat_is_no_activity(caddy_bin: str) -> None:
    """Polls keep no place (tests/unit/test_places.py: prompts do)."""
    async with harness() as h:
        up = await h.upstream("a")
        s, token = await h.fake_session(up)
        h.sessions.activity.clear()
        assert (await _get(h, "/x", cookie(s, token)))[0] == 200
        assert s.id not in h.sessions.activity


# --- landing page and starting from the browser -------------------------------------


async def _start(
    h: Harness, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    async with h.http.post(
        h.url + "/_lovd/start",
        headers={"Origin": h.url, "Sec-Fetch-Site": "same-origin", **(headers or {})},
        allow_redirects=False,
    ) as r:
        return r.status, dict(r.headers), await r.text()


async def test_start_from_browser_progress_then_session(caddy_bin: str, test_image: str) -> None:
    async with harness() as h:
        status, headers, _ = await _start(h)
        assert status == 303 and headers["Location"] == "/"
        value = headers["Set-Cookie"].split(";", 1)[0]
        assert value.startswith("lovd_session=") and "HttpOnly" in headers["Set-Cookie"]
        c = {"Cookie": value}
        # Right away the session is starting: a navigation gets the progress page.
        status, headers, body = await _get(h, "/", {**NAV, **c})
        if status == 503:
            assert "Starting your session" in body and headers["Retry-After"] == "2"
            assert "/_lovd/static/progress.js" in body

        # The progress page polls /_lovd/status until ready.
        async def ready() -> bool:
            status, _, body = await _get(h, "/_lovd/status", c)
            assert status == 200
            return bool(json.loads(body)["ready"])

        await until(ready, 30, "/_lovd/status ready", step=0.2)
        status, _, body = await _get(h, "/", {**NAV, **c})
        assert status == 200 and "lovd test session" in body
        # Starting again with a live session just goes back to it.
        status, headers, _ = await _start(h, c)
        assert status == 303 and "Set-Cookie" not in headers


async def test_start_from_browser_claims_a_warm_container(caddy_bin: str, test_image: str) -> None:
    async with harness(settings={"warm_pool": 1}) as h:
        pool = h.sessions.pool(h.config.warm_max_age)
        assert await pool.fill()
        [warm] = h.sessions.warm()
        status, headers, _ = await _start(h)
        assert status == 303
        value = headers["Set-Cookie"].split(";", 1)[0]
        assert value.startswith(f"lovd_session={warm.id}.")
        # Already booted: the very first navigation reaches the container.
        pages: list[str] = []

        async def served() -> bool:
            status, _, body = await _get(h, "/", {**NAV, "Cookie": value})
            pages[:] = [body]
            return status == 200

        await until(served, 10, "the chat page", step=0.1)
        assert "lovd test session" in pages[0]
        assert h.sessions.get(warm.id).status == "running"


async def test_start_refused_cross_site(caddy_bin: str) -> None:
    async with harness() as h:
        status, _, _body = await _start(h, {"Sec-Fetch-Site": "cross-site"})
        assert status == 403
        assert h.store.all() == []


async def test_start_is_rate_limited_per_client(caddy_bin: str) -> None:
    # max_running 1 and a running row: starts are refused by admission, which still
    # counts against the per-client start limit (2 here) without running containers.
    async with harness(settings={"browser": {"start_limit": 2}, "limits": {"max_running": 1}}) as h:
        up = await h.upstream("a")
        await h.fake_session(up)
        for _ in range(2):
            status, _, _ = await _start(h)
            assert status == 429  # admission, not the start limit
        status, headers, body = await _start(h)
        assert status == 429 and "You have started 2 sessions recently" in body
        assert int(headers["Retry-After"]) > 0


async def test_refusal_is_human_readable(caddy_bin: str) -> None:
    async with harness(settings={"limits": {"max_running": 2}}) as h:
        await h.fake_session(await h.upstream("a"))
        await h.fake_session(await h.upstream("b"))
        status, headers, body = await _start(h)
        assert status == 429 and int(headers["Retry-After"]) > 0
        assert "All 2 places are in use — try again in" in body
        assert 'role="alert"' in body


# --- wake on request -------------------------------------------------------------


async def test_wake_on_request_holds_api_and_shows_page_to_navigation(
    caddy_bin: str, test_image: str
) -> None:
    async with harness() as h:
        sid, token = await _container_session(h)
        c = {"Cookie": f"lovd_session={sid}.{token}"}
        await h.sessions.stop(sid, "idle-stopped", "no activity for idle_timeout")
        assert h.store.get(sid).status == "idle-stopped"  # type: ignore[union-attr]
        status, headers, body = await _get(h, "/", {**NAV, **c})
        assert status == 503 and "Waking up your session" in body
        assert headers["Retry-After"] == "2"
        # An API request is held until the container answers: never a 502.
        t0 = time.monotonic()
        status, _, body = await _get(h, "/cgi-bin/echo", {**XHR, **c})
        assert status == 200 and json.loads(body)["session_id"] == sid
        print(f"API request held {time.monotonic() - t0:.2f} s while waking")
        assert h.store.get(sid).status == "running"  # type: ignore[union-attr]

        # Concurrent requests to a stopped session share one wake-up.
        await h.sessions.stop(sid, "idle-stopped", "again")
        results = await asyncio.gather(*[_get(h, "/cgi-bin/echo", {**XHR, **c}) for _ in range(8)])
        assert [r[0] for r in results] == [200] * 8


async def test_wake_refused_when_full_says_why(caddy_bin: str, test_image: str) -> None:
    async with harness(settings={"limits": {"max_running": 1}}) as h:
        sid, token = await _container_session(h)
        await h.sessions.stop(sid, "idle-stopped", "idle")
        up = await h.upstream("a")
        await h.fake_session(up)  # takes the only place
        c = {"Cookie": f"lovd_session={sid}.{token}"}
        status, headers, body = await _get(h, "/cgi-bin/echo", {**XHR, **c})
        assert status == 429 and int(headers["Retry-After"]) > 0
        assert json.loads(body)["code"] == "too-many-sessions"
        status, _, body = await _get(h, "/", {**NAV, **c})
        assert status == 503  # the page, which then reports the refusal:

        async def refused() -> bool:
            _, _, body = await _get(h, "/_lovd/status", c)
            return bool(json.loads(body)["error"])

        await until(refused, 5, "/_lovd/status reporting the refusal")
        status, _, body = await _get(h, "/_lovd/status", c)
        data = json.loads(body)
        assert data["error"] and "The only place is in use — try again in" in data["message"]


def test_caddy_files_exist() -> None:
    for name in ("Caddyfile", "base.json", "lovd.caddyfile", "lovd.caddy.json"):
        assert (Path(ROOT) / "caddy" / name).is_file()
