"""Chat requests whose body could change what the agent may do go through lovd.

The allowlist (web/allowlist.py) decides on method and path, but two allowed requests
carry settings in their body that OpenCode (1.18.33) turns into session rules which
override the container's own configuration:

- ``POST /session/{id}/prompt_async`` accepts ``tools`` (``{"bash": true}`` becomes a
  session-level "allow" for bash, overriding ``permission: {bash: deny}``), ``system``
  (replaces the agent's instructions), ``format``, and parts that start sub-agents;
- ``POST /session`` accepts ``permission`` (a whole rule set), ``metadata`` and
  ``workspaceID``.

forward_auth never sees a body. So for these two routes the gate answers Caddy with
lovd's own public socket as the upstream, and this module receives the request, keeps
only the fields the chat UI sends (default deny), and forwards it to the session's
container with the container's password. Everything else streams from the browser to
the container as before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from lovd.errors import LovdError
from lovd.session.model import Session

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024  # a long question with an attached document
# What the 1.18.33 web UI sends (its SDK's PromptInput / session create), nothing more.
PROMPT_FIELDS = frozenset({"parts", "messageID", "model", "agent", "variant", "noReply"})
SESSION_FIELDS = frozenset({"title", "parentID", "agent", "model"})
PART_TYPES = frozenset({"text", "file"})
_DROP_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "authorization",
        "cookie",
        "te",
        "upgrade",
    }
)


def check(kind: str, body: Any) -> None:
    """Raise ``forbidden`` when the body asks for more than the chat UI does."""
    if not isinstance(body, dict):
        raise LovdError("bad-request", "the request body must be a JSON object")
    allowed = PROMPT_FIELDS if kind == "prompt" else SESSION_FIELDS
    extra = sorted(set(body) - allowed)
    if extra:
        raise LovdError(
            "forbidden",
            f"{', '.join(extra)}: not available in this service (a chat may set only "
            f"{', '.join(sorted(allowed))})",
        )
    if kind != "prompt":
        return
    parts = body.get("parts")
    if not isinstance(parts, list):
        raise LovdError("bad-request", "parts must be a list")
    for part in parts:
        kind_ = part.get("type") if isinstance(part, dict) else None
        if kind_ not in PART_TYPES:
            raise LovdError(
                "forbidden",
                f"message parts of type {kind_!r} are not available in this service "
                f"(only {', '.join(sorted(PART_TYPES))})",
            )


class BodyCheck:
    """The handler behind the two routes (on lovd's public socket)."""

    def __init__(
        self,
        *,
        session_of: Callable[[web.Request], Session],
        password_header: Callable[[str], str],
        http: aiohttp.ClientSession,
    ) -> None:
        self.session_of = session_of
        self.password_header = password_header
        self.http = http

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``session_of`` authenticates the cookie again: this socket is reachable by
        anything that can reach the landing page, not only through forward_auth."""
        s = self.session_of(request)
        if s.status != "running":
            raise LovdError("unavailable", "the session is not running; reload the page")
        kind = "prompt" if request.path.endswith("/prompt_async") else "session"
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise LovdError("body-too-large", f"a chat request may be at most {MAX_BODY} bytes")
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            raise LovdError("invalid-json", "the request body is not valid JSON") from e
        try:
            check(kind, body)
        except LovdError as e:
            log.info("refused a %s request body: %s", kind, e.message, extra={"SESSION_ID": s.id})
            raise
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_HEADERS}
        headers = {k: v for k, v in headers.items() if not k.lower().startswith("x-lovd-")}
        headers["Authorization"] = self.password_header(s.id)
        # The query exactly as sent (OpenCode reads ?directory=…), not re-encoded.
        url = URL(f"http://127.0.0.1:{s.port}{request.raw_path}", encoded=True)
        try:
            # What was checked is what is sent: the parsed body, serialised again.
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
            async with self.http.post(url, data=payload, headers=headers) as r:
                data = await r.read()
                out = web.Response(status=r.status, body=data)
                for name in ("Content-Type", "Cache-Control"):
                    if name in r.headers:
                        out.headers[name] = r.headers[name]
                return out
        except (aiohttp.ClientError, TimeoutError) as e:
            raise LovdError("unavailable", "the session did not answer; try again") from e
