"""Straight into a chat: where a browser goes when it opens the site with a session.

OpenCode's web UI starts at ``/`` with its own home screen (projects, "Add project", a
folder dialog): nothing a person who came with a legal question should see. So when a
session's browser *navigates* to ``/`` and the session's container runs, the gate
answers (through Caddy's forward_auth, which hands a non-2xx answer to the browser as
is) with a redirect to the chat itself:

    303 Location: /{base64url(workspace)}/session/{chat id}

- the workspace is the container's working directory (``GET /path``, ``/work``);
- the chat is the session's latest conversation (``GET /session?roots=true``), so a
  returning browser sees its earlier questions and answers; when there is none yet,
  lovd creates an empty one (``POST /session``, titled "Ny samtale" until its first
  question: web/chattitle.py), so the prompt is ready to type in.

lovd asks the container itself, with the container's password, on the host's loopback:
these requests never pass the gate or bodycheck (lovd creates the chat with only a
title, nothing a browser chose). Anything else the UI offers — a new conversation, the
list of earlier ones — stays OpenCode's own.

**Made for OpenCode 1.18.33** (``allowlist.OPENCODE_VERSION``). What this relies on, and
the tests that fail when an upgrade changes it:

- the UI's client route ``/{dir}/session/{id}`` (``dir`` = base64url of the folder,
  unpadded) opens that chat; 1.18's tabbed layout then moves to
  ``/server/{base64url(origin)}/session/{id}``, which a reload asks the gate for
  (allowlist.py) — tests/browser/flow.mjs lands, asks, reloads;
- ``GET /path`` → ``{"directory": …}``; ``GET /session?roots=true`` → a list of
  ``{"id", "directory", "time": {"updated"}}``; ``POST /session`` → ``{"id"}`` —
  tests/unit/test_chat_landing.py (against a stand-in answering as 1.18.33 does) and
  the browser test (against the real container).

When the container does not answer in time, the navigation goes to OpenCode's own
``/`` as before (logged): a person then sees OpenCode's home rather than an error.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections.abc import Callable
from typing import Any

import aiohttp

from lovd.errors import LovdError
from lovd.web.chattitle import PLACEHOLDER

log = logging.getLogger(__name__)

# Each request to the container; a warm or just-woken OpenCode answers in milliseconds.
REQUEST_TIMEOUT = 3.0
# The newest chats are first; this many is plenty to find the latest root chat.
LIST_LIMIT = 50
MAX_LOCKS = 1024
# What lovd puts into the Location header comes from the container, which is hostile
# like everything in a session (docs/security.md): only an OpenCode chat id and an
# absolute folder, or no redirect at all.
CHAT_ID = re.compile(r"ses_[A-Za-z0-9]{1,124}")


def chat_path(directory: str, chat_id: str) -> str:
    """The UI's client route of one chat in one folder (OpenCode 1.18.33)."""
    if not CHAT_ID.fullmatch(chat_id) or not directory.startswith("/"):
        raise LovdError("unavailable", "OpenCode named a chat or folder lovd cannot link to")
    folder = base64.urlsafe_b64encode(directory.encode()).decode().rstrip("=")
    return f"/{folder}/session/{chat_id}"


def _field(obj: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    """One field of OpenCode's JSON, or LovdError naming it (no silent defaults)."""
    value = obj.get(name) if isinstance(obj, dict) else None
    if not isinstance(value, kind):
        raise LovdError("unavailable", f"OpenCode's answer has no valid {name!r}")
    return value


def latest_chat(chats: Any, directory: str) -> str | None:
    """The id of the most recently updated top-level chat in ``directory``, if any."""
    if not isinstance(chats, list):
        raise LovdError("unavailable", "OpenCode's chat list is not a list")
    best: tuple[float, str] | None = None
    for chat in chats:
        if not isinstance(chat, dict) or chat.get("parentID"):
            continue  # a sub-agent's chat is not a conversation of the person's
        if chat.get("directory") != directory:
            continue
        updated = _field(_field(chat, "time", dict), "updated", (int, float))
        cid = _field(chat, "id", str)
        if best is None or updated > best[0]:
            best = (float(updated), cid)
    return best[1] if best else None


class ChatLanding:
    """Finds (or creates) the chat a session's browser should land in."""

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
        # One landing at a time per session: two tabs opened together must not create
        # two empty chats.
        self._locks: dict[str, asyncio.Lock] = {}

    async def _get(self, base: str, auth: str, path: str) -> Any:
        async with self.http.get(
            base + path, headers={"Authorization": auth}, timeout=self.timeout
        ) as r:
            if r.status != 200:
                raise LovdError("unavailable", f"OpenCode answered {r.status} to GET {path}")
            return await r.json()

    async def chat_for(self, sid: str, port: int) -> str:
        """The path to redirect to: the latest chat of this session, or a new one."""
        if len(self._locks) > MAX_LOCKS:  # forget sessions nobody is landing in now
            self._locks = {k: v for k, v in self._locks.items() if v.locked()}
        lock = self._locks.setdefault(sid, asyncio.Lock())
        async with lock:
            base = f"http://127.0.0.1:{port}"
            auth = self.password_header(sid)
            directory = _field(await self._get(base, auth, "/path"), "directory", str)
            chats = await self._get(base, auth, f"/session?roots=true&limit={LIST_LIMIT}")
            chat_id = latest_chat(chats, directory)
            if chat_id is None:
                async with self.http.post(
                    base + "/session",
                    json={"title": PLACEHOLDER},
                    headers={"Authorization": auth},
                    timeout=self.timeout,
                ) as r:
                    if r.status != 200:
                        err = f"OpenCode answered {r.status} to POST /session"
                        raise LovdError("unavailable", err)
                    chat_id = _field(await r.json(), "id", str)
                log.info("created the first chat of the session", extra={"SESSION_ID": sid})
            return chat_path(directory, chat_id)

    async def location(self, sid: str, port: int) -> str | None:
        """:meth:`chat_for`, or None (logged) when the container cannot tell."""
        try:
            return await self.chat_for(sid, port)
        except (LovdError, aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.warning("cannot find the chat to land in: %s", e, extra={"SESSION_ID": sid})
            return None
