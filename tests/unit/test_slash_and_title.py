"""The "/" menu and a new chat's title (lovd/web/commands.py, lovd/web/chattitle.py).

Against a stand-in answering ``GET``/``PATCH /session/{id}`` and ``POST /session`` the
way OpenCode 1.18.33 does; the real container, through Caddy, is in
tests/integration/test_slash_and_title.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lovd.errors import LovdError
from lovd.session.model import Session
from lovd.web.allowlist import Allowlist
from lovd.web.bodycheck import BodyCheck, Rules
from lovd.web.chattitle import PLACEHOLDER, ChatTitles, default_title, titled
from lovd.web.problems import problem
from tests.unit.test_gate import XHR, open_gate

SES = "ses_1a2b3c4d5e6fABCDEFGHIJKLMN"
RULES = Rules(models=frozenset({"lovd/legal-stub"}))
ASK = {"parts": [{"type": "text", "text": "Kan arbeidsgiveren si meg opp?"}]}
# The web UI's own test for a default title (its bundle, 1.18.33): it shows such a
# title as "New session"; OpenCode's server titles only a chat whose title has this form.
UI_DEFAULT = re.compile(
    r"^(New session|Child session) - \d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"
)


# --- GET /command: lovd's own answer -------------------------------------------------


def test_only_the_command_list_is_answered_by_lovd() -> None:
    al = Allowlist()
    assert {ln for r in al.routes if r.lovd for ln in r.lines} == {"GET /command"}
    d = al.check("GET", "/command?directory=%2Fwork")
    assert d.allowed and d.via_lovd and not d.body
    assert al.check("POST", f"/session/{SES}/prompt_async").via_lovd  # a checked body
    assert not al.check("GET", "/session").via_lovd
    # Running a command stays refused: that is why none is offered.
    assert not al.check("POST", f"/session/{SES}/command").allowed


async def test_the_gate_sends_the_command_list_to_lovd(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_gate(tmp_path, free_ports) as g:
        s, token = await g.session()
        r = await g.auth(s, token, "GET", "/command?directory=%2Fwork", XHR)
        assert r.status == 204
        assert r.headers["X-Lovd-Upstream"] == "unix//run/lovd-test/auth.sock"
        # What Caddy then sends to lovd's socket: the list, for a valid cookie only.
        ok = await g.client.get(
            "/command?directory=%2Fwork", headers={"Cookie": f"lovd_session={s.id}.{token}"}
        )
        assert ok.status == 200 and await ok.json() == []
        assert ok.headers["Cache-Control"] == "no-store"
        for cookie in ("", f"lovd_session={s.id}.wrong"):
            bad = await g.client.get("/command", headers={"Cookie": cookie} if cookie else {})
            assert bad.status == 401
            assert bad.headers["Content-Type"].startswith("application/problem+json")
            assert "session" in (await bad.json())["detail"]


# --- the title ------------------------------------------------------------------------


def test_the_default_title_is_the_one_opencode_looks_for() -> None:
    # 2026-12-02T07:50:56.211Z, as OpenCode 1.18.33 titled a chat made at that time.
    assert default_title(1796197856211) == "New session - 2026-12-02T07:50:56.211Z"
    assert default_title(1796197856000) == "New session - 2026-12-02T07:50:56.000Z"
    assert UI_DEFAULT.fullmatch(default_title(0))
    assert not UI_DEFAULT.fullmatch(PLACEHOLDER)


def test_a_new_chat_without_a_title_gets_the_placeholder() -> None:
    assert titled({}) == {"title": PLACEHOLDER}
    assert titled({"agent": "juridisk"}) == {"agent": "juridisk", "title": PLACEHOLDER}
    assert titled({"title": "Husleie"}) == {"title": "Husleie"}
    assert titled({"parentID": "ses_1"}) == {"parentID": "ses_1"}


@dataclass
class FakeOpenCode:
    """GET/PATCH /session/{id}, POST /session and prompt_async, as 1.18.33 answers them."""

    chats: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: list[tuple[str, str, Any]] = field(default_factory=list)
    fail: bool = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/session", self.create)
        app.router.add_get("/session/{id}", self.get)
        app.router.add_patch("/session/{id}", self.patch)
        app.router.add_post("/session/{id}/prompt_async", self.prompt)
        return app

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.log.append(("POST", "/session", body))
        cid = f"ses_{len(self.chats) + 1:026d}"
        title = body.get("title") or default_title(1796197856211)
        self.chats[cid] = {"id": cid, "title": title, "time": {"created": 1796197856211}}
        return web.json_response(self.chats[cid])

    async def get(self, request: web.Request) -> web.Response:
        self.log.append(("GET", request.path, None))
        if self.fail:
            raise web.HTTPInternalServerError()
        chat = self.chats.get(request.match_info["id"])
        if chat is None:
            raise web.HTTPNotFound()
        return web.json_response(chat)

    async def patch(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.log.append(("PATCH", request.path, body))
        chat = self.chats[request.match_info["id"]]
        chat.update(body)
        return web.json_response(chat)

    async def prompt(self, request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        self.log.append(("PROMPT", cid, self.chats.get(cid, {}).get("title")))
        return web.Response(status=204)


@pytest.fixture
async def oc() -> AsyncIterator[tuple[FakeOpenCode, int]]:
    fake = FakeOpenCode()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield fake, runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest.fixture
async def front(oc: tuple[FakeOpenCode, int]) -> AsyncIterator[str]:
    """lovd's BodyCheck in front of the stand-in, as on lovd's public socket."""
    _, port = oc
    session = Session("0123456789abcdef", "running", "", "", port, "", "", 0, 0, 0, 0)
    async with aiohttp.ClientSession() as http:
        check = BodyCheck(
            session_of=lambda r: session,
            password_header=lambda sid: "Basic x",
            http=http,
            rules=RULES,
        )

        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                return await check.handle(request)
            except LovdError as e:
                return problem(e)

        app = web.Application()
        app.router.add_post("/session", handle)
        app.router.add_post("/session/{oc}/prompt_async", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


async def test_a_chat_the_browser_makes_is_titled_then_retitled_by_opencode(
    oc: tuple[FakeOpenCode, int], front: str
) -> None:
    fake, _ = oc
    async with aiohttp.ClientSession() as http:
        async with http.post(front + "/session", json={}) as r:
            assert r.status == 200
            chat = await r.json()
        assert chat["title"] == PLACEHOLDER
        assert fake.log == [("POST", "/session", {"title": PLACEHOLDER})]
        # An attacker's fields are still refused: lovd adds a title, nothing else.
        async with http.post(front + "/session", json={"permission": []}) as r:
            assert r.status == 403
        async with http.post(front + "/session", json={"title": "Husleie"}) as r:
            assert (await r.json())["title"] == "Husleie"
        fake.log.clear()
        for _ in range(3):
            async with http.post(f"{front}/session/{chat['id']}/prompt_async", json=ASK) as r:
                assert r.status == 204
    path = f"/session/{chat['id']}"
    # Before the first question reaches OpenCode its own default title is back, so it
    # titles the chat from the question; the next questions cost no look at all.
    assert fake.log == [
        ("GET", path, None),
        ("PATCH", path, {"title": "New session - 2026-12-02T07:50:56.211Z"}),
        ("PROMPT", chat["id"], "New session - 2026-12-02T07:50:56.211Z"),
        ("PROMPT", chat["id"], "New session - 2026-12-02T07:50:56.211Z"),
        ("PROMPT", chat["id"], "New session - 2026-12-02T07:50:56.211Z"),
    ]


async def test_a_chat_with_its_own_title_is_left_alone(oc: tuple[FakeOpenCode, int]) -> None:
    fake, port = oc
    fake.chats["ses_a"] = {"id": "ses_a", "title": "Oppsigelse", "time": {"created": 1}}
    async with aiohttp.ClientSession() as http:
        titles = ChatTitles(http=http, password_header=lambda sid: "Basic x")
        await titles.before_prompt("s1", port, "ses_a")
        await titles.before_prompt("s1", port, "ses_a")
    assert fake.log == [("GET", "/session/ses_a", None)]
    assert fake.chats["ses_a"]["title"] == "Oppsigelse"


async def test_a_container_that_does_not_answer_leaves_the_question_alone(
    oc: tuple[FakeOpenCode, int],
) -> None:
    fake, port = oc
    fake.chats["ses_a"] = {"id": "ses_a", "title": PLACEHOLDER, "time": {"created": 1}}
    fake.fail = True
    async with aiohttp.ClientSession() as http:
        titles = ChatTitles(http=http, password_header=lambda sid: "Basic x")
        await titles.before_prompt("s1", port, "ses_a")  # no exception: a title is cosmetic
        await titles.before_prompt("s1", 1, "ses_a")  # nothing listens there
        fake.fail = False
        await titles.before_prompt("s1", port, "ses_a")  # not remembered: looked at again
    assert fake.chats["ses_a"]["title"] == default_title(1)
    assert [m for m, _, _ in fake.log] == ["GET", "GET", "PATCH"]


async def test_only_chat_ids_are_looked_at(oc: tuple[FakeOpenCode, int]) -> None:
    """lovd's socket is reachable without the gate: a path segment that is not a chat id
    ("..", a URL-encoded slash decoded) never becomes a request to the container."""
    fake, port = oc
    async with aiohttp.ClientSession() as http:
        titles = ChatTitles(http=http, password_header=lambda sid: "Basic x")
        for odd in ("..", ".", "ses_a/../../config", "x", "ses_", "ses_a?x=1"):
            await titles.before_prompt("s1", port, odd)
    assert fake.log == []
