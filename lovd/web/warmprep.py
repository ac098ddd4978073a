"""What lovd does with a warm-pool container before anyone claims it (issue 17).

A person's click on "start" should cost only the start itself. So while a warm
container waits (session/warm.py calls :meth:`WarmPrep.ready`):

- its first chat is made in ``/work`` (web/chat_landing.py), and ``POST /_lovd/start``
  that claims it redirects straight to that chat instead of to ``/`` and a lookup in
  the container (web/public.py);
- its OpenCode version is read (``GET /global/health``) and, the first time lovd sees
  that version, the UI's static files are stored for Caddy (web/assets.py); the landing
  page then tells the browser to fetch and compile the UI's entry files ahead of the
  click (:meth:`WarmPrep.prefetch_html`) and carries the UI's shell
  (static/instant.js): the click then claims the container with a ``fetch`` and runs
  the already compiled UI in the same document, with no new page to load (issue 17).

All of it is memory only: after a lovd restart a claim falls back to ``/`` and the
lookup, as before, and the UI files stay on disk.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
from collections.abc import Callable

import aiohttp

from lovd.session.model import Session
from lovd.web.assets import VERSION, UiAssets
from lovd.web.chat_landing import ChatLanding

log = logging.getLogger(__name__)

HEALTH_TIMEOUT = 3.0
MAX_REMEMBERED = 4096
# OpenCode's UI loads its texts for the browser's language as two lazy chunks named after
# its locale code (``/assets/no-<hash>.js`` for Norwegian); the landing page's language
# says which the chat will load.
UI_LOCALE = {"nb": "no"}
_HASH = r"-[A-Za-z0-9_-]{8}"
# The UI's own icon (its page names it; without one the browser asks for /favicon.ico).
_ICON = re.compile(r"/favicon[A-Za-z0-9_.-]*\.svg")
# What OpenCode 1.18.33's UI reads first when it opens a chat in /work (the browser
# bench's trace, tests/bench/bench_browser.py --trace), all GETs; {chat} is the chat made
# for the container.
_IN_WORK = "directory=%2Fwork"
FIRST_READS = (
    "/global/config",
    "/provider",
    f"/provider?{_IN_WORK}",
    f"/path?{_IN_WORK}",
    f"/config?{_IN_WORK}",
    f"/agent?{_IN_WORK}",
    f"/command?{_IN_WORK}",
    f"/mcp?{_IN_WORK}",
    f"/lsp?{_IN_WORK}",
    f"/vcs?{_IN_WORK}",
    f"/project/current?{_IN_WORK}",
    f"/experimental/resource?{_IN_WORK}",
    f"/api/reference?{_IN_WORK}&location%5Bdirectory%5D=%2Fwork",
    f"/session?{_IN_WORK}&roots=true&limit=55",
    "/session/{chat}",
    "/session/{chat}/message?limit=20",
)
READ_TIMEOUT = 5.0


class WarmPrep:
    def __init__(
        self,
        *,
        http: aiohttp.ClientSession,
        password_header: Callable[[str], str],
        landing: ChatLanding,
        assets: UiAssets | None,
        alive: Callable[[str], bool],
    ) -> None:
        self.http = http
        self.password_header = password_header
        self.landing = landing
        self.assets = assets
        self.alive = alive
        self._first: dict[str, str] = {}
        self._versions: dict[str, str] = {}
        self.next_version = ""

    async def ready(self, s: Session) -> None:
        """A warm container answers: learn its version, store its UI, make its chat."""
        base = f"http://127.0.0.1:{s.port}"
        auth = self.password_header(s.id)
        version = await self._version(base, auth)
        if version:
            self._remember(self._versions, s.id, version)
            self.next_version = version
            if self.assets is not None:
                task = self.assets.ensure(version, base, auth)
                if task is not None:
                    task.add_done_callback(lambda _t: self._prune())
        where = await self.landing.location(s.id, s.port)
        if where is not None:
            await self._first_reads(base, auth, where.rpartition("/")[2])
            self._remember(self._first, s.id, where)

    async def _first_reads(self, base: str, auth: str, chat: str) -> None:
        """Ask the container what the UI asks first (FIRST_READS), so OpenCode's lazy
        set-up of the chat's folder (its config, providers, agents, MCP tools: ~0.5 s of
        CPU on a fresh container) happens before the claim, not in the person's first
        second. Read-only, with the container's password on the host's loopback (never
        through the gate); a failure only means the UI pays that time itself."""

        async def read(path: str) -> None:
            try:
                async with self.http.get(
                    base + path.replace("{chat}", chat),
                    headers={"Authorization": auth},
                    timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT),
                ) as r:
                    await r.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                log.info("warm read of %s failed: %r", path, e)

        await asyncio.gather(*(read(p) for p in FIRST_READS))

    def first_chat(self, sid: str) -> str | None:
        """The chat made for this (just claimed) warm container, if lovd made one."""
        return self._first.pop(sid, None)

    def version_of(self, sid: str) -> str:
        """The OpenCode version a (warm or claimed) container runs; "" if unknown."""
        return self._versions.get(sid, "")

    def prefetch_html(self, lang: str = "", runs_ui: bool = False) -> str:
        """``<link>`` tags for the UI the next session will run (none until stored);
        with ``runs_ui`` (the landing page), also the script that starts a session without
        a new page (static/instant.js) and what it needs to know: the UI's version, entry
        script and styles."""
        if self.assets is None:
            return ""
        version = self.next_version or next(iter(self.assets.versions()), "")
        ui = self.assets.get(version) if version else None
        if ui is None or not ui.scripts:
            return ""
        e = html.escape
        locale = UI_LOCALE.get(lang, "")
        chunks = [
            f
            for f in ui.files
            if locale and re.fullmatch(rf"/assets/{re.escape(locale)}{_HASH}\.js", f)
        ]
        # The UI loads its scripts as CORS modules and its styles and fonts in CORS mode:
        # the same modes here, or the browser's cache would not match. modulepreload
        # also compiles the module into this page's module map, where instant.js runs it.
        tags = [f'<link rel="modulepreload" href="{e(p)}">' for p in ui.scripts + chunks]
        # A stylesheet that applies to no medium is loaded and parsed but changes nothing
        # on this page; instant.js switches it on when the UI takes the page over.
        tags += [
            f'<link rel="stylesheet" href="{e(p)}" media="not all" crossorigin data-ui>'
            for p in ui.styles
        ]
        tags += [f'<link rel="prefetch" as="font" href="{e(p)}" crossorigin>' for p in ui.fonts]
        if runs_ui:
            icon = next((f for f in ui.files if _ICON.fullmatch(f)), "")
            tags.append(
                '<script src="/_lovd/static/instant.js" defer '
                f'data-version="{e(ui.version)}" data-entry="{e(ui.scripts[0])}" '
                f'data-icon="{e(icon)}"'
                + (' data-route="server"' if ui.server_route else "")
                + "></script>"
            )
        return "".join(tags)

    async def _version(self, base: str, auth: str) -> str:
        try:
            async with self.http.get(
                base + "/global/health",
                headers={"Authorization": auth},
                timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT),
            ) as r:
                body = await r.json() if r.status == 200 else {}
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.info("cannot read the warm container's OpenCode version: %r", e)
            return ""
        version = body.get("version") if isinstance(body, dict) else None
        return version if isinstance(version, str) and VERSION.fullmatch(version) else ""

    def _prune(self) -> None:
        """Keep the UI files of every version a live container runs (and the newest)."""
        if self.assets is None:
            return
        for sid in [sid for sid in self._versions if not self.alive(sid)]:
            del self._versions[sid]
        live = set(self._versions.values()) | {self.next_version}
        try:
            self.assets.prune(live)
        except OSError as e:
            log.warning("could not prune old UI files: %r", e)

    @staticmethod
    def _remember(d: dict[str, str], key: str, value: str) -> None:
        if len(d) >= MAX_REMEMBERED:
            d.pop(next(iter(d)))
        d[key] = value
