"""The "/" menu of OpenCode's web UI: lovd answers ``GET /command`` itself, with ``[]``.

The 1.18.33 UI fills the menu from ``GET /command`` (custom commands, skills and MCP
prompts; it runs one with ``POST /session/{id}/command``) plus its own client-side
commands. OpenCode's answer lists ``init`` and ``review`` (built in: they set up
``AGENTS.md`` and review a git diff), ``customize-opencode`` (a built-in skill about
OpenCode's config) and ``norwegian-legal-queries`` (the legal skill, which the legal
agent has in its prompt anyway): none of them can run here, since the gate refuses
``POST /session/{id}/command`` (allowlist.py). So the gate names lovd's own socket as
the upstream of ``GET /command`` (allowlist ``lovd``) and this answers the list of
commands that work for a session: none. The container is never asked; what a visitor
types after a "/" is then sent as an ordinary question.

The cookie is checked again, as for every request on this socket (it is reachable by
anything that can reach the landing page, not only through forward_auth).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from lovd.errors import LovdError
from lovd.session.model import Session
from lovd.web.problems import problem

# What a session's chat can run through POST /session/{id}/command: nothing.
WORKING_COMMANDS: list[dict[str, str]] = []


class SlashCommands:
    def __init__(self, *, session_of: Callable[[web.Request], Session]) -> None:
        self.session_of = session_of

    async def handle(self, request: web.Request) -> web.Response:
        try:
            self.session_of(request)
        except LovdError as e:
            return problem(e, request.path)
        return web.json_response(WORKING_COMMANDS, headers={"Cache-Control": "no-store"})
