"""The demo question set through the real OpenCode, as demo mode runs it: lovd with
``demo: on`` (the Lovdata stand-in and the stub model on the host's loopback, behind the
broker), one real session container, every question in a new chat of it, one after
another. At least 90 % must be answered with the right provision's lovdata.no link
first (or name the law the corpus does not hold), the README's example among them.
The same set runs in-process in tests/unit/test_demo_questions.py."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import demo_questions
from tests.conftest import image_present, need
from tests.integration.test_opencode_image import (
    SESSION_IMAGE,
    basic_auth,
    container_settings,
    run,
)
from tests.lovdproc import LovdProc

pytestmark = [pytest.mark.opencode, pytest.mark.podman]

README_QUESTION = "Hva sier arbeidsmiljøloven om oppsigelse?"
REQUIRED_HIT_RATE = 0.9


async def _answer(http: aiohttp.ClientSession, url: str, question: str) -> str:
    async with http.post(url + "/session", json={}) as resp:
        assert resp.status == 200, await resp.text()
        chat = (await resp.json())["id"]
    body = {"parts": [{"type": "text", "text": question}]}
    async with http.post(f"{url}/session/{chat}/message", json=body) as resp:
        assert resp.status == 200, await resp.text()
    async with http.get(f"{url}/session/{chat}/message") as resp:
        messages: list[dict[str, Any]] = await resp.json()
    return "\n".join(
        part.get("text", "")
        for m in messages
        if m["info"]["role"] == "assistant"
        for part in m["parts"]
        if part["type"] == "text"
    )


async def test_demo_answers_peoples_questions(tmp_path: Path) -> None:
    need(os.geteuid() != 0, "rootless Podman tests run as the unprivileged lovd user, not root")
    need(image_present(SESSION_IMAGE), f"{SESSION_IMAGE} missing: run 'lovd image build'")
    questions = demo_questions.load()
    assert README_QUESTION in [q.ask for q in questions]
    p = LovdProc(tmp_path, image=SESSION_IMAGE, demo="on", demo_mcp_port=0, demo_llm_port=0)
    p.start()
    name = ""
    try:
        status, _, s = p.api("POST", "/api/sessions")
        assert status == 201 and s["status"] == "running", s
        name = f"lovd-{s['id']}"
        url = f"http://127.0.0.1:{s['port']}"
        auth = basic_auth(container_settings(name)["OPENCODE_SERVER_PASSWORD"])
        wrong: list[str] = []
        seconds: list[float] = []
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=120), headers=auth
        ) as http:
            for q in questions:
                started = time.monotonic()
                answer = await _answer(http, url, q.ask)
                seconds.append(time.monotonic() - started)
                if not q.check(answer):
                    wrong.append(f"{q.ask!r} (want {q.cite or q.missing_law}):\n{answer[:500]}")
        rate = 1 - len(wrong) / len(questions)
        first = seconds[0]  # includes OpenCode connecting to the Lovdata MCP server
        seconds.sort()
        print(
            f"demo questions through OpenCode: {rate:.0%} right of {len(questions)}; "
            f"{sum(seconds):.1f} s in all, per question p50 {seconds[len(seconds) // 2]:.2f} s, "
            f"max {seconds[-1]:.2f} s (the first {first:.2f} s)"
        )
        assert rate >= REQUIRED_HIT_RATE, "\n\n".join(wrong)
        assert not any(README_QUESTION in w for w in wrong), wrong
        _, _, shown = await asyncio.to_thread(p.api, "GET", f"/api/sessions/{s['id']}")
        assert shown["usage"]["mcp_requests"] >= 3 * len(questions), shown["usage"]
    finally:
        p.stop()
        if name:
            run("podman", "rm", "-f", "-t", "0", name)
        run("podman", "unshare", "rm", "-rf", str(tmp_path / "state"))
