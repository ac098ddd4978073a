"""A new chat is titled in Norwegian until its first question, then OpenCode titles it.

OpenCode (1.18.33) gives a chat made without a title ``New session - <ISO time>``, which
its web UI shows as "New session" in the sidebar and the tab until the chat's title is
generated from the first question. That generation runs only while the title still has
that default form: a chat made with any other title keeps it for good (tried against
the real server: tests/integration/test_slash_and_title.py).

So lovd does two things, both on the host, with the container's password:

- a chat lovd makes (the warm container's first chat, web/chat_landing.py) and a chat
  the browser makes without a title (``POST /session`` through bodycheck.py) get
  :data:`PLACEHOLDER`;
- before a chat's first question is forwarded (``prompt_async`` through bodycheck.py),
  a chat still titled :data:`PLACEHOLDER` gets OpenCode's own default title back
  (:func:`default_title`, from the chat's creation time), so OpenCode titles it from the
  question as it would have. The UI shows "New session" for the second or so that takes.

Whether a chat still needs that is asked once per chat and lovd process (``GET
/session/{id}``, a few ms on the loopback), remembered in a bounded set; forgetting only
costs another look. A title is cosmetic: when the container does not answer, the
question goes on untouched.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from yarl import URL

log = logging.getLogger(__name__)

PLACEHOLDER = "Ny samtale"
REQUEST_TIMEOUT = 2.0
MAX_SEEN = 65536
_CHAT_ID = re.compile(r"ses_[A-Za-z0-9]{1,124}")


def default_title(created_ms: float) -> str:
    """OpenCode's own title of a new root chat, which its title generation looks for:
    ``New session - `` and the creation time as JavaScript's toISOString() writes it."""
    when = datetime.fromtimestamp(created_ms / 1000, UTC)
    return "New session - " + when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def titled(body: dict[str, Any]) -> dict[str, Any]:
    """A ``POST /session`` body with :data:`PLACEHOLDER` as its title when it names none
    (a sub-chat, one with ``parentID``, is OpenCode's business and left as sent)."""
    if "title" in body or body.get("parentID"):
        return body
    return {**body, "title": PLACEHOLDER}


class ChatTitles:
    """Gives a placeholder-titled chat OpenCode's default title back before its first
    question."""

    def __init__(
        self,
        *,
        http: aiohttp.ClientSession,
        password_header: Callable[[str], str],
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.http = http
        self.password_header = password_header
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._seen: dict[str, None] = {}  # insertion-ordered: the oldest is dropped first

    async def before_prompt(self, sid: str, port: int, chat_id: str) -> None:
        key = f"{sid}/{chat_id}"
        if key in self._seen or not _CHAT_ID.fullmatch(chat_id):
            return  # not an OpenCode chat id (lovd's socket is reachable without the gate)
        url = URL(f"http://127.0.0.1:{port}/session/{chat_id}", encoded=True)
        headers = {"Authorization": self.password_header(sid)}
        try:
            async with self.http.get(url, headers=headers, timeout=self.timeout) as r:
                if r.status != 200:
                    return  # no such chat: OpenCode will say so to the prompt itself
                chat = await r.json()
            if isinstance(chat, dict) and chat.get("title") == PLACEHOLDER:
                created = (chat.get("time") or {}).get("created")
                if not isinstance(created, int | float):
                    created = datetime.now(UTC).timestamp() * 1000
                body = {"title": default_title(created)}
                async with self.http.patch(
                    url, json=body, headers=headers, timeout=self.timeout
                ) as r:
                    if r.status != 200:
                        log.info("OpenCode answered %s to a title reset", r.status)
                        return
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.info("could not look at a chat's title: %r", e, extra={"SESSION_ID": sid})
            return
        if len(self._seen) >= MAX_SEEN:
            self._seen.pop(next(iter(self._seen)))
        self._seen[key] = None
