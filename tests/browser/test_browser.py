"""A person uses the legal chat in a real Chromium, through real Caddy and lovd's gate.

Real Caddy, the real lovd browser path, real OpenCode session containers
(localhost/lovd-session:latest, or $LOVD_SESSION_IMAGE), the demo stand-ins (Lovdata
MCP, stub LLM) behind the credential broker, and Debian's Chromium driven by
playwright-core (tests/browser/setup.sh installs it and axe-core). flow.mjs only clicks,
types, reloads and follows links; this file checks what it saw. Screenshots go to
test-artifacts/browser/ (or $LOVD_TEST_ARTIFACTS/browser/).

What depends on OpenCode 1.18.33's web UI (and fails here when an upgrade changes it):
the landing redirect to ``/{dir}/session/{id}`` (web/chat_landing.py) and the routes the
UI then uses (web/allowlist.py); the prompt (``data-component="prompt-input"``); the
agent button and Ctrl+. ("next agent"); the legal agent and its tools
(config_opencode/opencode.jsonc).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lovd.web import texts
from lovd.web.allowlist import Allowlist
from tests.conftest import ROOT, image_present, need
from tests.integration.caddy_harness import Harness, caddy_binary, harness

pytestmark = [pytest.mark.browser, pytest.mark.caddy, pytest.mark.opencode]

HERE = Path(__file__).resolve().parent
SESSION_IMAGE = os.environ.get("LOVD_SESSION_IMAGE", "localhost/lovd-session:latest")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
QUESTION_NB = "Hva sier arbeidsmiljøloven om oppsigelse?"
QUESTION_EN = "What does arbeidsmiljøloven say about oppsigelse?"
QUESTION_NB_2 = "Hvor stort depositum kan utleier kreve etter husleieloven?"
# The acceptance bar: from the click on "start" to a chat with its prompt, when a warm
# container is available.
WARM_START_LIMIT_MS = 5000
PROMPT_START = "You are a Norwegian legal research assistant"
CODING_TOOLS = {"bash", "edit", "write", "read", "glob", "grep", "list", "task", "webfetch",
                "websearch", "todowrite", "todoread", "patch", "skill", "question"}  # fmt: skip


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
    for pkg in ("playwright-core", "axe-core"):
        need((HERE / "node_modules" / pkg).is_dir(), f"{pkg} missing: run tests/browser/setup.sh")
    need(image_present(SESSION_IMAGE), f"{SESSION_IMAGE} missing: run 'lovd image build'")


async def flow(h: Harness, artifacts: Path, **spec: Any) -> dict[str, Any]:
    """Run flow.mjs once; its JSON report (also saved as <name>.json)."""
    spec = {"base": h.url, "artifacts": str(artifacts), **spec}
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(HERE / "flow.mjs"),
        json.dumps(spec),
        cwd=HERE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CHROMIUM": CHROMIUM},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    lines = out.decode().strip().splitlines()
    assert lines, f"flow.mjs printed nothing; stderr: {err.decode()[-2000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    (artifacts / f"{spec['name']}.json").write_text(json.dumps(result, indent=2))
    print(spec["name"], json.dumps({k: v for k, v in result.items() if k != "requests"}))
    assert result["ok"], f"{spec['name']}: {result.get('error')} at {result.get('url')}"
    assert result["errors_5xx"] == [], result["errors_5xx"]  # never a 502 on the way
    # Nothing the UI asked for was refused by the gate.
    assert result["gate_refusals"] == [], result["gate_refusals"]
    serious = [
        (page["what"], v["id"], v["impact"], v["nodes"])
        for page in result["axe"]
        for v in page["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert serious == [], serious  # axe-core on lovd's pages: 0 serious or critical
    return result


def chatted(result: dict[str, Any], question: str) -> None:
    """In the chat right away, the legal agent alone, an answer citing lovdata.no, and
    the same conversation after a reload."""
    assert result["chat_path"].split("/")[-2:-1] == ["session"], result["chat_path"]
    assert result["picker_visible"] == 0  # no project picker, no folder dialog
    assert result["agents_shown"] == ["juridisk"], result["agents_shown"]
    assert result["agents_mentionable"] == [], result["agents_mentionable"]
    assert any(u.startswith("https://lovdata.no/lov/") for u in result["answer_links"]) or (
        "https://lovdata.no/lov/" in result["answer"]
    ), result["answer"]
    assert question in result["answer"]
    assert result["reload_shown"] and result["reload_same_path"], result


async def test_a_person_asks_in_norwegian_and_in_english(browser_env: None) -> None:
    from lovd.demo.serve import serve_llm_stub, serve_lovdata_mcp

    # Sessions reach them only through the credential broker (on the host's loopback,
    # started by the harness), which is where these URLs are used.
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
        # OpenCode's allowlist alone, as in production: the UI must work with it.
        async with harness(settings=settings, image=SESSION_IMAGE, allowlist=Allowlist()) as h:
            # A warm container is available, as on a running host (the pool's loop is
            # not running here, so the one started now is the one the click gets).
            assert await h.sessions.pool(h.config.warm_max_age).fill()
            [warm] = h.sessions.warm()

            # 1. A Norwegian browser: the landing page, start, the chat, a question.
            nb = await flow(
                h, artifacts, name="nb", mode="start", locale="nb-NO",
                profile=str(profiles / "nb"), question=QUESTION_NB,
                start_label=texts.text("nb", "start"),
                second_question=QUESTION_NB_2, new_chat_label="Ny sesjon",
            )  # fmt: skip
            landing = nb["landing"]
            assert landing["lang"] == "nb" and landing["h1"] == texts.text("nb", "landing_h1")
            assert nb["click_to_prompt_ms"] < WARM_START_LIMIT_MS, nb["steps"]
            assert h.sessions.get(warm.id).status == "running"  # it was the warm one
            chatted(nb, QUESTION_NB)
            assert "ikke juridisk rådgivning" in nb["answer"]
            assert "Spør om hva som helst" in nb["ui_text"]  # OpenCode's UI in Norwegian too
            # A new conversation as OpenCode offers it (its "new session" button).
            assert nb["second_answered"], nb["second_answer"]
            assert any("lovdata.no/lov/1999-03-26-17" in u for u in nb["second_answer_links"])
            assert nb["second_path"] != nb["chat_path"]

            # 2. An English browser: the landing page in English.
            en_landing = await flow(
                h, artifacts, name="en-landing", mode="page", locale="en-US",
                profile=str(profiles / "en-landing"), url=h.url + "/",
            )  # fmt: skip
            page = en_landing["page"]
            assert page["lang"] == "en" and page["h1"] == texts.text("en", "landing_h1")
            assert texts.text("en", "start") in page["text"]

            # 3. A session link (what POST /api/sessions hands out) in an English browser.
            s, _ = await h.sessions.create()
            link = f"{h.url}/c/{s.id}?token={await h.sessions.new_link(s.id)}"
            en = await flow(
                h, artifacts, name="en-link", mode="link", locale="en-US",
                profile=str(profiles / "en"), url=link, question=QUESTION_EN,
            )  # fmt: skip
            chatted(en, QUESTION_EN)
            assert "not legal advice" in en["answer"]

            # 4. The session is stopped for idleness (what housekeeping does after
            #    idle_timeout); the same browser comes back: it wakes, and the earlier
            #    conversation is there.
            await h.sessions.stop(s.id, "idle-stopped", "idle (test)")
            back = await flow(
                h, artifacts, name="en-wake", mode="return", locale="en-US",
                profile=str(profiles / "en"), expect_question=QUESTION_EN,
            )  # fmt: skip
            assert back["conversation_shown"]
            assert back["met_progress"] == texts.text("en", "progress_wake_title") + "…"
            assert h.sessions.get(s.id).status == "running"

            # 5. The Norwegian browser comes back to the site: its latest conversation.
            nb_back = await flow(
                h, artifacts, name="nb-return", mode="return", locale="nb-NO",
                profile=str(profiles / "nb"), expect_question=QUESTION_NB_2,
            )  # fmt: skip
            assert nb_back["chat_path"].rsplit("/", 1)[-1] == nb["second_path"].rsplit("/", 1)[-1]

            # 6. A refusal (an old link), in Norwegian.
            refused = await flow(
                h, artifacts, name="nb-refusal", mode="page", locale="nb-NO",
                profile=str(profiles / "nb-refusal"), url=f"{link}x",
            )  # fmt: skip
            assert refused["http_status"] == 401 and refused["page"]["lang"] == "nb"
            assert "Start en ny økt" in refused["page"]["text"]

            # 7. A link to another session (here the Norwegian one) in the English browser,
            #    which is in its own session: a page names both and asks; only its own
            #    button (a same-origin POST from Chromium) switches.
            other = f"{h.url}/c/{warm.id}?token={await h.sessions.new_link(warm.id)}"
            button = texts.text("en", "switch_button", other=warm.id)
            asked = await flow(
                h, artifacts, name="en-switch", mode="page", locale="en-US",
                profile=str(profiles / "en"), url=other, click=button,
            )  # fmt: skip
            assert asked["http_status"] == 200, asked
            said = asked["page"]["text"]
            assert asked["page"]["h1"] == texts.text("en", "switch_title")
            assert s.id in said and warm.id in said
            assert asked["after_click"]["status"] == 200, asked["after_click"]
            assert asked["after_click"]["path"].split("/")[-2] == "session"  # in its chat
            assert h.sessions.get(warm.id).link_used_at  # the link is spent

            # What the model was offered, every time: the legal agent's prompt, the
            # Lovdata tools and sequential-thinking, no coding tool.
            async with aiohttp.ClientSession() as http, http.get(llm.base_url + "/requests") as r:
                seen = await r.json()
            chats = [c for c in seen if c["tools"]]
            assert chats, seen
            for c in chats:
                assert c["system"].startswith(PROMPT_START), c["system"][:300]
                assert not set(c["tools"]) & CODING_TOOLS, c["tools"]
                assert all(
                    t.startswith(("lovdata_", "sequential-thinking_")) for t in c["tools"]
                ), c["tools"]
            # The method: search, then follow the cross-references, then answer.
            tools_used = [c["reply_tool"] for c in chats if c["reply_tool"]]
            assert "lovdata_search_provisions_fulltext" in tools_used, tools_used
            assert "lovdata_get_cross_references" in tools_used, tools_used
            await h.sessions.flush_activity()
            assert h.sessions.get(warm.id).used_at, "the prompt did not mark the session used"
            assert mcp.calls is not None and mcp.calls.snapshot()
    finally:
        shutil.rmtree(profiles, ignore_errors=True)
        await llm.stop()
        await mcp.stop()
