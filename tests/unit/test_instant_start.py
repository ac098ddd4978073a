"""The landing page that runs the chat UI in place (web/static/instant.js, issue 17):
``POST /_lovd/start`` asked for JSON by the page's script keeps every rule of the form's
start, and the landing page carries the UI only while it holds no session. In Chromium
through real Caddy: tests/browser/test_first_minute.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lovd.web.assets import UiAssets, UiSet
from lovd.web.pages import PAGE_HEADERS, UI_PAGE_CSP
from tests.unit.test_gate import Gate, open_gate

FETCH = {"Accept": "application/json", "Sec-Fetch-Site": "same-origin", "Accept-Language": "en"}
ENTRY = "/assets/index-A1b2C3d4.js"


@pytest.fixture
async def g(tmp_path: Path, free_ports: list[int]) -> AsyncIterator[Gate]:
    async with open_gate(tmp_path, free_ports) as gate:
        yield gate


def _store_ui(g: Gate, tmp_path: Path) -> None:
    assets = UiAssets(tmp_path / "ui", http=None)  # type: ignore[arg-type]
    files = {ENTRY: b"x", "/assets/index-Q1w2E3r4.css": b"y"}
    ui = UiSet("1.18.33", sorted(files), [ENTRY], ["/assets/index-Q1w2E3r4.css"])
    assets._write(ui, files)
    g.gate.prep.assets = assets
    g.gate.prep.next_version = "1.18.33"


async def test_the_scripts_start_answers_json_and_sets_the_cookie(g: Gate) -> None:
    chat = "/L3dvcms/session/ses_abc"
    g.gate.prep.first_chat = lambda sid: chat  # type: ignore[method-assign]
    g.gate.prep.version_of = lambda sid: "1.18.33"  # type: ignore[method-assign]
    r = await g.client.post("/_lovd/start", headers=FETCH, allow_redirects=False)
    assert r.status == 200, await r.text()
    assert await r.json() == {"location": chat, "ui_version": "1.18.33"}
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["Set-Cookie"].startswith("lovd_session=")
    assert "HttpOnly" in r.headers["Set-Cookie"]
    assert len([s for s in g.sessions.all() if s.token_hash]) == 1
    # The form (no JSON asked) still gets the redirect.
    form = {"Sec-Fetch-Site": "same-origin", "Accept-Language": "en"}
    r = await g.client.post("/_lovd/start", headers=form, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == chat


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
async def test_a_foreign_pages_fetch_starts_nothing(g: Gate, site: str) -> None:
    # Asking for JSON changes nothing about who may start: only this site's own page.
    r = await g.client.post(
        "/_lovd/start", headers={**FETCH, "Sec-Fetch-Site": site}, allow_redirects=False
    )
    assert r.status == 403
    assert "Set-Cookie" not in r.headers
    assert g.sessions.all() == []


async def test_a_browser_with_a_live_session_is_sent_to_it(g: Gate) -> None:
    s, token = await g.session()
    headers = {**FETCH, "Cookie": f"lovd_session={s.id}.{token}"}
    r = await g.client.post("/_lovd/start", headers=headers, allow_redirects=False)
    assert r.status == 200 and await r.json() == {"location": "/", "ui_version": ""}
    assert "Set-Cookie" not in r.headers
    assert [x.id for x in g.sessions.all()] == [s.id]


async def test_only_the_landing_page_carries_the_ui(g: Gate, tmp_path: Path) -> None:
    r = await g.client.get("/", headers={"Accept-Language": "en"})
    # Nothing stored yet: lovd's own page, its strict CSP, no script of the UI.
    assert r.headers["Content-Security-Policy"] == PAGE_HEADERS["Content-Security-Policy"]
    assert "instant.js" not in await r.text()
    _store_ui(g, tmp_path)
    r = await g.client.get("/", headers={"Accept-Language": "en"})
    page = await r.text()
    assert r.status == 200
    assert f'data-entry="{ENTRY}"' in page and f'<link rel="modulepreload" href="{ENTRY}">' in page
    # The UI will run in this document: OpenCode's own CSP, connect-src this origin only,
    # and still not framable.
    assert r.headers["Content-Security-Policy"] == UI_PAGE_CSP
    assert "connect-src 'self' data:;" in UI_PAGE_CSP and "frame-ancestors 'none'" in UI_PAGE_CSP
    assert "script-src 'self' 'wasm-unsafe-eval';" in UI_PAGE_CSP  # no inline script
    # It holds no session: no cookie is set, and nothing of one is in it.
    assert "Set-Cookie" not in r.headers and "ses_" not in page
    assert r.headers["Cache-Control"] == "no-store"
    # instant.js is served like lovd's other static files.
    js = await g.client.get("/_lovd/static/instant.js")
    assert js.status == 200 and "text/javascript" in js.headers["Content-Type"]
    # A refusal (here: too many starts) is lovd's own strict page, without the UI.
    g.gate.starts.limit = 1
    form = {"Sec-Fetch-Site": "same-origin", "Accept-Language": "en"}
    r = await g.client.post("/_lovd/start", headers=form, allow_redirects=False)
    assert r.status == 303
    r = await g.client.post("/_lovd/start", headers=FETCH, allow_redirects=False)
    assert r.status == 429 and r.content_type == "text/html"  # instant.js shows it
    assert r.headers["Content-Security-Policy"] == PAGE_HEADERS["Content-Security-Policy"]
    assert "instant.js" not in await r.text()
