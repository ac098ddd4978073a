"""The whole browser path in a real Chromium: landing page → start → OpenCode → answer.

Real Caddy, real lovd browser path, a real OpenCode session container
(localhost/lovd-session:latest), the demo stand-ins (Lovdata MCP, stub LLM) and
Debian's Chromium driven by playwright-core (tests/browser/setup.sh installs it).
Screenshots go to test-artifacts/browser/ (or $LOVD_TEST_ARTIFACTS/browser/).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from lovd.web.allowlist import Allowlist
from tests.conftest import ROOT, image_present, need
from tests.integration.caddy_harness import caddy_binary, harness

pytestmark = [pytest.mark.browser, pytest.mark.caddy, pytest.mark.opencode]

HERE = Path(__file__).resolve().parent
SESSION_IMAGE = "localhost/lovd-session:latest"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _artifacts() -> Path:
    base = Path(os.environ.get("LOVD_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    try:
        (base / "browser").mkdir(parents=True, exist_ok=True)
        probe = base / "browser" / ".write-test"
        probe.write_text("")
        probe.unlink()
        return base / "browser"
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "lovd-test-artifacts" / "browser"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


@pytest.fixture(scope="module")
def browser_env(podman: str) -> None:
    need(caddy_binary() is not None, "caddy is not installed (apt-get install caddy)")
    need(os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} missing: apt-get install -y chromium")
    need(shutil.which("node") is not None, "node missing: apt-get install -y nodejs npm")
    need(
        (HERE / "node_modules" / "playwright-core").is_dir(),
        "playwright-core missing: run tests/browser/setup.sh",
    )
    need(image_present(SESSION_IMAGE), f"{SESSION_IMAGE} missing: run 'lovd image build'")


async def test_landing_start_opencode_answer(browser_env: None) -> None:
    from lovd.demo.serve import serve_llm_stub, serve_lovdata_mcp

    # Sessions reach them only through the credential broker (on the host's loopback,
    # started by the harness), which is where these URLs are used.
    mcp = await serve_lovdata_mcp("127.0.0.1", 0)
    llm = await serve_llm_stub("127.0.0.1", 0)
    settings = {
        "image": SESSION_IMAGE,
        "ready_timeout": 90,
        "mcp": {"lovdata": {"url": f"{mcp.base_url}/mcp"}},
        "llm": {
            "model": "lovd/legal-stub",
            "base_url": f"{llm.base_url}/v1",
            "api_key": "demo",
        },
    }
    artifacts = _artifacts()
    try:
        # OpenCode's allowlist alone, as in production: the UI must work with it.
        async with harness(settings=settings, image=SESSION_IMAGE, allowlist=Allowlist()) as h:
            proc = await asyncio.create_subprocess_exec(
                "node",
                str(HERE / "flow.mjs"),
                h.url,
                str(artifacts),
                cwd=HERE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "CHROMIUM": CHROMIUM},
            )
            out, err = await asyncio.wait_for(proc.communicate(), 300)
            lines = out.decode().strip().splitlines()
            assert lines, f"flow.mjs printed nothing; stderr: {err.decode()[-2000:]}"
            result = json.loads(lines[-1])
            (artifacts / "result.json").write_text(json.dumps(result, indent=2))
            print(json.dumps(result, indent=2))
            assert result["ok"], f"{result.get('error')} (screenshots in {artifacts})"
            assert result["landing_title"].startswith("Start")
            assert result["cookie"] == {
                "name": "lovd_session",
                "httpOnly": True,
                "sameSite": "Lax",
                "secure": False,
            }
            assert result["cookie_visible_to_js"] is False
            assert "lovdata.no/" in result["answer"]
            assert result["errors_5xx"] == []  # never a 502 on the way
            # Nothing the UI asked for during the chat was refused by the gate.
            assert result["gate_refusals"] == [], result["gate_refusals"]
            # A prompt was sent through the gate: the session no longer counts as unused.
            await h.sessions.flush_activity()
            [s] = h.sessions.all()
            assert s.used_at, "the prompt did not mark the session used"
            assert (artifacts / "2-opencode-ui.png").stat().st_size > 10000
            assert mcp.calls is not None and mcp.calls.snapshot()  # the model used a Lovdata tool
    finally:
        await llm.stop()
        await mcp.stop()
