"""What the landing page prefetches (web/warmprep.py) and where the UI files live."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from lovd import config as config_mod
from lovd.caddy import ui_root
from lovd.session.model import Session, SessionState
from lovd.web.assets import UiAssets, UiSet
from lovd.web.chat_landing import ChatLanding
from lovd.web.warmprep import FIRST_READS, WarmPrep
from tests.unit.test_chat_landing import AUTH, FakeOpenCode, landing


def test_ui_files_live_in_systemds_cache_directory(tmp_path: Path) -> None:
    cfg = config_mod.from_mapping({"state_dir": str(tmp_path / "state")})
    assert ui_root(cfg, {}) == tmp_path / "state" / "ui"
    env = {"CACHE_DIRECTORY": "/var/cache/lovd:/var/cache/other"}
    assert ui_root(cfg, env) == Path("/var/cache/lovd/ui")


@pytest.mark.asyncio
async def test_prefetch_names_the_stored_versions_entry_files(tmp_path: Path) -> None:
    assets = UiAssets(tmp_path / "ui", http=None)  # type: ignore[arg-type]
    prep = WarmPrep(
        http=None,  # type: ignore[arg-type]
        password_header=lambda sid: "",
        landing=ChatLanding(http=None, password_header=lambda sid: ""),  # type: ignore[arg-type]
        assets=assets,
        alive=lambda sid: True,
    )
    assert prep.prefetch_html() == ""  # nothing stored yet: no tags
    files = {"/assets/index-A1b2C3d4.js": b"x", "/assets/index-Q1w2E3r4.css": b"y",
             "/assets/Inter.ttf": b"z", "/assets/no-N0r5kAbc.js": b"n",
             "/assets/nl-N0r5kAbc.js": b"d", "/favicon-v3.svg": b"s"}  # fmt: skip
    ui = UiSet("1.18.33", sorted(files), ["/assets/index-A1b2C3d4.js"],
               ["/assets/index-Q1w2E3r4.css"], ["/assets/Inter.ttf"])  # fmt: skip
    assets._write(ui, files)
    html = prep.prefetch_html()
    assert '<link rel="modulepreload" href="/assets/index-A1b2C3d4.js">' in html
    # The UI's stylesheet is loaded and parsed, but applies to nothing on lovd's page.
    assert (
        '<link rel="stylesheet" href="/assets/index-Q1w2E3r4.css" media="not all" crossorigin'
        in html
    )
    assert '<link rel="prefetch" as="font" href="/assets/Inter.ttf" crossorigin>' in html
    # Only a Norwegian page compiles the UI's Norwegian texts ahead (and not Dutch ones).
    assert "no-N0r5kAbc" not in html and "nl-N0r5kAbc" not in prep.prefetch_html("nb")
    assert '<link rel="modulepreload" href="/assets/no-N0r5kAbc.js">' in prep.prefetch_html("nb")
    # Only the landing page carries the UI's shell: the script and what it runs.
    assert "instant.js" not in html
    shell = prep.prefetch_html("nb", True)
    assert (
        '<script src="/_lovd/static/instant.js" defer data-version="1.18.33" '
        'data-entry="/assets/index-A1b2C3d4.js" data-icon="/favicon-v3.svg"></script>' in shell
    )
    # A UI with the server-scoped chat route: the script is told to land there directly.
    assert "data-route" not in shell
    assets._write(dataclasses.replace(ui, server_route=True), files)
    assert assets.get("1.18.33").server_route  # type: ignore[union-attr]
    assert 'data-icon="/favicon-v3.svg" data-route="server"></script>' in prep.prefetch_html(
        "nb", True
    )
    # A version no container runs any more is not what the next session runs.
    prep.next_version = "0.0.1"
    assert prep.prefetch_html() == ""
    # A claim of a warm container lovd prepared goes straight to its chat, once.
    prep._first["s1"] = "/L3dvcms/session/ses_abc"
    assert prep.first_chat("s1") == "/L3dvcms/session/ses_abc"
    assert prep.first_chat("s1") is None
    prep._versions["s1"] = "1.18.33"
    assert prep.version_of("s1") == "1.18.33" and prep.version_of("s2") == ""


@pytest.mark.asyncio
async def test_a_warm_container_reads_what_the_ui_reads_first() -> None:
    """Before the claim, the container is asked every read the UI makes first (so
    OpenCode's lazy set-up of /work is done), with its password and nothing but GETs
    besides the chat lovd makes; a read that fails does not stop the chat from being made
    and remembered."""
    fake = FakeOpenCode()
    seen: list[tuple[str, str, str]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append((request.method, request.raw_path, request.headers.get("Authorization", "")))
        if request.path == "/agent":
            raise web.HTTPInternalServerError()  # one read fails
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return web.json_response({})

    app = fake.app()
    app.middlewares.append(record)
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            prep = WarmPrep(
                http=http,
                password_header=lambda sid: AUTH,
                landing=landing(http),
                assets=None,
                alive=lambda sid: True,
            )
            await prep.ready(warm_row(server.port or 0))
    finally:
        await server.close()
    assert prep.first_chat("s1") == "/L3dvcms/session/ses_new1"
    gets = {asked(path) for method, path, _ in seen if method == "GET"}
    missing = [p for p in FIRST_READS if asked(p.replace("{chat}", "ses_new1")) not in gets]
    assert missing == []
    assert [(m, p) for m, p, _ in seen if m != "GET"] == [("POST", "/session")]
    assert {auth for _, _, auth in seen} == {AUTH}


def asked(path: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A request as the server reads it (the client may send %2F as /)."""
    url = URL(path)
    return url.path, tuple(sorted(url.query.items()))


def warm_row(port: int) -> Session:
    return Session(id="s1", status=SessionState.WARM, reason="", token_hash="", port=port,
                   container_id="c", host_id="h", created_at=0.0, updated_at=0.0,
                   expires_at=0.0, last_activity=0.0)  # fmt: skip
