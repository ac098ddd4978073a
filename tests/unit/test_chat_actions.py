"""The "/" menu's chat actions: /undo, /redo, /compact and /fork (lovd/web/bodycheck.py).

The 1.18.33 web UI sends ``POST /session/{id}/revert`` ``{messageID}`` (/undo, and
/redo to a later message), ``/unrevert`` with no body (/redo back to the end),
``/summarize`` ``{providerID, modelID}`` (/compact) and ``/fork`` ``{messageID}``. Each
body is tried as the UI sends it (passes) and as an attacker would send it: another
model, an extra field, a path or a foreign shape in an id, a body too large (refused,
naming the field). The same routes through real Caddy and OpenCode are in
tests/integration/test_slash_and_title.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lovd.errors import LovdError
from lovd.session.model import Session
from lovd.web.allowlist import Allowlist
from lovd.web.bodycheck import (
    MAX_SMALL_BODY,
    BodyCheck,
    Rules,
    check,
    check_place,
    kind_of,
)
from lovd.web.problems import problem

RULES = Rules(models=frozenset({"lovd/legal-stub", "openai/gpt-4o-mini"}))
SES = "ses_1a2b3c4d5e6fABCDEFGHIJKLMN"
MSG = "msg_1a2b3c4d5e6fABCDEFGHIJKLMN"
PRT = "prt_1a2b3c4d5e6fABCDEFGHIJKLMN"
ACTIONS = ("revert", "unrevert", "summarize", "fork")


def refused(kind: str, body: Any, field: str) -> str:
    with pytest.raises(LovdError) as e:
        check(kind, body, RULES)
    assert e.value.code == "forbidden", e.value.message
    assert e.value.extra["field"] == field, e.value.message
    assert field in e.value.message
    return e.value.message


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("revert", {"messageID": MSG}),  # /undo, and /redo to a later question
        ("revert", {"messageID": MSG, "partID": PRT}),
        ("unrevert", {}),  # /redo back to the end (the UI sends no body)
        ("summarize", {"providerID": "lovd", "modelID": "legal-stub"}),  # /compact
        ("summarize", {"providerID": "openai", "modelID": "gpt-4o-mini", "auto": False}),
        ("fork", {"messageID": MSG}),  # /fork from a question
        ("fork", {}),  # the whole chat
    ],
)
def test_what_the_ui_sends_passes(kind: str, body: dict[str, Any]) -> None:
    check(kind, body, RULES)


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        # A model the operator did not choose (paid with the operator's key).
        ("summarize", {"providerID": "openai", "modelID": "gpt-5-pro"}, "modelID"),
        ("summarize", {"providerID": "opencode", "modelID": "legal-stub"}, "modelID"),
        ("summarize", {"providerID": "lovd", "modelID": ["legal-stub"]}, "modelID"),
        ("summarize", {"providerID": "lovd"}, "modelID"),
        ("summarize", {"modelID": "legal-stub"}, "providerID"),
        ("summarize", {"providerID": "lovd", "modelID": "legal-stub", "auto": "yes"}, "auto"),
        # Fields the UI never sends: other agents, prompts, models, rules.
        ("summarize", {"providerID": "lovd", "modelID": "legal-stub", "agent": "build"}, "agent"),
        (
            "summarize",
            {
                "providerID": "lovd",
                "modelID": "legal-stub",
                "model": {"providerID": "openai", "modelID": "gpt-5-pro"},
            },
            "model",
        ),
        ("revert", {"messageID": MSG, "sessionID": "ses_other"}, "sessionID"),
        ("revert", {"messageID": MSG, "snapshot": "HEAD"}, "snapshot"),
        ("unrevert", {"sessionID": SES}, "sessionID"),
        ("fork", {"messageID": MSG, "permission": [{"permission": "bash"}]}, "permission"),
        ("fork", {"messageID": MSG, "directory": "/"}, "directory"),
        # Ids that are not what the UI sends: paths, other kinds of id, other types.
        ("revert", {}, "messageID"),
        ("revert", {"messageID": "../../run/secrets/lovd.env"}, "messageID"),
        ("revert", {"messageID": "msg_1/../../x"}, "messageID"),
        ("revert", {"messageID": "/run/secrets/lovd.env"}, "messageID"),
        ("revert", {"messageID": SES}, "messageID"),
        ("revert", {"messageID": "msg_"}, "messageID"),
        ("revert", {"messageID": "msg_" + "a" * 61}, "messageID"),
        ("revert", {"messageID": 1}, "messageID"),
        ("revert", {"messageID": MSG, "partID": "prt_../x"}, "partID"),
        ("revert", {"messageID": MSG, "partID": MSG}, "partID"),
        ("fork", {"messageID": "msg_1\n"}, "messageID"),
        ("fork", {"messageID": None}, "messageID"),
    ],
)
def test_attacks_are_refused_naming_the_field(kind: str, body: Any, field: str) -> None:
    refused(kind, body, field)


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ([], []),
        ([], [("x-opencode-directory", "%2Fwork")]),  # what the UI sends on a POST
        ([("directory", "/work")], []),
        ([("directory", "%2Fwork")], [("X-OpenCode-Directory", "/work")]),
    ],
)
def test_the_chats_own_folder_passes(
    query: list[tuple[str, str]], headers: list[tuple[str, str]]
) -> None:
    check_place(query, headers)


@pytest.mark.parametrize(
    ("query", "headers", "field"),
    [
        # Another folder: OpenCode would open a project there (a revert snapshots it).
        ([("directory", "/")], [], "directory"),
        ([("directory", "/run/secrets")], [], "directory"),
        ([("directory", "/work/../run")], [], "directory"),
        ([("directory", "%252Fwork")], [], "directory"),
        ([("directory", "/work"), ("directory", "/")], [], "directory"),
        ([], [("x-opencode-directory", "%2F")], "directory"),
        (
            [],
            [("x-opencode-directory", "%2Fwork"), ("x-opencode-directory", "%2Ftmp")],
            "directory",
        ),
        # A remote workspace, or anything else in the query.
        ([("workspace", "wrk_1")], [], "workspace"),
        ([], [("x-opencode-workspace", "wrk_1")], "workspace"),
        ([("directory", "/work"), ("model", "openai/gpt-5-pro")], [], "model"),
    ],
)
def test_another_folder_or_workspace_is_refused(
    query: list[tuple[str, str]], headers: list[tuple[str, str]], field: str
) -> None:
    with pytest.raises(LovdError) as e:
        check_place(query, headers)
    assert e.value.code == "forbidden" and e.value.extra["field"] == field, e.value.message


def test_no_model_configured_refuses_compact() -> None:
    with pytest.raises(LovdError) as e:
        check(
            "summarize", {"providerID": "lovd", "modelID": "legal-stub"}, Rules(models=frozenset())
        )
    assert e.value.extra["field"] == "modelID" and "llm.model" in e.value.message


def test_bad_shapes_are_bad_requests() -> None:
    for kind in ACTIONS:
        for body in ([], "x", None, 3):
            with pytest.raises(LovdError) as e:
                check(kind, body, RULES)
            assert e.value.code == "bad-request"


def test_the_route_names_the_kind() -> None:
    assert kind_of("/session") == "session"
    assert kind_of(f"/session/{SES}/prompt_async") == "prompt"
    for action in ACTIONS:
        assert kind_of(f"/session/{SES}/{action}") == action
    for path in (
        f"/session/{SES}/shell",
        f"/session/{SES}/command",
        f"/x/{SES}/revert",
        f"/session/{SES}/revert/x",
        "/session/revert",
    ):
        with pytest.raises(LovdError) as e:
            kind_of(path)
        assert e.value.code == "not-found"


def test_the_actions_are_allowed_only_as_checked_routes() -> None:
    a = Allowlist()
    for action in ACTIONS:
        d = a.check("POST", f"/session/{SES}/{action}?directory=%2Fwork")
        assert d.allowed and d.via_lovd, action
        assert d.chat == (action == "summarize")  # a model call, like a prompt
        assert not a.check("GET", f"/session/{SES}/{action}").allowed
    # The v2 routes of the same actions stay refused (the 1.18.33 UI speaks v1).
    for path in (
        f"/api/session/{SES}/revert/stage",
        f"/api/session/{SES}/revert/commit",
        f"/api/session/{SES}/revert/clear",
        f"/api/session/{SES}/compact",
    ):
        assert not a.check("POST", path).allowed, path


# --- the handler: what reaches the container -------------------------------------------


@pytest.fixture
async def front() -> AsyncIterator[tuple[str, list[tuple[str, bytes]], dict[str, bool]]]:
    """lovd's handler for the four routes in front of a recording stand-in container;
    the URL of the session's chat, what the container got, and a switch for the quota."""
    seen: list[tuple[str, bytes]] = []

    async def container(request: web.Request) -> web.Response:
        seen.append((request.raw_path, await request.read()))
        return web.json_response(True)

    up = web.Application()
    up.router.add_post("/session/{sid}/{action}", container)
    up_runner = web.AppRunner(up)
    await up_runner.setup()
    await web.TCPSite(up_runner, "127.0.0.1", 0).start()
    port = up_runner.addresses[0][1]
    session = Session("0123456789abcdef", "running", "", "", port, "", "", 0, 0, 0, 0)
    full = {"full": False}

    async def refusal(sid: str) -> str:
        return "storage used up" if full["full"] else ""

    async with aiohttp.ClientSession() as http:
        checker = BodyCheck(
            session_of=lambda r: session,
            password_header=lambda sid: "Basic x",
            http=http,
            rules=RULES,
            disk_refusal=refusal,
        )

        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                return await checker.handle(request)
            except LovdError as e:
                return problem(e)

        app = web.Application(client_max_size=1 << 24)
        for action in ACTIONS:
            app.router.add_post(f"/session/{{oc}}/{action}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}/session/{SES}", seen, full
        finally:
            await runner.cleanup()
            await up_runner.cleanup()


async def _post(url: str, body: Any = None, data: bytes | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body, data=data) as r:
        return r.status, await r.json(content_type=None)


async def test_the_handler_forwards_checked_bodies_only(
    front: tuple[str, list[tuple[str, bytes]], dict[str, bool]],
) -> None:
    url, seen, full = front
    ok = {
        "revert": {"messageID": MSG},
        "summarize": {"providerID": "lovd", "modelID": "legal-stub"},
        "fork": {"messageID": MSG},
    }
    for action, body in ok.items():
        assert await _post(f"{url}/{action}?directory=/work", body) == (200, True)
    # /redo as the UI sends it: no body at all.
    assert await _post(f"{url}/unrevert", data=b"") == (200, True)
    assert [(p, json.loads(b)) for p, b in seen] == [
        *((f"/session/{SES}/{a}?directory=/work", b) for a, b in ok.items()),
        (f"/session/{SES}/unrevert", {}),
    ]
    # Attacks: a problem naming the field, and nothing reaches the container.
    n = len(seen)
    status, body = await _post(f"{url}/summarize", {"providerID": "openai", "modelID": "gpt-5-pro"})
    assert status == 403 and body["field"] == "modelID" and "gpt-5-pro" in body["detail"]
    assert body["data"]["message"] == body["detail"]  # what the UI's toast shows
    status, body = await _post(f"{url}/revert", {"messageID": "../../run/secrets/lovd.env"})
    assert status == 403 and body["field"] == "messageID"
    status, body = await _post(f"{url}/fork", {"messageID": MSG, "title": "x"})
    assert status == 403 and body["field"] == "title"
    # A body larger than a few ids is refused whole, however it is sent.
    big = b'{"messageID": "' + b"a" * (MAX_SMALL_BODY + 10) + b'"}'
    status, body = await _post(f"{url}/revert", data=big)
    assert status == 413 and body["code"] == "body-too-large"
    status, body = await _post(f"{url}/fork", data=b"{not json")
    assert status == 400
    status, body = await _post(f"{url}/revert?directory=/", ok["revert"])
    assert status == 403 and body["field"] == "directory"
    assert len(seen) == n
    # A full disk: /compact and /fork add to the chat database; /undo and /redo do not.
    full["full"] = True
    for action in ("summarize", "fork"):
        status, body = await _post(f"{url}/{action}", ok[action])
        assert status == 507 and "storage used up" in body["detail"], action
    assert len(seen) == n
    assert await _post(f"{url}/revert", ok["revert"]) == (200, True)
    assert await _post(f"{url}/unrevert", {}) == (200, True)
