"""What the landing page prefetches (web/warmprep.py) and where the UI files live."""

from __future__ import annotations

from pathlib import Path

import pytest

from lovd import config as config_mod
from lovd.caddy import ui_root
from lovd.web.assets import UiAssets, UiSet
from lovd.web.chat_landing import ChatLanding
from lovd.web.warmprep import WarmPrep


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
             "/assets/Inter.ttf": b"z"}  # fmt: skip
    ui = UiSet("1.18.33", sorted(files), ["/assets/index-A1b2C3d4.js"],
               ["/assets/index-Q1w2E3r4.css"], ["/assets/Inter.ttf"])  # fmt: skip
    assets._write(ui, files)
    html = prep.prefetch_html()
    assert '<link rel="modulepreload" href="/assets/index-A1b2C3d4.js">' in html
    assert '<link rel="prefetch" as="style" href="/assets/index-Q1w2E3r4.css">' in html
    assert '<link rel="prefetch" as="font" href="/assets/Inter.ttf" crossorigin>' in html
    # A version no container runs any more is not what the next session runs.
    prep.next_version = "0.0.1"
    assert prep.prefetch_html() == ""
    # A claim of a warm container lovd prepared goes straight to its chat, once.
    prep._first["s1"] = "/L3dvcms/session/ses_abc"
    assert prep.first_chat("s1") == "/L3dvcms/session/ses_abc"
    assert prep.first_chat("s1") is None
