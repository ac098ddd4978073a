"""Straight into a chat (lovd/web/chat_landing.py) against a stand-in that answers the
three OpenCode routes the way OpenCode 1.18.33 does (field names and shapes copied from
its GET /doc and real answers). The real container is exercised by tests/browser.
"""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from lovd.web.allowlist import Allowlist
from lovd.web.chat_landing import ChatLanding, chat_path, latest_chat
from lovd.web.chattitle import PLACEHOLDER
from tests.unit.test_gate import NAV, XHR, open_gate

WORK = "/work"
AUTH = "Basic b3BlbmNvZGU6cHc="


@dataclass
class FakeOpenCode:
    chats: list[dict[str, Any]] = field(default_factory=list)
    created: int = 0
    auth_seen: list[str] = field(default_factory=list)
    fail: int = 0  # answer 500 to this many requests first

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/path", self.path)
        app.router.add_get("/session", self.list)
        app.router.add_post("/session", self.create)
        return app

    def _check(self, request: web.Request) -> None:
        self.auth_seen.append(request.headers.get("Authorization", ""))
        if self.fail:
            self.fail -= 1
            raise web.HTTPInternalServerError()

    async def path(self, request: web.Request) -> web.Response:
        self._check(request)
        where = {"home": "/home/opencode", "state": "/s", "config": "/c", "worktree": "/"}
        return web.json_response({**where, "directory": WORK})

    async def list(self, request: web.Request) -> web.Response:
        self._check(request)
        assert request.query.get("roots") == "true"
        return web.json_response(self.chats)

    async def create(self, request: web.Request) -> web.Response:
        self._check(request)
        # lovd asks for nothing but a chat, titled in Norwegian until its first question
        assert await request.json() == {"title": PLACEHOLDER}
        await asyncio.sleep(0.05)  # long enough for a second landing to overlap
        self.created += 1
        chat = chat_row(f"ses_new{self.created}", 100.0 + self.created)
        self.chats.append(chat)
        return web.json_response(chat)


def chat_row(cid: str, updated: float, **extra: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "slug": "x",
        "projectID": "global",
        "directory": WORK,
        "title": "t",
        "version": "1.18.33",
        "time": {"created": 1, "updated": updated},
        **extra,
    }


@pytest.fixture
async def opencode() -> AsyncIterator[tuple[FakeOpenCode, int, aiohttp.ClientSession]]:
    fake = FakeOpenCode()
    server = TestServer(fake.app())
    await server.start_server()
    async with aiohttp.ClientSession() as http:
        yield fake, int(server.port or 0), http
    await server.close()


def landing(http: aiohttp.ClientSession) -> ChatLanding:
    return ChatLanding(http=http, password_header=lambda sid: AUTH, timeout=1.0)


def test_chat_path_is_the_ui_route_of_a_chat_in_a_folder() -> None:
    assert chat_path("/work", "ses_1") == "/L3dvcms/session/ses_1"
    folder = chat_path("/a/bc", "ses_1").split("/")[1]
    assert "=" not in folder
    assert base64.urlsafe_b64decode(folder + "=" * (-len(folder) % 4)) == b"/a/bc"
    # The gate lets the browser follow the redirect, and reload where the UI moves it.
    allow = Allowlist()
    assert allow.check("GET", chat_path("/work", "ses_1a2b3c")).allowed
    origin = base64.urlsafe_b64encode(b"http://127.0.0.1:8080").decode().rstrip("=")
    assert allow.check("GET", f"/server/{origin}/session/ses_1a2b3c").allowed
    assert not allow.check("POST", f"/server/{origin}/session/ses_1a2b3c").allowed


@pytest.mark.parametrize(
    ("directory", "chat_id"),
    [
        ("/work", "../../pty"),
        ("/work", "ses_1\r\nSet-Cookie: x=1"),
        ("/work", "//evil.example"),
        ("/work", ""),
        ("work", "ses_1"),  # not a folder the UI can open
    ],
)
def test_a_hostile_container_cannot_choose_where_the_browser_goes(
    directory: str, chat_id: str
) -> None:
    from lovd.errors import LovdError

    with pytest.raises(LovdError):
        chat_path(directory, chat_id)


def test_latest_root_chat_of_the_workspace() -> None:
    chats = [
        chat_row("ses_old", 10),
        chat_row("ses_new", 30),
        chat_row("ses_child", 99, parentID="ses_new"),  # a sub-agent's chat
        {**chat_row("ses_elsewhere", 50), "directory": "/tmp"},
        chat_row("ses_mid", 20),
    ]
    assert latest_chat(chats, WORK) == "ses_new"
    assert latest_chat([], WORK) is None


def test_an_answer_of_another_shape_is_an_error_not_a_guess() -> None:
    from lovd.errors import LovdError

    with pytest.raises(LovdError, match="'updated'"):
        latest_chat([{"id": "ses_1", "directory": WORK, "time": {}}], WORK)
    with pytest.raises(LovdError):
        latest_chat({"sessions": []}, WORK)


async def test_lands_in_the_latest_chat(
    opencode: tuple[FakeOpenCode, int, aiohttp.ClientSession],
) -> None:
    fake, port, http = opencode
    fake.chats = [chat_row("ses_a", 1), chat_row("ses_b", 2)]
    assert await landing(http).location("s1", port) == chat_path(WORK, "ses_b")
    assert fake.created == 0
    assert set(fake.auth_seen) == {AUTH}  # the container's password, every time


async def test_first_visit_creates_one_chat_even_from_two_tabs(
    opencode: tuple[FakeOpenCode, int, aiohttp.ClientSession],
) -> None:
    fake, port, http = opencode
    land = landing(http)
    first, second = await asyncio.gather(land.location("s1", port), land.location("s1", port))
    assert first == second == chat_path(WORK, "ses_new1")
    assert fake.created == 1
    # Coming back lands in the same chat.
    assert await land.location("s1", port) == chat_path(WORK, "ses_new1")


async def test_no_answer_means_no_redirect(
    opencode: tuple[FakeOpenCode, int, aiohttp.ClientSession],
) -> None:
    fake, port, http = opencode
    fake.fail = 1
    assert await landing(http).location("s1", port) is None
    # Nothing listens: the same (the gate then lets OpenCode's own page through).
    with socket.socket() as bound_only:  # bound, never listening: refused at once
        bound_only.bind(("127.0.0.1", 0))
        assert await landing(http).location("s1", bound_only.getsockname()[1]) is None


# --- the gate's hook (lovd/web/gate.py), in-process with the fake runner ---------------


async def test_gate_redirects_a_page_load_of_the_site_into_the_chat(
    tmp_path: Path,
    free_ports: list[int],
    opencode: tuple[FakeOpenCode, int, aiohttp.ClientSession],
) -> None:
    fake, port, _ = opencode
    async with open_gate(tmp_path, free_ports) as g:
        s, token = await g.session("running", port=port)
        r = await g.auth(s, token, "GET", "/", NAV)
        assert r.status == 303 and r.headers["Location"] == chat_path(WORK, "ses_new1")
        assert r.headers["Cache-Control"] == "no-store"
        assert "X-Lovd-Upstream" not in r.headers and "Authorization" not in r.headers
        assert fake.auth_seen[-1] == g.env.basic_auth(s.id)  # its own password
        # Only a page load of the site itself: the UI's own requests pass as before.
        for method, uri, headers in (
            ("GET", "/", XHR),
            ("GET", chat_path(WORK, "ses_new1"), NAV),
            ("GET", "/session", XHR),
        ):
            r = await g.auth(s, token, method, uri, headers)
            assert r.status == 204 and r.headers["X-Lovd-Upstream"] == f"127.0.0.1:{port}"
        assert fake.created == 1


async def test_gate_lets_opencode_answer_when_the_container_cannot_tell(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_gate(tmp_path, free_ports) as g:
        s, token = await g.session("running")  # nothing listens on its port
        r = await g.auth(s, token, "GET", "/", NAV)
        assert r.status == 204  # OpenCode's own start page, not an error


async def test_a_page_load_waits_a_moment_for_a_starting_session(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_gate(tmp_path, free_ports) as g:
        # Starting (a warm-pool claim being confirmed): ready within NAV_HOLD, so the
        # page load goes on instead of getting the progress page for a blink.
        s, token = await g.session("starting", port=free_ports[0])
        r = await g.auth(s, token, "GET", chat_path(WORK, "ses_1"), NAV)
        assert r.status == 204, await r.text()
        assert g.store.get(s.id).status == "running"  # type: ignore[union-attr]
        # Waking from an idle stop takes seconds: the progress page at once.
        s2, token2 = await g.session("idle-stopped", port=free_ports[1])
        r = await g.auth(s2, token2, "GET", chat_path(WORK, "ses_1"), NAV)
        assert r.status == 503 and r.headers["Retry-After"] == "2"
