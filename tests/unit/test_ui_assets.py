"""lovd/web/assets.py against a stand-in answering as OpenCode 1.18.33's UI server does
(the real one: tests/integration/test_ui_assets.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from lovd.web.assets import UiAssets

pytestmark = pytest.mark.asyncio

SHELL = b"""<!doctype html><html><head>
<link rel="icon" href="/favicon-v3.svg"><link rel="manifest" href="/site.webmanifest">
<script type="module" crossorigin src="/assets/index-AAA.js"></script>
<link rel="stylesheet" crossorigin href="/assets/index-BBB.css">
<link rel="stylesheet" href="https://elsewhere.example/x.css">
</head><body></body></html>"""


def _files(version: str) -> dict[str, bytes]:
    return {
        "/favicon-v3.svg": b"<svg/>" * 80,
        "/site.webmanifest": b'{"icons": [{"src": "/web-app-192.png"}]}',
        "/web-app-192.png": b"\x89PNG" + b"\0" * 50,
        "/assets/index-AAA.js": (
            b'const m={"assets/lazy-CCC.js":1}; import("./chunk-DDD.js");' + b";" * 600
        ),
        "/assets/index-BBB.css": (
            b"@font-face{font-family:Mono Code;src:url(./mono-FFF.woff2)format('woff2')}"
            b"@font-face{font-family:Inter;src:url(./inter-EEE.woff2)} body{}" + b" " * 600
        ),
        "/assets/mono-FFF.woff2": b"wOF2" + b"\2" * 40,
        "/assets/lazy-CCC.js": b"export default 1;" + version.encode(),
        "/assets/chunk-DDD.js": b"export const d = 2; /* assets/../../etc/passwd */",
        "/assets/inter-EEE.woff2": b"wOF2" + b"\1" * 40,
    }


async def _server(version: str, seen: list[str]) -> TestServer:
    files = _files(version)

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.path)
        if request.headers.get("Authorization") != "Basic secret":
            return web.Response(status=401)
        if request.path in files:
            ctype = "text/javascript" if request.path.endswith(".js") else "text/plain"
            return web.Response(body=files[request.path], content_type=ctype)
        return web.Response(body=SHELL, content_type="text/html")  # OpenCode's SPA fallback

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    server = TestServer(app)
    await server.start_server()
    return server


async def test_extract_follows_the_ui_and_stores_only_its_files(tmp_path: Path) -> None:
    seen: list[str] = []
    server = await _server("1", seen)
    try:
        async with aiohttp.ClientSession() as http:
            assets = UiAssets(tmp_path / "ui", http)
            base = str(server.make_url("")).rstrip("/")
            ui = await assets.extract("1.18.33", base, "Basic secret")
    finally:
        await server.close()
    www = tmp_path / "ui" / "www"
    assert set(ui.files) == set(_files("1"))
    assert ui.scripts == ["/assets/index-AAA.js"]
    assert ui.styles == ["/assets/index-BBB.css"]
    assert ui.fonts == ["/assets/inter-EEE.woff2"]
    for path, body in _files("1").items():
        assert (www / path.lstrip("/")).read_bytes() == body
    main = www / "assets" / "index-AAA.js"
    assert gzip.decompress((www / "assets" / "index-AAA.js.gz").read_bytes()) == main.read_bytes()
    assert oct(main.stat().st_mode & 0o777) == "0o644"
    assert not (www / "index.html").exists()
    assert not list(www.rglob("passwd*"))
    assert "/assets/../../etc/passwd" not in seen
    assert assets.get("1.18.33") == ui
    assert assets.versions() == ["1.18.33"]


async def test_a_bad_version_name_is_refused(tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as http:
        assets = UiAssets(tmp_path / "ui", http)
        with pytest.raises(ValueError):
            await assets.extract("../../x", "http://127.0.0.1:9", "Basic secret")
        assert assets.ensure("../x", "http://127.0.0.1:9", "x") is None
        assert assets.get("../x") is None


async def test_prune_keeps_live_versions_and_shared_files(tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as http:
        assets = UiAssets(tmp_path / "ui", http)
        for version, tag in (("1.0.0", "1"), ("2.0.0", "2")):
            seen: list[str] = []
            server = await _server(tag, seen)
            try:
                await assets.extract(version, str(server.make_url("")).rstrip("/"), "Basic secret")
            finally:
                await server.close()
            # The versions' lazy chunks differ only by content here; give 2.0.0 its own.
            if version == "1.0.0":
                www = tmp_path / "ui" / "www" / "assets"
                (www / "lazy-CCC.js").rename(www / "old-only-ZZZ.js")
                meta = (tmp_path / "ui" / "sets" / "1.0.0.json").read_text()
                (tmp_path / "ui" / "sets" / "1.0.0.json").write_text(
                    meta.replace("lazy-CCC.js", "old-only-ZZZ.js")
                )
        assert assets.prune(["1.0.0", "2.0.0"]) == 0
        removed = assets.prune(["2.0.0"])
    www = tmp_path / "ui" / "www"
    assert removed == 1
    assert not (www / "assets" / "old-only-ZZZ.js").exists()
    assert (www / "assets" / "index-AAA.js").exists()  # 2.0.0 has it too
    assert (www / "assets" / "lazy-CCC.js").exists()
    assert assets.versions() == ["2.0.0"]


async def test_a_set_stored_by_an_older_lovd_learns_whether_it_has_the_server_route(
    tmp_path: Path,
) -> None:
    assets = UiAssets(tmp_path, http=None)  # type: ignore[arg-type]
    (tmp_path / "www" / "assets").mkdir(parents=True)
    (tmp_path / "sets").mkdir()
    for version, body in (("1.18.33", b'x("/server/:serverKey/session/:id",y)'), ("1.0", b"z")):
        (tmp_path / "www" / "assets" / f"index-{version}.js").write_bytes(body)
        old = {"version": version, "files": [f"/assets/index-{version}.js"],
               "scripts": [f"/assets/index-{version}.js"], "styles": [], "fonts": []}  # fmt: skip
        (tmp_path / "sets" / f"{version}.json").write_text(json.dumps(old))
    new, older = assets.get("1.18.33"), assets.get("1.0")
    assert new is not None and new.server_route
    assert older is not None and not older.server_route
    # The answer is kept: the script is not read again.
    (tmp_path / "www" / "assets" / "index-1.18.33.js").unlink()
    assert json.loads((tmp_path / "sets" / "1.18.33.json").read_text())["server_route"] is True
    assert assets.get("1.18.33").server_route  # type: ignore[union-attr]
