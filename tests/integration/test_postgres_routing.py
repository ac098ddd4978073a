"""Browser routing across hosts: two lovd hosts, each with its own Caddy site, one front.

The browser only ever talks to the front Caddy (host A's). A session on host B is
reached through A's forward_auth answering with B's ``postgres.upstream`` (B's Caddy),
where B's own gate checks the cookie (lovd/sync/routing.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import need
from tests.integration.caddy_harness import CaddyProc, free_port
from tests.integration.test_postgres import cleanup
from tests.lovdproc import LovdProc
from tests.pg import PgCluster, cluster

pytestmark = [pytest.mark.podman, pytest.mark.caddy]


@pytest.fixture
def pg() -> Iterator[PgCluster]:
    with cluster() as c:
        yield c


def host(tmp: Path, pg: PgCluster, name: str, caddy: CaddyProc, port: int, front: str) -> LovdProc:
    return LovdProc(
        tmp,
        host_id=name,
        public_url=front,  # every host: the front's URL (the Host header passes through)
        caddy={
            "admin": caddy.admin_address,
            "listen": [f"127.0.0.1:{port}"],
            "auth_socket": str(tmp / "auth.sock"),
            "check_interval": 0.5,
        },
        postgres={
            "dsn": pg.dsn,
            "upstream": f"127.0.0.1:{port}",
            "heartbeat_interval": 0.5,
            "host_stale_after": 2.0,
        },
    )


async def open_in_browser(front: str, s: dict[str, Any]) -> tuple[str, str]:
    """Follow the session's link on the front Caddy, then load the app; the page text
    and the cookie (name=value) the link gave the browser."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address host
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(f"{front}/c/{s['id']}?token={s['token']}",
                            allow_redirects=False) as r:  # fmt: skip
            assert r.status == 303, await r.text()
            got = r.headers["Set-Cookie"].split(";", 1)[0]
        async with http.get(f"{front}/", headers={"Accept": "text/html",
                                                  "Sec-Fetch-Mode": "navigate"}) as r:  # fmt: skip
            text = await r.text()
            assert r.status == 200, text[:500]
            return text, got


async def test_a_browser_on_the_front_reaches_a_session_on_either_host(
    tmp_path: Path, pg: PgCluster, test_image: str, caddy_bin: str
) -> None:
    from lovd.web.gate import BrowserGate

    need(
        hasattr(BrowserGate, "elsewhere"),
        "the gate does not route to other hosts yet: BrowserGate.auth and Public.entry must "
        "ask gate.elsewhere(sid) (lovd/sync/routing.py says how)",
    )
    caddies = []
    procs: list[LovdProc] = []
    try:
        ports = [free_port(), free_port()]
        front = f"http://127.0.0.1:{ports[0]}"
        for name, port in zip(("host-a", "host-b"), ports, strict=True):
            d = tmp_path / name
            (d / "caddy").mkdir(parents=True)
            caddy = CaddyProc(d / "caddy")
            await caddy.start()
            caddies.append(caddy)
            procs.append(host(d, pg, name, caddy, port, front))
        for p in procs:
            await asyncio.to_thread(p.start)
        a, b = procs
        sa = (await asyncio.to_thread(a.api, "POST", "/api/sessions"))[2]
        sb = (await asyncio.to_thread(b.api, "POST", "/api/sessions"))[2]
        assert sa.get("status") == sb.get("status") == "running", (sa, sb)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # B's rows in PostgreSQL, both sites in Caddy
            listed = (await asyncio.to_thread(a.api, "GET", "/api/sessions?scope=all"))[2]
            if len(listed.get("sessions", [])) == 2:
                break
            await asyncio.sleep(0.1)
        # Each session's page comes through the front: for B's, only B's gate could have
        # accepted the cookie (A has no hash for its token) and named its container.
        got = {}
        for s in (sa, sb):
            text, got[s["id"]] = await open_in_browser(front, s)
            assert "lovd test session" in text
        # A wrong token for B's session is judged by B (A would not know the session).
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"{front}/global/health", headers={"Cookie": f"lovd_session={sb['id']}.wrong"}
            ) as r,
        ):
            assert r.status == 401
            assert "wrong or old token" in await r.text()
        # B's lovd stops: shown as not alive; its users get a retryable error, keep their
        # cookie, and are back as soon as B's lovd is.
        await asyncio.to_thread(b.stop)
        await asyncio.sleep(2.5)  # host_stale_after, and the resolver's cache
        listed = (await asyncio.to_thread(a.api, "GET", "/api/sessions?scope=all"))[2]
        assert {h["host_id"]: h["alive"] for h in listed["hosts"]} == {
            "host-a": True,
            "host-b": False,
        }
        valid = {"Cookie": got[sb["id"]]}
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{front}/global/health", headers=valid) as r,
        ):
            assert r.status >= 500 and "Set-Cookie" not in r.headers, r.status
        await asyncio.to_thread(b.start)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{front}/global/health", headers=valid) as r,
        ):
            assert r.status == 200, await r.text()
    finally:
        for p in procs:
            await asyncio.to_thread(cleanup, p)
        for c in caddies:
            await c.stop()
