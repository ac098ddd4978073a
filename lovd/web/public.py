"""lovd's public app on ``caddy.auth_socket``: everything Caddy may send to lovd.

Caddy routes ``/`` (visitors without a session cookie), ``/c/{id}`` (the session
link, single-use: session/links.py) and ``/_lovd/*`` here, sends forward_auth
subrequests to ``/_lovd/auth`` (web/gate.py) and, as the upstream the gate names for
them, the chat requests whose body lovd checks (web/bodycheck.py). It is a separate
socket from the API so that Caddy (and so the internet) can reach only this surface,
never the operator API.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from lovd import ids
from lovd.caddy import AUTH_PATH
from lovd.errors import LovdError
from lovd.session.links import NEW_LINK, LinkState, link_state
from lovd.session.model import Session, SessionState
from lovd.sync import routing
from lovd.web import problems
from lovd.web.commands import SlashCommands
from lovd.web.gate import BrowserGate
from lovd.web.pages import language
from lovd.web.problems import is_navigation
from lovd.web.ratelimit import client_address, client_key
from lovd.web.texts import text

log = logging.getLogger(__name__)


class PublicSite:
    """The landing page, session start, progress polling and the session link."""

    def __init__(self, gate: BrowserGate) -> None:
        self.gate = gate
        self.pages = gate.pages

    async def landing(self, request: web.Request) -> web.Response:
        self.gate.on_request()
        return self.pages.render(self.pages.landing_page(lang=language(request)))

    async def start(self, request: web.Request) -> web.Response:
        self.gate.on_request()
        if not _same_origin(request):
            err = LovdError("forbidden", "sessions can only be started from this site's own page")
            return self.gate.refuse(request, err, True)
        if self._has_live_session(request):
            return _started(request, "/")
        addr = client_address(request)
        lang = language(request)
        retry = self.gate.starts.retry_after(addr)
        if retry is not None:
            wait = self.pages.human(retry, lang)
            msg = text(lang, "too_many_starts", limit=self.gate.starts.limit, wait=wait)
            return self.pages.render(self.pages.landing_page(msg, 429, retry, lang))
        self.gate.starts.hit(addr)
        try:
            s, token = await self.gate.sessions.create(wait=False, client=client_key(addr))
        except LovdError as e:
            log.info("browser session start refused for %s: %s", addr, e.message)
            msg = self.pages.refusal_text(e, lang)
            return self.pages.render(self.pages.landing_page(msg, e.status, e.retry_after, lang))
        log.info("session started from the browser by %s", addr, extra={"SESSION_ID": s.id})
        # A claimed warm container already has its first chat: go straight there.
        where = self.gate.prep.first_chat(s.id) or "/"
        resp = _started(request, where, self.gate.prep.version_of(s.id))
        self.gate.set_cookie(request, resp, s, token)
        return resp

    def _has_live_session(self, request: web.Request) -> bool:
        value = self.gate.cookie_value(request)
        if value is None:
            return False
        try:
            self.gate.verify(value)  # stopped and failed sessions wake: they are live
            return True
        except LovdError:
            return False

    async def status(self, request: web.Request) -> web.Response:
        """Polled by the progress page: where is my session?"""
        self.gate.on_request()
        value = self.gate.cookie_value(request)
        addr = client_address(request)
        lang = language(request)
        try:
            if value is None:
                raise LovdError(
                    "unauthorized", "you have no session here; start one on the front page"
                )
            s = self.gate.authenticate(addr, functools.partial(self.gate.verify, value))
        except LovdError as e:
            msg = self.pages.refusal_text(e, lang)
            return _status_json(e.status, False, msg, e.retry_after, error=True)
        if s.serving:
            return _status_json(200, True, text(lang, "status_ready"))
        err = self.gate.sessions.wake_error(s.id)
        if err is not None:
            msg = self.pages.refusal_text(err, lang)
            return _status_json(200, False, msg, err.retry_after, error=True)
        msg = text(lang, "status_starting" if s.starting_up else "status_waking")
        return _status_json(200, False, msg)

    async def entry(self, request: web.Request) -> web.StreamResponse:
        """``GET /c/{id}?token=…``: trade the single-use link for a fresh session cookie,
        then go to ``/``. A browser that already holds another live session is never
        switched here: it gets a page that names both and asks (:meth:`switch`)."""
        self.gate.on_request()
        sid = request.match_info["id"]
        token = request.query.get("token", "")
        current = await self._current(request)
        upstream = await self.gate.elsewhere(sid)
        if upstream:
            if current is not None and current != sid:
                return self._ask_to_switch(request, sid, token, current)
            # Without the browser's cookie: the owner exchanges the link.
            return await routing.forward_entry(upstream, request)
        try:
            s = self._checked_link(request, sid, token)
        except LovdError as e:
            return self.gate.refuse(request, e, is_navigation(request))
        if current == sid:
            # This browser is in that session already: the link is spent, nothing changes.
            if link_state(s, token) is LinkState.VALID:
                with contextlib.suppress(LookupError):
                    await self.gate.sessions.redeem_link(sid, token, rotate=False)
            return _to_front()
        if link_state(s, token) is LinkState.USED:
            return self.gate.refuse(request, link_used(), is_navigation(request))
        if current is not None:
            return self._ask_to_switch(request, sid, token, current)
        return await self._exchange(request, sid, token)

    async def switch(self, request: web.Request) -> web.StreamResponse:
        """``POST /c/{id}`` from the "switch session?" page: only same-origin, and only
        with the page's form token, which is bound to this browser's cookie."""
        self.gate.on_request()
        sid = request.match_info["id"]
        try:
            ids.check(sid)
        except LovdError as e:
            return self.gate.refuse(request, e, True)
        if not _same_origin(request, strict=True):
            err = LovdError("forbidden", "sessions can only be switched from this site's own page")
            log.info("cross-site session switch refused for %s", client_address(request))
            return self.gate.refuse(request, err, True)
        if request.content_type != "application/x-www-form-urlencoded":
            # The page's form sends exactly this; anything else is not that form (and a
            # multipart body without a boundary would not even parse).
            err = LovdError("bad-request", "the switch is a form post from this site's page")
            return self.gate.refuse(request, err, True)
        form = await request.post()
        token, proof = str(form.get("token", "")), str(form.get("switch", ""))
        cookie = self.gate.cookie_value(request) or ""
        if not ids.is_valid(sid) or not self.gate.switch_token_ok(sid, token, cookie, proof):
            err = LovdError(
                "forbidden",
                "this switch form is not valid (too old, or from another page); open the "
                "link again",
            )
            return self.gate.refuse(request, err, True)
        upstream = await self.gate.elsewhere(sid)
        if upstream:
            where = f"/c/{sid}?{urlencode({'token': token})}"
            return await routing.forward_entry(upstream, request, path_qs=where)
        try:
            s = self._checked_link(request, sid, token)
        except LovdError as e:
            return self.gate.refuse(request, e, True)
        if link_state(s, token) is LinkState.USED:
            return self.gate.refuse(request, link_used(), True)
        return await self._exchange(request, sid, token)

    async def _current(self, request: web.Request) -> str | None:
        """The live session this browser holds, by id: verified here, or (with browser
        routing) one another host owns, which only that host could verify: treated as
        live, so that a link never replaces it unasked."""
        s = self.gate.live_session(request)
        if s is not None:
            return s.id
        held = (self.gate.cookie_value(request) or "").partition(".")[0]
        if held and await self.gate.elsewhere(held):
            return held
        return None

    def _checked_link(self, request: web.Request, sid: str, token: str) -> Session:
        """The link's session, under the failure limit (a wrong token is a guess; a used
        one is not: it matched)."""
        addr = client_address(request)
        return self.gate.authenticate(addr, lambda: self._check_link(ids.check(sid), token))

    def _check_link(self, sid: str, token: str) -> Session:
        s = self.gate.sessions.find(sid)
        if s is None or not s.token_hash:  # no row, or an unclaimed warm container
            link_state(_unknown(sid), token)  # same work either way
            raise LovdError("unauthorized", "this session does not exist (any more)")
        if link_state(s, token) is LinkState.WRONG:
            raise LovdError("unauthorized", "this session link is not valid (wrong or old token)")
        if s.expires_at <= self.gate.sessions.now():
            raise LovdError("forbidden", "this session has expired; start a new one")
        return s

    def _ask_to_switch(
        self, request: web.Request, sid: str, token: str, current: str
    ) -> web.Response:
        lang = language(request)
        try:
            ids.check(sid)
        except LovdError as e:
            return self.gate.refuse(request, e, True)
        cookie = self.gate.cookie_value(request) or ""
        proof = self.gate.switch_token(sid, token, cookie, int(time.time()))
        held = self.gate.sessions.find(current)
        started = held.created_at if held is not None else None
        page = self.pages.switch_page(current, started, sid, token, proof, lang)
        return self.pages.render(page)

    async def _exchange(self, request: web.Request, sid: str, token: str) -> web.Response:
        """Use the link up and give the browser the session's fresh cookie."""
        addr = client_address(request)
        try:
            s, secret = await self.gate.sessions.redeem_link(sid, token)
        except LookupError:  # another browser used it in between
            return self.gate.refuse(request, link_used(), is_navigation(request))
        log.info("session link used by %s", addr, extra={"SESSION_ID": s.id})
        resp = _to_front()
        self.gate.set_cookie(request, resp, s, secret)
        return resp

    async def ping(self, request: web.Request) -> web.Response:
        return web.Response(text="lovd\n", headers={"Cache-Control": "no-store"})

    async def not_found(self, request: web.Request) -> web.Response:
        err = LovdError("not-found", f"there is nothing at {request.path}")
        return self.gate.refuse(request, err, is_navigation(request))

    async def static_file(self, request: web.Request) -> web.Response:
        return await self.pages.static_file(request)


def _same_origin(request: web.Request, *, strict: bool = False) -> bool:
    """Whether a POST comes from this site's own page. ``strict`` (switching sessions):
    only ``same-origin``, not ``none`` (a typed or bookmarked request never POSTs)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site == "same-origin" or (site == "none" and not strict)
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser form post (curl); cookies are SameSite=Lax anyway
    host = request.headers.get("X-Forwarded-Host") or request.host
    return urlsplit(origin).netloc == host


def _started(request: web.Request, where: str, version: str = "") -> web.Response:
    """Where the browser goes now: a 303 for the landing page's form; for its script
    (static/instant.js, a same-origin fetch asking for JSON) the same place as JSON, with
    the UI version the session runs, so that the script can run the UI in place."""
    headers = {"Cache-Control": "no-store"}
    if "application/json" in request.headers.get("Accept", ""):
        body = {"location": where, "ui_version": version}
        return web.json_response(body, headers=headers)
    return web.Response(status=303, headers={"Location": where, **headers})


def link_used() -> LovdError:
    return LovdError(
        "link-used",
        "this session link was already used (a link works once); if you used it in this "
        f"browser, go to the front page; otherwise {NEW_LINK}",
    )


def _unknown(sid: str) -> Session:
    """A stand-in row for a session this host does not hold (never stored)."""
    return Session(sid, SessionState.DELETED, "", "", 0, "", "", 0.0, 0.0, 0.0, 0.0)


def _to_front() -> web.Response:
    return web.Response(status=303, headers={"Location": "/", "Cache-Control": "no-store"})


def _status_json(
    status: int,
    ready: bool,
    message: str,
    retry_after: int | None = None,
    *,
    error: bool = False,
) -> web.Response:
    body = {"ready": ready, "message": message, "retry_after": retry_after, "error": error}
    return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _reconciled(gate: BrowserGate) -> Middleware:
    """Browser requests about a session wait for lovd's start-up reconcile (bounded, then
    503 with Retry-After): until then a stored "running" may name a container that is gone."""

    @web.middleware
    async def wait(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _NO_SESSION and not request.path.startswith("/_lovd/static/"):
            try:
                await gate.sessions.wait_ready()
            except LovdError as e:
                return problems.render(request, e, gate.pages.error)
        return await handler(request)

    return wait


_NO_SESSION = frozenset({"/", "/_lovd/", "/_lovd/ping"})


def create_public_app(gate: BrowserGate) -> web.Application:
    """The app on ``caddy.auth_socket``: everything Caddy may send to lovd, nothing more."""
    site = PublicSite(gate)
    # Every failure (a LovdError, aiohttp's own 404/405/413, an unexpected exception) is
    # the page or problem+json of web/problems.py: never aiohttp's text/plain.
    errors = problems.middleware(gate.pages.error)
    app = web.Application(middlewares=[errors, _reconciled(gate)], client_max_size=4096)
    r = app.router
    r.add_get(AUTH_PATH, gate.auth)
    # Reached only as the upstream the gate names for them (see BrowserGate.allow).
    r.add_post("/session", gate.checked_chat)
    r.add_post("/session/{oc}/prompt_async", gate.checked_chat)
    for action in ("revert", "unrevert", "summarize", "fork"):  # the UI's "/" commands
        r.add_post(f"/session/{{oc}}/{action}", gate.checked_chat)
    r.add_get("/command", SlashCommands(session_of=gate.bodycheck.session_of).handle)
    r.add_get("/", site.landing)
    r.add_get("/_lovd/", site.landing)
    r.add_post("/_lovd/start", site.start)
    r.add_get("/_lovd/status", site.status)
    r.add_get("/_lovd/ping", site.ping)
    r.add_get("/_lovd/static/{name}", site.static_file)
    r.add_get("/c/{id}", site.entry)
    r.add_post("/c/{id}", site.switch)
    r.add_route("*", "/{tail:.*}", site.not_found)
    app.on_shutdown.append(lambda _app: gate.drain())
    return app


def add_browser_entry(app: web.Application, gate: BrowserGate) -> None:
    """Register ``GET /c/{id}`` on another app (the API socket), with the same gate."""
    site = PublicSite(gate)
    app.router.add_get("/c/{id}", site.entry)
    app.router.add_post("/c/{id}", site.switch)


async def serve_public(
    app: web.Application, sock: socket.socket, *, ours: bool = True
) -> web.AppRunner:
    """Serve the public app (:func:`create_public_app`) on ``sock`` (``caddy.auth_socket``).

    A socket lovd bound itself (``ours``) is made world-connectable (0666): it offers
    exactly what the public site offers anyway, and Caddy runs as its own user. One passed
    by systemd (lovd-auth.socket) keeps the unit's SocketMode/SocketGroup. The admin API
    stays on its own socket.
    """
    name = sock.getsockname()
    if ours and isinstance(name, str) and name:
        os.chmod(name, 0o666)  # noqa: S103 - the public surface, see above
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    log.info("browser path (forward_auth, landing page) on %s", name)
    return runner
