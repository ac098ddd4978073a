"""OpenCode's UI files from Caddy (lovd/web/assets.py), compression, and the short click.

Real Caddy in every test; the last ones run the real OpenCode session image in the warm
pool: its UI files are stored, hold no secret, and ``POST /_lovd/start`` redirects
straight into the chat made before the claim.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from pathlib import Path

import pytest

from lovd.caddy import ASSET_CACHE, ui_root
from lovd.web.assets import UiAssets, UiSet
from tests.conftest import need
from tests.integration.caddy_harness import Harness, caddy_binary, cookie, harness
from tests.waiting import until

pytestmark = pytest.mark.asyncio

BUNDLE = b"export const x = '" + b"lovd ui bundle " * 400 + b"';\n"


def _store(www_root: Path) -> None:
    """A stored UI as assets.py writes it (the file and its compressed siblings)."""
    files = {
        "/assets/index-AbC12_-3.js": BUNDLE,
        "/assets/Inter.ttf": b"\0" * 300,
        "/favicon-v3.svg": b"<svg/>" * 100,
    }
    ui = UiSet(version="9.9.9", files=sorted(files))
    assets = UiAssets(www_root, http=None)  # type: ignore[arg-type]  # no fetching here
    assets._write(ui, files)


async def test_ui_files_come_from_caddy_without_the_gate() -> None:
    need(caddy_binary() is not None, "caddy not installed")
    async with harness() as h:
        _store(ui_root(h.config))
        # No cookie at all: Caddy answers from disk, lovd's gate is never asked.
        for enc, want in (("zstd, gzip", "zstd"), ("gzip", "gzip"), ("identity", None)):
            async with h.http.get(
                h.url + "/assets/index-AbC12_-3.js", headers={"Accept-Encoding": enc}
            ) as r:
                body = await r.read()
                assert r.status == 200, body[:200]
                assert r.headers["Cache-Control"] == ASSET_CACHE
                assert r.headers.get("Content-Encoding") == want
                assert "javascript" in r.headers["Content-Type"]
                assert r.headers.get("ETag") and r.headers.get("Last-Modified")
                if want is None:
                    assert body == BUNDLE
                else:
                    assert len(body) < len(BUNDLE) / 5
        # Unhashed names may change with an upgrade: cached for an hour only.
        for path in ("/favicon-v3.svg", "/assets/Inter.ttf"):
            async with h.http.get(h.url + path) as r:
                assert r.status == 200, path
                assert r.headers["Cache-Control"] == "public, max-age=3600", path
        # What is not stored stays behind the gate: no cookie, no answer.
        for path in ("/assets/missing-Zz9.js", "/assets/", "/", "/session", "/config"):
            async with h.http.get(
                h.url + path, headers={"Cookie": "lovd_session=x"}, allow_redirects=False
            ) as r:
                assert r.status == 401, (path, r.status)
        # The sets/ index is not served, nor anything outside www/.
        for path in ("/sets/9.9.9.json", "/assets/../sets/9.9.9.json", "/ui/sets/9.9.9.json"):
            async with h.http.get(h.url + path, headers={"Cookie": "lovd_session=x"}) as r:
                assert r.status in (400, 401, 404), (path, r.status)
                assert b"index-AbC12_-3" not in await r.read()


async def test_answers_are_compressed_but_events_arrive_one_by_one() -> None:
    need(caddy_binary() is not None, "caddy not installed")
    async with harness() as h:
        up = await h.upstream("a")
        s, token = await h.fake_session(up)
        hdrs = {**cookie(s, token), "Accept-Encoding": "zstd, gzip"}
        async with h.http.get(h.url + "/cgi-bin/echo?" + "x" * 600, headers=hdrs) as r:
            assert r.status == 200
            assert r.headers.get("Content-Encoding") == "zstd"
        # The landing page (lovd's own HTML) too.
        async with h.http.get(h.url + "/", headers={"Accept-Encoding": "gzip"}) as r:
            assert r.status == 200
            assert r.headers.get("Content-Encoding") == "gzip"
        # SSE: each event is read while the upstream sleeps before writing the next.
        interval = 1.0
        async with h.http.get(h.url + f"/sse?interval={interval}&count=3", headers=hdrs) as r:
            assert r.status == 200
            assert r.headers.get("Content-Encoding") is None
            t0 = time.monotonic()
            seen: list[tuple[float, bytes]] = []
            async for line in r.content:
                if line.startswith(b"data:"):
                    seen.append((time.monotonic() - t0, line.strip()))
                if len(seen) == 3:
                    break
        assert [b for _, b in seen] == [b"data: a 0", b"data: a 1", b"data: a 2"]
        # Event 1 was written ~1 s after event 0 and event 2 ~1 s after that: had
        # Caddy buffered, they would arrive together at the end.
        assert seen[0][0] < interval * 0.7, seen
        assert seen[1][0] < interval * 1.7, seen
        assert seen[2][0] - seen[1][0] > interval * 0.5, seen


async def test_warm_container_stores_its_ui_and_the_click_goes_straight_to_its_chat() -> None:
    need(caddy_binary() is not None, "caddy not installed")
    async with harness(
        image="localhost/lovd-session:latest",
        settings={"warm_pool": 1, "ready_timeout": 60},
    ) as h:
        pool = h.sessions.pool(max_age=3600)
        task = asyncio.create_task(pool.run())
        try:
            await _wait_for_prep(h)
            ui = h.gate.prep.assets.get(h.gate.prep.next_version)
            assert ui is not None
            warm = h.sessions.warm()[0]
            secrets = _secrets_of(h, warm.id)
            _check_stored_ui(ui_root(h.config), ui, secrets)

            # The landing page names the bundle the next session runs.
            async with h.http.get(h.url + "/") as r:
                page = await r.text()
            for script in ui.scripts:
                assert f'<link rel="modulepreload" href="{script}">' in page

            # The click: straight to the chat made before the claim.
            async with h.http.post(
                h.url + "/_lovd/start", headers={"Origin": h.url}, allow_redirects=False
            ) as r:
                assert r.status == 303
                where = r.headers["Location"]
                jar = r.cookies
            m = re.fullmatch(r"/([A-Za-z0-9_-]+)/session/(ses_[A-Za-z0-9]+)", where)
            assert m, where
            assert base64.urlsafe_b64decode(m.group(1) + "==") == b"/work"
            value = jar["lovd_session"].value
            nav = {
                "Cookie": f"lovd_session={value}",
                "Sec-Fetch-Mode": "navigate",
                "Sec-Fetch-Dest": "document",
                "Accept": "text/html",
            }
            async with h.http.get(h.url + where, headers=nav, allow_redirects=False) as r:
                assert r.status == 200
                assert ui.scripts[0] in await r.text()
            # "/" lands in the same chat (the lookup finds the one made before the claim).
            async with h.http.get(h.url + "/", headers=nav, allow_redirects=False) as r:
                assert r.status == 303
                assert r.headers["Location"] == where
        finally:
            task.cancel()


async def _wait_for_prep(h: Harness, timeout: float = 180.0) -> None:
    def prepared() -> bool:
        prep = h.gate.prep
        warm = h.sessions.warm()
        return bool(
            warm
            and warm[0].id in prep._first
            and prep.next_version
            and prep.assets is not None
            and prep.assets.get(prep.next_version) is not None
        )

    await until(prepared, timeout, "the warm container prepared", step=0.5)


def _secrets_of(h: Harness, sid: str) -> list[bytes]:
    auth = h.sessions.container_auth(sid)
    password = base64.b64decode(auth.split(" ", 1)[1]).split(b":", 1)[1]
    assert len(password) >= 16
    return [password, auth.encode(), h.sessions.host_key.hex().encode()]


def _check_stored_ui(root: Path, ui: UiSet, secrets: list[bytes]) -> None:
    www = root / "www"
    assert ui.scripts and ui.scripts[0].startswith("/assets/index-")
    assert len(ui.files) > 50
    assert not (www / "index.html").exists()
    raw = 0
    for path in ui.files:
        f = www / path.lstrip("/")
        body = f.read_bytes()
        raw += len(body)
        assert f.stat().st_mode & 0o004, f"{path} not readable by Caddy's user"
        for secret in secrets:
            assert secret not in body, f"{path} holds a secret"
        assert b"OPENCODE_SERVER_PASSWORD=" not in body
        assert not body.lstrip().lower().startswith(b"<!doctype html"), path
    main = www / ui.scripts[0].lstrip("/")
    assert (main.with_name(main.name + ".gz")).exists()
    assert raw > 1_000_000
    # The shipped OpenCode has the server-scoped chat route instant.js lands on.
    assert ui.server_route
