"""A person's chat survives its container being removed or hung, in a real Chromium.

Real Caddy, lovd's browser path and real OpenCode containers, as in test_browser.py. The
person asks a question (a session link), then, with the chat open and an XHR once a
second, the container is removed (`podman rm -f`) and, later, every process in it is
stopped (SIGSTOP). After each the person reloads the page once and must land back in
the chat with its history; not one response on the way may be a 502. flow.mjs reports
the time from the kill to the chat with its history (printed, and saved as JSON in the
artifacts).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from lovd import ids, runtime_events
from lovd.web.allowlist import Allowlist
from tests.browser.test_browser import (
    CHROMIUM,
    HERE,
    QUESTION_EN,
    SESSION_IMAGE,
    _artifacts,
    browser_env,  # noqa: F401  (the fixture)
    chatted,
    flow,
)
from tests.integration.caddy_harness import Harness, harness
from tests.integration.test_dead_container import apodman

pytestmark = [pytest.mark.browser, pytest.mark.caddy, pytest.mark.opencode]


async def survive(
    h: Harness, artifacts: Path, name: str, profile: str, chat: str, kill: list[str]
) -> Any:
    """Run flow.mjs's "survive" mode in the chat at path ``chat``; run ``podman <kill>``
    when it is ready."""
    marks = Path(tempfile.mkdtemp(prefix="lovd-survive-"))
    spec = {
        "base": h.url, "artifacts": str(artifacts), "name": name, "mode": "survive",
        "locale": "en-US", "profile": profile, "expect_question": QUESTION_EN,
        "url": h.url + chat,
        "ready_file": str(marks / "ready"), "killed_file": str(marks / "killed"),
    }  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        "node", str(HERE / "flow.mjs"), json.dumps(spec), cwd=HERE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CHROMIUM": CHROMIUM},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (marks / "ready").exists():
            assert proc.returncode is None and time.monotonic() < deadline, "flow never ready"
            await asyncio.sleep(0.05)
        await apodman(*kill)
        (marks / "killed").write_text("killed")
        out, err = await asyncio.wait_for(proc.communicate(), 240)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        shutil.rmtree(marks, ignore_errors=True)
    lines = out.decode().strip().splitlines()
    assert lines, f"flow.mjs printed nothing; stderr: {err.decode()[-2000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    (artifacts / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(
        f"{name}: kill → the chat with its history in {result.get('kill_to_chat_ms')} ms; "
        f"502s: {result.get('statuses_502')}, 503s: {result.get('statuses_503')}"
    )
    assert result["ok"], f"{name}: {result.get('error')} at {result.get('url')}"
    return result


async def test_the_chat_survives_a_removed_and_a_hung_container(browser_env: None) -> None:  # noqa: F811
    from lovd.demo.serve import serve_llm_stub, serve_lovdata_mcp

    mcp = await serve_lovdata_mcp("127.0.0.1", 0)
    llm = await serve_llm_stub("127.0.0.1", 0)
    settings = {
        "image": SESSION_IMAGE,
        "ready_timeout": 90,
        "warm_pool": 1,
        "mcp": {"lovdata": {"url": f"{mcp.base_url}/mcp"}},
        "llm": {"model": "lovd/legal-stub", "base_url": f"{llm.base_url}/v1", "api_key": "demo"},
    }
    artifacts = _artifacts()
    profiles = Path(tempfile.mkdtemp(prefix="lovd-chromium-"))
    try:
        async with harness(settings=settings, image=SESSION_IMAGE, allowlist=Allowlist()) as h:
            # Podman's events, as `lovd serve` follows them.
            events = runtime_events.ContainerEvents(
                h.config.podman, h.store.instance_id, runtime_events.on_death(h.sessions)
            )
            events.start()
            try:
                # A warm container (warmed up once it listens), as test_browser.py's start.
                assert await h.sessions.pool(h.config.warm_max_age).fill()
                s, _ = await h.sessions.create()
                link = await h.sessions.new_link(s.id)  # a person's single-use link
                first = await flow(
                    h, artifacts, name="dead-link", mode="link", locale="en-US",
                    profile=str(profiles / "p"), url=f"{h.url}/c/{s.id}?token={link}",
                    question=QUESTION_EN,
                )  # fmt: skip
                chatted(first, QUESTION_EN)
                name = ids.container_name(s.id)

                chat, profile = first["chat_path"], str(profiles / "p")
                removed = await survive(
                    h, artifacts, "dead-rm", profile, chat, ["rm", "-f", "-t", "0", name]
                )
                assert removed["conversation_shown"] and removed["statuses_502"] == 0, removed
                assert h.sessions.get(s.id).status == "running"

                # Every process but the container's init: OpenCode hangs, Podman still
                # reports the container running.
                hung = await survive(
                    h, artifacts, "dead-stop", profile, chat,
                    ["exec", name, "sh", "-c", "kill -STOP -1"],
                )  # fmt: skip
                assert hung["conversation_shown"] and hung["statuses_502"] == 0, hung
                row = h.sessions.get(s.id)
                assert row.status == "running" and row.restarts == 1, row
                for r in (removed, hung):
                    assert r["chat_path"] == first["chat_path"]  # the same conversation
            finally:
                await events.close()
    finally:
        shutil.rmtree(profiles, ignore_errors=True)
        await llm.stop()
        await mcp.stop()
