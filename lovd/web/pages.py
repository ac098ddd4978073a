"""lovd's own pages on the browser path: landing, progress, refusals, static assets.

Rendered from one template (static/page.html) with a strict Content-Security-Policy;
every text a person reads is here.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from string import Template

from aiohttp import web

from lovd.errors import CODES, LovdError
from lovd.session.model import Session

STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".html": "text/html"}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STARTING = ("creating", "starting")


def human_seconds(seconds: int) -> str:
    if seconds < 90:
        return f"{seconds} s"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{math.ceil(minutes / 60)} h"


def static_files() -> dict[str, bytes]:
    base = resources.files("lovd.web").joinpath("static")
    return {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}


@dataclass
class Page:
    status: int
    title: str
    main: str
    head: str = ""
    retry_after: int | None = None


def start_form(label: str) -> str:
    return (
        '<form method="post" action="/_lovd/start">'
        f'<button type="submit">{html.escape(label)}</button></form>'
    )


class Pages:
    """Renders the pages. ``running`` and ``retry_after`` say how full the host is."""

    def __init__(
        self,
        *,
        max_running: int,
        running: Callable[[], int],
        retry_after: Callable[[], int],
    ) -> None:
        self.max_running = max_running
        self.running = running
        self.retry_after = retry_after
        self.static = static_files()
        self._template = Template(self.static["page.html"].decode())

    def render(self, page: Page) -> web.Response:
        body = self._template.substitute(
            title=html.escape(page.title), main=page.main, head=page.head
        )
        resp = web.Response(status=page.status, text=body, content_type="text/html")
        resp.headers.update(PAGE_HEADERS)
        if page.retry_after is not None:
            resp.headers["Retry-After"] = str(page.retry_after)
        return resp

    def refusal_text(self, err: LovdError) -> str:
        if err.code == "too-many-sessions" and err.retry_after is not None:
            limit = err.extra.get("limit", self.max_running)
            places = "The only place is" if limit == 1 else f"All {limit} places are"
            return f"{places} in use — try again in {human_seconds(err.retry_after)}."
        msg = err.message
        return msg[:1].upper() + msg[1:] + ("" if msg.endswith(".") else ".")

    def refusal_page(self, err: LovdError) -> Page:
        text = html.escape(self.refusal_text(err))
        retry = ""
        if err.retry_after is not None and err.retry_after <= 120:
            retry = f'<noscript><meta http-equiv="refresh" content="{err.retry_after}"></noscript>'
        main = (
            f"<h1>{html.escape(CODES[err.code][1])}</h1>"
            f'<p class="notice" role="alert">{text}</p>' + start_form("Start a new session")
        )
        return Page(err.status, CODES[err.code][1], main, head=retry, retry_after=err.retry_after)

    def progress_page(self, s: Session) -> Page:
        waking = s.status not in STARTING
        title = "Waking up your session" if waking else "Starting your session"
        what = (
            "Your session was paused after a while without activity. It is starting again "
            "with everything you had; this takes a few seconds."
            if waking
            else "Your private research assistant is being prepared; this takes a few seconds."
        )
        main = (
            f"<h1>{title}…</h1><p>{what}</p>"
            '<progress id="progress-bar" max="100" aria-label="Progress"></progress>'
            '<p id="progress-status" role="status" aria-live="polite">Please wait…</p>'
            '<p class="muted">This page continues on its own when the session is ready.</p>'
        )
        head = (
            '<noscript><meta http-equiv="refresh" content="2"></noscript>'
            '<script src="/_lovd/static/progress.js" defer></script>'
        )
        return Page(503, title, main, head=head, retry_after=2)

    def landing_page(
        self, message: str = "", status: int = 200, retry_after: int | None = None
    ) -> Page:
        limit = self.max_running
        used = self.running()
        if not message and used >= limit:
            # Say how long the wait really is (the soonest place to free up), and let
            # Retry-After say the same.
            retry_after = self.retry_after()
            places = "The only place is" if limit == 1 else f"All {limit} places are"
            message = (
                f"{places} in use right now — one should free up within "
                f"{human_seconds(retry_after)}; start your session then."
            )
        notice = f'<p class="notice" role="alert">{html.escape(message)}</p>' if message else ""
        main = (
            "<h1>Research Norwegian law with an AI assistant</h1>"
            "<p>Ask questions about Norwegian laws and regulations in plain language. "
            "The assistant searches Lovdata and answers with exact references to "
            "the provisions (for example <em>arbeidsmiljøloven § 15-7</em>), "
            "linked to lovdata.no.</p>"
            f"{notice}"
            + start_form("Start a new session")
            + f'<p class="muted">{used} of {limit} places are in use right now. '
            "Your session is private to this browser.</p>"
        )
        return Page(status, "Start", main, retry_after=retry_after)

    async def static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        data = self.static.get(name)
        suffix = "." + name.rsplit(".", 1)[-1]
        if data is None or suffix not in STATIC_TYPES or name == "page.html":
            raise web.HTTPNotFound()
        return web.Response(
            body=data,
            content_type=STATIC_TYPES[suffix],
            headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    def route_refused_page(self, what: str, why: str) -> Page:
        main = (
            "<h1>Not available here</h1>"
            f'<p class="notice" role="alert">{html.escape(what)}: {html.escape(why)}.</p>'
            '<p><a href="/">Back to your session</a></p>'
        )
        return Page(403, "Not available here", main)
