"""lovd's own pages on the browser path: landing, progress, refusals, static assets.

Rendered from one template (static/page.html) with a strict Content-Security-Policy, in
the language the browser prefers (texts.py holds every text a person reads: Norwegian
bokmål by default, English). Accessibility: ``lang`` on <html>, a skip link, landmarks,
one <h1>, visible focus, a live region for progress, errors as ``role="alert"``.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from string import Template

from aiohttp import web

from lovd.errors import LovdError
from lovd.session.model import Session
from lovd.web import texts
from lovd.web.texts import DEFAULT, negotiate, text

STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".html": "text/html"}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    # The page's language follows Accept-Language: caches must keep them apart.
    "Vary": "Accept-Language",
}
# The landing page that carries OpenCode's UI (static/instant.js): after the click the
# UI runs in that same document, so the page's CSP must allow what the UI needs, and is
# the one OpenCode (1.18.33) sends with its own page, connect-src narrowed to this
# origin as Caddy narrows it there (lovd/caddy.py CONNECT_SRC), its inline theme script's
# hash left out (instant.js does that work) and lovd's own rules kept.
UI_PAGE_CSP = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: https: blob:; "
    "font-src 'self' data:; media-src 'self' data:; connect-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)


def human_seconds(seconds: int, lang: str = "en") -> str:
    """ "45 s", "3 min", "2 h" (English by default: lovd's own error details are English)."""
    return texts.human_seconds(seconds, lang)


def language(request: web.Request) -> str:
    """The language of the page for this request (texts.negotiate)."""
    return negotiate(request.headers.get("Accept-Language"))


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
    lang: str = DEFAULT
    # The landing page: its start button may run the UI in place (static/instant.js).
    runs_ui: bool = False


def start_form(label: str) -> str:
    return (
        '<form method="post" action="/_lovd/start">'
        f'<button type="submit">{html.escape(label)}</button></form>'
    )


def _e(s: str) -> str:
    return html.escape(s, quote=True)


class Pages:
    """Renders the pages. ``running`` and ``retry_after`` say how full the host is."""

    def __init__(
        self,
        *,
        max_running: int,
        running: Callable[[], int],
        retry_after: Callable[[], int],
        prefetch: Callable[[str, bool], str] | None = None,
    ) -> None:
        self.max_running = max_running
        self.running = running
        self.retry_after = retry_after
        self.static = static_files()
        # Extra <head> tags of a page with status 200 in a language: the UI bundle the
        # next session runs, fetched ahead of the click, and on the landing page (True)
        # the UI's shell (web/warmprep.py); "" when there is none.
        self.prefetch: Callable[[str, bool], str] = prefetch or (lambda lang, runs_ui: "")
        self._template = Template(self.static["page.html"].decode())

    def render(self, page: Page) -> web.Response:
        lang = page.lang
        extra = self.prefetch(lang, page.runs_ui) if page.status == 200 else ""
        lovdata = '<a href="https://lovdata.no/" rel="noopener noreferrer">lovdata.no</a>'
        body = self._template.substitute(
            lang=texts.HTML_LANG.get(lang, lang),
            title=_e(page.title),
            suffix=_e(text(lang, "title_suffix")),
            site=_e(text(lang, "site")),
            skip=_e(text(lang, "skip")),
            footer=_e(text(lang, "footer", lovdata="\0")).replace("\0", lovdata),
            main=page.main,
            head=page.head + extra,
        )
        resp = web.Response(status=page.status, text=body, content_type="text/html")
        resp.headers.update(PAGE_HEADERS)
        if page.runs_ui and "instant.js" in extra:
            resp.headers["Content-Security-Policy"] = UI_PAGE_CSP
        resp.headers["Content-Language"] = texts.HTML_LANG.get(lang, lang)
        if page.retry_after is not None:
            resp.headers["Retry-After"] = str(page.retry_after)
        return resp

    def error(self, err: LovdError, request: web.Request) -> web.Response:
        """The page of a refusal or failure, for a navigation (web/problems.py)."""
        return self.render(self.refusal_page(err, language(request)))

    @staticmethod
    def human(seconds: int, lang: str) -> str:
        return human_seconds(seconds, lang)

    def full_text(self, limit: int, wait: int, lang: str, *, refused: bool) -> str:
        key = ("refused_" if refused else "full_") + ("one" if limit == 1 else "all")
        return text(lang, key, limit=limit, wait=human_seconds(wait, lang))

    def refusal_text(self, err: LovdError, lang: str = DEFAULT) -> str:
        """What a person reads for a refusal: in English lovd's own detail (it says what
        to do), in other languages the text for the error's kind."""
        if err.code == "too-many-sessions" and "per_client" in err.extra:
            held = int(err.extra["per_client"])
            return text(lang, "per_client", n=held, wait=human_seconds(err.retry_after or 60, lang))
        if err.code == "too-many-sessions" and err.retry_after is not None:
            limit = int(err.extra.get("limit", self.max_running))
            return self.full_text(limit, err.retry_after, lang, refused=True)
        if lang == "en":
            msg = err.message
            return msg[:1].upper() + msg[1:] + ("" if msg.endswith(".") else ".")
        return self._translated(err, lang)

    def _translated(self, err: LovdError, lang: str) -> str:
        msg = err.message
        if err.code == "forbidden" and "expired" in msg:
            return text(lang, "text.expired")
        if err.code == "forbidden" and "started from this site" in msg:
            return text(lang, "text.foreign-start")
        if err.code == "forbidden" and "switched from this site" in msg:
            return text(lang, "text.foreign-switch")
        if err.code == "unavailable" and "nobody used it" in msg:
            return text(lang, "text.paused-unused")
        if err.code == "unavailable" and msg.startswith("this session failed ("):
            reason = msg[len("this session failed (") :].split(")", 1)[0]
            return text(lang, "text.failed", reason=reason)
        if err.code == "rate-limited":
            return text(lang, "text.rate-limited", wait=human_seconds(err.retry_after or 60, lang))
        if err.code == "not-found":
            return text(lang, "text.not-found", path=msg.rsplit(" ", 1)[-1])
        if err.code == "too-many-sessions":
            return text(lang, "text.too-many-sessions")
        return text(lang, f"text.{err.code}", detail=msg)

    def refusal_page(self, err: LovdError, lang: str = DEFAULT) -> Page:
        title = text(lang, f"error.{err.code}")
        retry = ""
        if err.retry_after is not None and err.retry_after <= 120:
            retry = f'<noscript><meta http-equiv="refresh" content="{err.retry_after}"></noscript>'
        main = (
            f"<h1>{_e(title)}</h1>"
            f'<p class="notice" role="alert">{_e(self.refusal_text(err, lang))}</p>'
            + start_form(text(lang, "start"))
        )
        return Page(err.status, title, main, head=retry, retry_after=err.retry_after, lang=lang)

    def switch_page(
        self,
        current: str,
        started: float | None,
        other: str,
        link: str,
        form_token: str,
        lang: str = DEFAULT,
    ) -> Page:
        """A browser already in session ``current`` opened a link to session ``other``: it
        is never switched silently (a planted link would read what the person writes
        next). The switch is a same-origin POST of this form (web/public.py)."""
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)) if started else "?"
        cur, oth = f"<code>{_e(current)}</code>", f"<code>{_e(other)}</code>"

        def say(key: str) -> str:
            filled = text(lang, key, current="\1", other="\2", started=when)
            return _e(filled).replace("\1", cur).replace("\2", oth)

        title = text(lang, "switch_title")
        main = (
            f"<h1>{_e(title)}</h1>"
            f"<p>{say('switch_current')}</p>"
            f"<p>{say('switch_other')}</p>"
            f'<p class="notice" role="alert">{say("switch_warning")}</p>'
            f'<p><a href="/">{say("switch_stay")}</a></p>'
            f'<form method="post" action="/c/{_e(other)}">'
            f'<input type="hidden" name="token" value="{_e(link)}">'
            f'<input type="hidden" name="switch" value="{_e(form_token)}">'
            f'<button type="submit">{_e(text(lang, "switch_button", other=other))}</button>'
            "</form>"
        )
        return Page(200, title, main, lang=lang)

    def progress_page(self, s: Session, lang: str = DEFAULT) -> Page:
        kind = "start" if s.starting_up else "wake"
        title = text(lang, f"progress_{kind}_title")
        # progress.js reads its texts from data-* attributes (the CSP allows no inline
        # script), so the live region speaks the page's language.
        say = {
            "ready": text(lang, "status_ready"),
            "retry": text(lang, "status_retry", seconds="{s}"),
            "not-yet": text(lang, "status_not_yet"),
            "error": text(lang, "status_error"),
            "default": text(lang, f"status_{'waking' if kind == 'wake' else 'starting'}"),
        }
        data = " ".join(f'data-{k}="{_e(v)}"' for k, v in say.items())
        label = _e(text(lang, "progress_label"))
        main = (
            f"<h1>{_e(title)}…</h1><p>{_e(text(lang, f'progress_{kind}_text'))}</p>"
            f'<progress id="progress-bar" max="100" aria-label="{label}"></progress>'
            f'<p id="progress-status" role="status" aria-live="polite" {data}>'
            f"{_e(text(lang, 'progress_wait'))}</p>"
            f'<p class="muted">{_e(text(lang, "progress_continues"))}</p>'
        )
        head = (
            '<noscript><meta http-equiv="refresh" content="2"></noscript>'
            '<script src="/_lovd/static/progress.js" defer></script>'
        )
        return Page(503, title, main, head=head, retry_after=2, lang=lang)

    def landing_page(
        self,
        message: str = "",
        status: int = 200,
        retry_after: int | None = None,
        lang: str = DEFAULT,
    ) -> Page:
        limit = self.max_running
        used = self.running()
        if not message and used >= limit:
            # Say how long the wait really is (the soonest place to free up), and let
            # Retry-After say the same.
            retry_after = self.retry_after()
            message = self.full_text(limit, retry_after, lang, refused=False)
        notice = f'<p class="notice" role="alert">{_e(message)}</p>' if message else ""
        example = f"<em>{_e(text(lang, 'landing_example'))}</em>"
        intro = _e(text(lang, "landing_intro", example="\0")).replace("\0", example)
        main = (
            f"<h1>{_e(text(lang, 'landing_h1'))}</h1>"
            f"<p>{intro}</p>"
            f"<p>{_e(text(lang, 'landing_advice'))}</p>"
            f"{notice}"
            + start_form(text(lang, "start"))
            + f'<p class="muted">{_e(text(lang, "landing_places", used=used, limit=limit))}</p>'
        )
        title = text(lang, "landing_title")
        return Page(status, title, main, retry_after=retry_after, lang=lang, runs_ui=True)

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

    def route_refused_page(
        self, what: str, why: str, lang: str = DEFAULT, *, websocket: bool = False
    ) -> Page:
        """403 for a route the chat does not need; ``why`` is the English detail."""
        if lang == "en":
            said = f"{what}: {why}."
        else:
            said = text(lang, "not_here_websocket" if websocket else "not_here_route", what=what)
        title = text(lang, "not_here_title")
        main = (
            f"<h1>{_e(title)}</h1>"
            f'<p class="notice" role="alert">{_e(said)}</p>'
            f'<p><a href="/">{_e(text(lang, "back"))}</a></p>'
        )
        return Page(403, title, main, lang=lang)
