"""The first minute in a real Chromium through real Caddy, lovd and a warm OpenCode
container (issue 17): the UI's files are compressed and immutable, the landing page's
prefetch is what the chat then uses (the click runs the bundle the page compiled ahead,
with no new page; a reload takes it from the browser's cache), the click lands in the
chat, and a reload shows the same chat; when the landing page's script cannot start
the session, its form still does. click.mjs drives Chromium.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from lovd.web.allowlist import Allowlist
from tests.conftest import image_present, need
from tests.integration.caddy_harness import Harness, caddy_binary, harness

pytestmark = [pytest.mark.browser, pytest.mark.caddy, pytest.mark.opencode]

HERE = Path(__file__).resolve().parent
SESSION_IMAGE = os.environ.get("LOVD_SESSION_IMAGE", "localhost/lovd-session:latest")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
HASHED = re.compile(r"-[A-Za-z0-9_-]{8}\.[a-z0-9]+$")  # Vite's name-<hash>.ext


def browser_ready() -> None:
    need(caddy_binary() is not None, "caddy is not installed (apt-get install caddy)")
    need(os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} missing: apt-get install -y chromium")
    need(shutil.which("node") is not None, "node missing: apt-get install -y nodejs npm")
    need((HERE / "node_modules" / "playwright-core").is_dir(), "run tests/browser/setup.sh")
    need(image_present(SESSION_IMAGE), f"{SESSION_IMAGE} missing: run 'lovd image build'")


async def click(**spec: Any) -> dict[str, Any]:
    """Run click.mjs once with a fresh profile unless one is given; its JSON report."""
    return await run_script("click.mjs", **spec)


async def run_script(script: str, **spec: Any) -> dict[str, Any]:
    """Run one of this folder's Chromium scripts with a fresh profile unless one is
    given; the JSON report it prints last."""
    own = "profile" not in spec
    profile = spec.pop("profile", None) or tempfile.mkdtemp(prefix="lovd-browser-")
    try:
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(HERE / script),
            json.dumps({"profile": profile, **spec}),
            cwd=HERE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "CHROMIUM": CHROMIUM},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 300)
    finally:
        if own:
            shutil.rmtree(profile, ignore_errors=True)
    lines = out.decode().strip().splitlines()
    assert lines, f"{script} printed nothing; stderr: {err.decode()[-2000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


async def warm_ready(h: Harness, timeout: float = 180.0) -> str:
    """Wait until a warm container is prepared (first chat made, UI stored); its id.
    A warm container whose first chat could not be made (a loaded machine) is prepared
    again every RETRY_PREP seconds, as the pool would on its next start."""
    t0 = time.monotonic()
    prep = h.gate.prep
    seen: dict[str, float] = {}
    while time.monotonic() - t0 < timeout:
        warm = [s for s in h.sessions.warm() if not h.sessions.lock(s.id).locked()]
        ready = warm and warm[0].id in prep._first and prep.next_version
        if ready and prep.assets is not None and prep.assets.get(prep.next_version):
            return warm[0].id
        if warm and warm[0].id not in prep._first:
            since = seen.setdefault(warm[0].id, time.monotonic())
            if time.monotonic() - since > RETRY_PREP:
                seen[warm[0].id] = time.monotonic()
                await prep.ready(warm[0])
        await asyncio.sleep(0.2)
    raise TimeoutError("no prepared warm container in time")


RETRY_PREP = 20.0


def trust(h: Harness) -> dict[str, Any]:
    """click.mjs's spec for the harness's certificate (harness(https=True)): Chromium
    trusts its key, with the HTTP cache on."""
    return {"spki": h.tls.spki} if h.tls else {}


@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
async def test_first_minute_prefetch_cache_compression_reload(https: bool) -> None:
    """Over plain HTTP and over HTTPS (caddy.tls, HTTP/2; the browser's cache must work
    there as well)."""
    browser_ready()
    async with harness(
        image=SESSION_IMAGE,
        settings={"warm_pool": 1, "ready_timeout": 60},
        allowlist=Allowlist(),
        https=https,
    ) as h:
        task = asyncio.create_task(h.sessions.pool(max_age=3600).run())
        try:
            await warm_ready(h)
            r = await click(mode="lovd", base=h.url, read_ms=3000, reload=True, **trust(h))
        finally:
            task.cancel()
    print(json.dumps(r))
    assert r["ok"], r.get("error")
    assert set(r["protocols"]) == ({"h2"} if https else {"http/1.1"}), r["protocols"]
    # The landing page fetched the UI bundle ahead of the click: compressed, immutable.
    assert r["prefetched"], r
    assert all(p["encoding"] in ("zstd", "gzip") for p in r["prefetched"]), r
    hashed_prefetch = [p for p in r["prefetched"] if HASHED.search(p["path"])]
    assert hashed_prefetch and all(p["immutable"] for p in hashed_prefetch), r
    # The click ran the UI in the landing page itself (static/instant.js): one start
    # fetch, no new document, no script or style fetched over the network.
    assert r["start_fetches"] == [200], r
    assert r["documents_after_click"] == [], r["documents_after_click"]
    assert not r["main_bundle"], r["main_bundle"]
    code = [a for a in r["after_assets"] if a["path"].endswith((".js", ".css"))]
    assert all(a["cached"] for a in code), r["after_assets"]
    assert r["page_errors"] == [], r["page_errors"]
    assert r["chat_path"].split("/")[-2] == "session", r
    # The script put the address on OpenCode's server-scoped chat route at once: the UI
    # did not have to move it there (a second route and render).
    chats = [p for p in r["paths_seen"] if "/session/ses_" in p]
    assert len(chats) == 1 and chats[0].startswith("/server/"), r["paths_seen"]
    # The UI asks for the chat's record several times at once; they shared one answer
    # over the network (lovd/caddy.py CHAT_RECORD_CACHE) instead of waiting in line.
    fetched = r["chat_record_bytes"]
    assert len(fetched) >= 2 and len([b for b in fetched if b > 0]) == 1, fetched
    # A reload loads OpenCode's own page: its bundle from the browser's cache, the
    # same chat.
    assert r["reload_documents"] and r["reload_documents"][0][1] == 200, r
    assert r["reload_main_bundle"] and all(b["cached"] for b in r["reload_main_bundle"]), r
    assert r["reload_same_chat"], r
    # Every hashed UI file the chat loaded is immutable; the text ones came compressed.
    hashed = r["reload_assets"] - len(r["reload_unhashed"])
    assert hashed > 0 and r["reload_immutable"] == hashed, r
    assert r["reload_compressed"] > 0 or r["reload_cached"] == r["reload_assets"], r


async def test_the_form_still_starts_when_the_script_cannot() -> None:
    """The landing page's script's fetch is dropped: the form posts, the redirect lands
    in the chat (the old path), and no second session is made."""
    browser_ready()
    async with harness(
        image=SESSION_IMAGE,
        settings={"warm_pool": 1, "ready_timeout": 60},
        allowlist=Allowlist(),
    ) as h:
        task = asyncio.create_task(h.sessions.pool(max_age=3600).run())
        try:
            await warm_ready(h)
            r = await click(mode="lovd", base=h.url, read_ms=1000, fail_start_fetch=True)
            claimed = [s for s in h.sessions.all() if s.token_hash]
        finally:
            task.cancel()
    print(json.dumps(r))
    assert r["ok"], r.get("error")
    assert r["start_fetches"] == [0], r  # the script's fetch never reached lovd
    assert r["documents_after_click"][0][:2] == ["POST", 200], r["documents_after_click"]
    assert r["chat_path"].split("/")[-2] == "session", r
    assert len(claimed) == 1, claimed
