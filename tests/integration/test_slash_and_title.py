"""The "/" menu and a new chat's title, with a real OpenCode 1.18.33 behind real Caddy.

A session claimed from the warm pool (its first chat made by lovd before the claim,
lovd/web/warmprep.py), the demo's stub model and Lovdata stand-in behind lovd's broker,
everything asked from the browser's side through Caddy with the session cookie:

- the "/" menu: the 1.18.33 web UI fills it from ``GET /command`` (plus its own
  client-side commands). Straight from the container that lists ``init``, ``review``,
  ``customize-opencode`` and ``norwegian-legal-queries``, none of which can run here
  (``POST /session/{id}/command`` is refused); through Caddy lovd answers ``[]``. The
  legal skill is still what the agent works by: its text is in the model's system prompt.
- the UI's own slash commands: the routes each one calls are tried through Caddy, so a
  change in what works shows here (``/new`` and ``/export`` work; ``/terminal``, ``/open``
  and the ``/mcp`` toggles are refused).
- after the first question, ``/undo`` and its redo (``revert``, ``unrevert``), ``/fork``
  and ``/compact`` (``summarize``: a model call through the broker, counted in the
  session's usage) work on the chat through Caddy as the UI sends them, and bodies that
  ask for more (another model, a path as an id, an extra field) are refused with a 403
  naming the field, changing nothing.
- the title: the chat made before the claim and a chat the UI makes are "Ny samtale"
  before their first question, and OpenCode's title from the question after it.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from lovd.demo.serve import serve_llm_stub, serve_lovdata_mcp
from lovd.web.allowlist import Allowlist
from lovd.web.chattitle import PLACEHOLDER
from tests.conftest import ROOT, image_present, need
from tests.integration.caddy_harness import Harness, caddy_binary, harness

pytestmark = [pytest.mark.caddy, pytest.mark.opencode, pytest.mark.podman]

SESSION_IMAGE = "localhost/lovd-session:latest"
QUESTION = "Kan arbeidsgiveren si meg opp uten saklig grunn?"
SKILL = ROOT / "config_opencode" / "skills" / "norwegian-legal-queries" / "SKILL.md"


@pytest.fixture
async def claimed(podman: str) -> AsyncIterator[tuple[Harness, dict[str, str], str, str]]:
    """A warm session claimed by a click on "start": the harness, the browser's headers
    (its cookie), the chat lovd made before the claim, and the stub model's URL."""
    need(caddy_binary() is not None, "caddy is not installed (apt-get install caddy)")
    need(image_present(SESSION_IMAGE), f"{SESSION_IMAGE} missing: run 'lovd image build'")
    llm = await serve_llm_stub("127.0.0.1", 0, api_key="stub-key")
    mcp = await serve_lovdata_mcp("127.0.0.1", 0, token="mcp-key")
    settings: dict[str, Any] = {
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
                deadline = time.monotonic() + 180
                while not any(w.id in h.gate.prep._first for w in h.sessions.warm()):
                    assert time.monotonic() < deadline, "the warm container was not prepared"
                    await asyncio.sleep(0.3)
                task.cancel()  # no second warm container after the claim: the host is shared
                async with h.http.post(
                    h.url + "/_lovd/start", headers={"Origin": h.url}, allow_redirects=False
                ) as r:
                    assert r.status == 303, await r.text()
                    where = r.headers["Location"]
                    value = r.cookies["lovd_session"].value
                m = re.fullmatch(r"/[A-Za-z0-9_-]+/session/(ses_[A-Za-z0-9]+)", where)
                assert m, f"the click did not go straight to the prepared chat: {where}"
                browser = {"Cookie": f"lovd_session={value}", "Accept": "application/json"}
                yield h, browser, m.group(1), llm.base_url
            finally:
                task.cancel()
    finally:
        await llm.stop()
        await mcp.stop()


async def _direct(h: Harness, method: str, path: str) -> Any:
    """From the container itself, with the password lovd gives Caddy (not via the gate)."""
    [s] = [s for s in h.sessions.all() if s.token_hash]
    auth = {"Authorization": h.sessions.container_auth(s.id)}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"http://127.0.0.1:{s.port}{path}", headers=auth) as r,
    ):
        assert r.status == 200, await r.text()
        return await r.json()


async def _title_after(h: Harness, browser: dict[str, str], chat: str) -> str:
    """Ask the question in ``chat`` through Caddy; the title once OpenCode has set it."""
    body = {
        "agent": "juridisk",
        "model": {"providerID": "lovd", "modelID": "legal-stub"},
        "parts": [{"type": "text", "text": QUESTION}],
    }
    async with aiohttp.ClientSession(headers=browser) as http:
        async with http.post(f"{h.url}/session/{chat}/prompt_async", json=body) as r:
            assert r.status < 300, await r.text()
        title = PLACEHOLDER
        for _ in range(600):
            async with http.get(f"{h.url}/session/{chat}") as r:
                title = (await r.json())["title"]
            if title != PLACEHOLDER and not title.startswith("New session - "):
                return str(title)
            await asyncio.sleep(0.1)
    raise AssertionError(f"the chat was never titled from its question (still {title!r})")


async def test_the_slash_menu_and_a_new_chat_title(
    claimed: tuple[Harness, dict[str, str], str, str],
) -> None:
    """One warm container for both (the host is shared): the titles before any question,
    the "/" menu, then a question in each chat and the titles after it."""
    h, browser, chat, llm_url = claimed
    made = await _titles_before_the_first_question(h, browser, chat)
    await _slash_menu_lists_only_commands_that_work(h, browser, chat)
    # After the first question OpenCode titles each chat from the question (the stub
    # model answers the title request with the question's first words).
    for c in (chat, made):
        title = await _title_after(h, browser, c)
        assert title.startswith("Kan arbeidsgiveren"), title
        print(f"\n{c}: {PLACEHOLDER!r} before the first question, {title!r} after it")
    # The legal skill is not a command but how the agent works: its text is in the
    # system prompt the model gets.
    async with aiohttp.ClientSession() as http, http.get(llm_url + "/requests") as r:
        seen = await r.json()
    skill_line = next(ln for ln in SKILL.read_text().splitlines() if ln.startswith("# "))
    assert any(skill_line in s["system"] for s in seen if s["tools"]), skill_line
    await _slash_actions_after_the_first_question(h, browser, chat, llm_url)


async def _slash_actions_after_the_first_question(
    h: Harness, browser: dict[str, str], chat: str, llm_url: str
) -> None:
    """/undo, /redo, /fork and /compact on a chat with one answered question, as the
    1.18.33 UI sends them, through Caddy; the attacks on the same routes first."""
    [s] = [s for s in h.sessions.all() if s.token_hash]
    broker = h.host.broker  # its ledger: what the session's model calls cost
    assert broker is not None
    # The UI names the chat's folder on every request (a header on a POST).
    ui = {**browser, "x-opencode-directory": "%2Fwork"}
    async with aiohttp.ClientSession(headers=ui) as http:

        async def get(path: str) -> Any:
            async with http.get(h.url + path) as r:
                assert r.status == 200, (path, r.status, await r.text())
                return await r.json()

        async def post(path: str, body: Any = None) -> tuple[int, Any]:
            async with http.post(f"{h.url}/session/{chat}/{path}", json=body) as r:
                return r.status, await r.json(content_type=None)

        messages = await get(f"/session/{chat}/message")
        question = next(m["info"]["id"] for m in messages if m["info"]["role"] == "user")
        # Attacks: each refused naming the field; the chat is as it was.
        attacks = [
            ("summarize", {"providerID": "openai", "modelID": "gpt-4o"}, "modelID"),
            (
                "summarize",
                {"providerID": "lovd", "modelID": "legal-stub", "agent": "build"},
                "agent",
            ),
            ("revert", {"messageID": "../../run/secrets/lovd.env"}, "messageID"),
            ("revert", {"messageID": question, "partID": "/etc/passwd"}, "partID"),
            # The same undo in another folder (OpenCode would snapshot and diff it).
            ("revert?directory=/", {"messageID": question}, "directory"),
            (
                "fork",
                {"messageID": question, "permission": [{"permission": "bash", "action": "allow"}]},
                "permission",
            ),
        ]
        for action, body, field in attacks:
            status, problem = await post(action, body)
            assert status == 403 and problem["field"] == field, (action, status, problem)
        assert len(await get(f"/session/{chat}/message")) == len(messages)
        assert "revert" not in await get(f"/session/{chat}")

        # /undo: the question and its answer are hidden (the UI puts the question back
        # in the prompt); /redo with no body brings them back.
        status, undone = await post("revert", {"messageID": question})
        assert status == 200 and undone["revert"]["messageID"] == question, undone
        async with http.post(f"{h.url}/session/{chat}/unrevert") as r:
            assert r.status == 200, await r.text()
            assert "revert" not in await r.json()

        # /fork from the question (the UI's fork dialog): a new chat before it; and a
        # copy of the whole chat.
        status, forked = await post("fork", {"messageID": question})
        assert status == 200 and forked["id"] != chat and forked["id"].startswith("ses_")
        status, copy = await post("fork", {})
        assert status == 200
        assert len(await get(f"/session/{copy['id']}/message")) == len(messages)
        listed = {c["id"] for c in await get("/session")}
        assert {forked["id"], copy["id"]} <= listed

        # /compact: OpenCode's compaction agent writes a summary with the model named in
        # the body, through the broker: the session's usage grows like a prompt's.
        before = broker.usage(s.id)["llm_requests"]
        async with aiohttp.ClientSession() as plain, plain.get(llm_url + "/requests") as r:
            calls_before = len(await r.json())
        status, done = await post("summarize", {"providerID": "lovd", "modelID": "legal-stub"})
        assert status == 200 and done is True, (status, done)
        after = broker.usage(s.id)
        async with aiohttp.ClientSession() as plain, plain.get(llm_url + "/requests") as r:
            calls = await r.json()
        assert after["llm_requests"] > before and len(calls) > calls_before, after
        summary = [
            m
            for m in await get(f"/session/{chat}/message")
            if m["info"].get("summary") or any(p["type"] == "compaction" for p in m["parts"])
        ]
        assert summary, "no summary message after /compact"
        print(
            f"\n/undo, /redo, /fork x2 and /compact through Caddy; /compact made "
            f"{after['llm_requests'] - before} model call(s) through the broker "
            f"(session usage now {after})"
        )


async def _titles_before_the_first_question(h: Harness, browser: dict[str, str], chat: str) -> str:
    """The chat lovd made before the claim and one the UI makes read "Ny samtale"; the
    id of the UI's."""
    async with aiohttp.ClientSession(headers=browser) as http:
        # The chat lovd made before the claim, as the chat list and the chat show it.
        async with http.get(f"{h.url}/session/{chat}") as r:
            assert (await r.json())["title"] == PLACEHOLDER
        async with http.get(f"{h.url}/session?roots=true") as r:
            assert [c["title"] for c in await r.json() if c["id"] == chat] == [PLACEHOLDER]
        # A chat the UI makes ("/new", then a question), with an empty body as it sends.
        async with http.post(f"{h.url}/session", json={}) as r:
            assert r.status == 200, await r.text()
            made = await r.json()
        assert made["title"] == PLACEHOLDER
    return str(made["id"])


async def _slash_menu_lists_only_commands_that_work(
    h: Harness, browser: dict[str, str], chat: str
) -> None:
    # What OpenCode itself would put in the menu: commands that cannot run here.
    offered = {c["name"]: c["source"] for c in await _direct(h, "GET", "/command")}
    assert {"init", "review", "customize-opencode", "norwegian-legal-queries"} <= set(offered)
    dir_ = base64.urlsafe_b64encode(b"/work").decode().rstrip("=")
    async with aiohttp.ClientSession(headers=browser) as http:
        async with http.get(h.url + "/command?directory=%2Fwork") as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
            assert await r.json() == []
        # ... because none of them could run: POST /session/{id}/command is refused.
        async with http.post(
            f"{h.url}/session/{chat}/command", json={"command": "init", "arguments": ""}
        ) as r:
            assert r.status == 403, await r.text()

        # The UI's own slash commands, by the requests each one makes (the 1.18.33 UI
        # speaks the v1 API; the v2 routes of the same actions are tried too).
        works = {
            "/new": ("GET", f"/{dir_}/session"),
            "/export": ("GET", f"/session/{chat}/message"),
            "/model": ("GET", "/provider"),
            "/mcp (the list)": ("GET", "/mcp"),
        }
        # /undo, /compact and /fork work (tried after the first question, below); their
        # v2 routes are not what the UI sends and stay refused.
        refused = {
            "/undo (v2)": ("POST", f"/api/session/{chat}/revert/stage"),
            "/compact (v2)": ("POST", f"/api/session/{chat}/compact"),
            "/terminal": ("POST", "/pty"),
            "/open": ("GET", "/find/file?query=a"),
            "/mcp (a toggle)": ("POST", "/mcp/lovdata/disconnect"),
        }
        for name, (method, path) in works.items():
            headers = {"Accept": "text/html"} if name == "/new" else {}
            async with http.request(method, h.url + path, headers=headers) as r:
                assert r.status == 200, (name, r.status, await r.text())
        for name, (method, path) in refused.items():
            async with http.request(method, h.url + path, json={}) as r:
                assert r.status == 403, (name, r.status)
                assert "not available in this service" in await r.text(), name
