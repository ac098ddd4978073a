"""The "/" menu and a new chat's title in a real Chromium through real Caddy, lovd and a
warm OpenCode 1.18.33 container with the demo's stub model (slash.mjs drives it).

- Typing "/" in the prompt shows none of OpenCode's server commands (``init``,
  ``review``, the skills): lovd answers ``GET /command`` with ``[]``. What the menu still
  shows are the UI's own client-side commands; which of them work through the gate is
  tried by route in tests/integration/test_slash_and_title.py.
- The chat lovd made before the click reads "Ny samtale" (not OpenCode's English "New
  session") before the first question, and the question's title after it.
- "/undo" picked from the menu after the first question works (its body checked by lovd):
  the answer is hidden and the question is back in the prompt.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from lovd.demo.serve import serve_llm_stub, serve_lovdata_mcp
from lovd.web.allowlist import Allowlist
from lovd.web.chattitle import PLACEHOLDER
from tests.browser.test_first_minute import browser_ready, run_script, warm_ready
from tests.integration.caddy_harness import harness

pytestmark = [pytest.mark.browser, pytest.mark.caddy, pytest.mark.opencode]

HERE = Path(__file__).resolve().parent
SESSION_IMAGE = os.environ.get("LOVD_SESSION_IMAGE", "localhost/lovd-session:latest")
QUESTION = "Kan arbeidsgiveren si meg opp uten saklig grunn?"
SERVER_COMMANDS = ("init", "review", "customize-opencode", "norwegian-legal-queries")


async def run_slash(spec: dict[str, Any]) -> dict[str, Any]:
    return await run_script("slash.mjs", **spec)


async def test_the_slash_menu_and_the_new_chat_title_in_a_browser(tmp_path: Path) -> None:
    browser_ready()
    llm = await serve_llm_stub("127.0.0.1", 0, api_key="stub-key")
    mcp = await serve_lovdata_mcp("127.0.0.1", 0, token="mcp-key")
    artifacts = Path(os.environ.get("LOVD_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    settings = {
        "warm_pool": 1,
        "ready_timeout": 90,
        "llm": {
            "model": "lovd/legal-stub",
            "base_url": f"{llm.base_url}/v1",
            "api_key": "stub-key",
        },
        "mcp": {"lovdata": {"url": f"{mcp.base_url}/mcp", "token": "mcp-key"}},
    }
    try:
        async with harness(image=SESSION_IMAGE, settings=settings, allowlist=Allowlist()) as h:
            task = asyncio.create_task(h.sessions.pool(max_age=3600).run())
            try:
                await warm_ready(h)
            finally:
                task.cancel()  # one container is enough: the host is shared
            r = await run_slash({"base": h.url, "artifacts": str(artifacts), "question": QUESTION})
    finally:
        await llm.stop()
        await mcp.stop()
    assert r["ok"], r.get("error")
    print(
        f"\nthe '/' menu before the first question: {r['slash']}\n"
        f"and after it: {r['slash_after']}\nrefused on the way: {r['failed']}"
    )
    for menu in (r["slash"], r["slash_after"]):
        triggers = [e.split()[0] for e in menu]
        # No server command; the UI's own remain (/new is always offered).
        assert "/new" in triggers, menu
        assert not [t for t in triggers if t[1:] in SERVER_COMMANDS], triggers
    # The title before the first question and after it.
    assert PLACEHOLDER in r["before"] and "New session" not in r["before"], r["before"][:2000]
    assert PLACEHOLDER not in r["after"] and "New session" not in r["after"], r["after"][:2000]
    assert "lovdata.no" in r["after"]
    assert r["after"].count("Kan arbeidsgiveren si meg opp uten") >= 2  # question + title
    # "/undo" after the first question works through lovd's body check: the answer is
    # hidden and the question is back in the prompt, with nothing refused on the way.
    assert r["undo"]["status"] == 200, r["undo"]
    assert '"revert"' in r["undo"]["body"], r["undo"]
    assert QUESTION in r["prompt_after_undo"], r["prompt_after_undo"]
    assert "lovdata.no" not in r["undone"], r["undone"][:2000]
    assert not [f for f in r["failed"] if f[0] == 403], r["failed"]
