"""lovd's public app on ``caddy.auth_socket``: everything Caddy may send to lovd.

Caddy routes ``/`` (visitors without a session cookie), ``/c/{id}`` and ``/_lovd/*``
here, sends forward_auth subrequests to ``/_lovd/auth`` (web/gate.py) and, as the
upstream the gate names for them, the chat requests whose body lovd checks
(web/bodycheck.py). It is a separate socket from the API so that Caddy (and so the
internet) can reach only this surface, never the operator API.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from lovd import ids
from lovd.caddy import AUTH_PATH
from lovd.errors import LovdError
from lovd.session.lifecycle import Sessions
from lovd.sync import routing
from lovd.web.gate import BrowserGate, wants_html
from lovd.web.pages import STARTING, language
from lovd.web.ratelimit import client_address
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
            return web.Response(status=303, headers={"Location": "/", "Cache-Control": "no-store"})
        addr = client_address(request)
        lang = language(request)
        retry = self.gate.starts.retry_after(addr)
        if retry is not None:
            wait = self.pages.human(retry, lang)
            msg = text(lang, "too_many_starts", limit=self.gate.starts.limit, wait=wait)
            return self.pages.render(self.pages.landing_page(msg, 429, retry, lang))
        self.gate.starts.hit(addr)
        try:
            s, token = await self.gate.sessions.create(wait=False)
        except LovdError as e:
            log.info("browser session start refused for %s: %s", addr, e.message)
            msg = self.pages.refusal_text(e, lang)
            return self.pages.render(self.pages.landing_page(msg, e.status, e.retry_after, lang))
        log.info("session started from the browser by %s", addr, extra={"SESSION_ID": s.id})
        # A claimed warm container already has its first chat: go straight there.
        where = self.gate.prep.first_chat(s.id) or "/"
        resp = web.Response(status=303, headers={"Location": where, "Cache-Control": "no-store"})
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
        if s.status == "running":
            return _status_json(200, True, text(lang, "status_ready"))
        err = self.gate.wake_errors.get(s.id)
        if err is not None and not self.gate.waking(s.id):
            msg = self.pages.refusal_text(err, lang)
            return _status_json(200, False, msg, err.retry_after, error=True)
        msg = text(lang, "status_starting" if s.status in STARTING else "status_waking")
        return _status_json(200, False, msg)

    async def entry(self, request: web.Request) -> web.StreamResponse:
        """``/c/{id}?token=…``: trade the one-time link for a session cookie, then go to ``/``."""
        self.gate.on_request()
        addr = client_address(request)
        token = request.query.get("token", "")
        upstream = await self.gate.elsewhere(request.match_info["id"])
        if upstream:
            return await routing.forward_entry(upstream, request)
        try:
            sid = request.match_info["id"]
            s = self.gate.authenticate(addr, lambda: self.gate.verify_token(ids.check(sid), token))
        except LovdError as e:
            return self.gate.refuse(request, e, wants_html(request))
        resp = web.Response(status=303, headers={"Location": "/", "Cache-Control": "no-store"})
        self.gate.set_cookie(request, resp, s, token)
        return resp

    async def ping(self, request: web.Request) -> web.Response:
        return web.Response(text="lovd\n", headers={"Cache-Control": "no-store"})

    async def not_found(self, request: web.Request) -> web.Response:
        err = LovdError("not-found", f"there is nothing at {request.path}")
        return self.gate.refuse(request, err, wants_html(request))

    async def static_file(self, request: web.Request) -> web.Response:
        return await self.pages.static_file(request)


def _same_origin(request: web.Request) -> bool:
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser form post (curl); cookies are SameSite=Lax anyway
    host = request.headers.get("X-Forwarded-Host") or request.host
    return urlsplit(origin).netloc == host

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


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return web.Response(status=500, text="internal error; see lovd's log\n")


def create_public_app(gate: BrowserGate) -> web.Application:
    """The app on ``caddy.auth_socket``: everything Caddy may send to lovd, nothing more."""
    site = PublicSite(gate)
    app = web.Application(middlewares=[_errors], client_max_size=4096)
    r = app.router
    r.add_get(AUTH_PATH, gate.auth)
    # Reached only as the upstream the gate names for them (see BrowserGate.allow).
    r.add_post("/session", gate.checked_chat)
    r.add_post("/session/{oc}/prompt_async", gate.checked_chat)
    r.add_get("/", site.landing)
    r.add_get("/_lovd/", site.landing)
    r.add_post("/_lovd/start", site.start)
    r.add_get("/_lovd/status", site.status)
    r.add_get("/_lovd/ping", site.ping)
    r.add_get("/_lovd/static/{name}", site.static_file)
    r.add_get("/c/{id}", site.entry)
    r.add_route("*", "/{tail:.*}", site.not_found)
    app.on_shutdown.append(lambda _app: gate.drain())
    return app


def add_browser_entry(app: web.Application, sessions: Sessions) -> None:
    """Register ``GET /c/{id}`` on another app (the API socket), sharing the same logic."""
    site = PublicSite(BrowserGate.from_config(sessions.config, sessions))
    app.router.add_get("/c/{id}", site.entry)


async def serve_public(
    gate: BrowserGate, sock: socket.socket, *, ours: bool = True
) -> web.AppRunner:
    """Serve the public app on ``sock`` (``caddy.auth_socket``).

    A socket lovd bound itself (``ours``) is made world-connectable (0666): it offers
    exactly what the public site offers anyway, and Caddy runs as its own user. One passed
    by systemd (lovd-auth.socket) keeps the unit's SocketMode/SocketGroup. The admin API
    stays on its own socket.
    """
    name = sock.getsockname()
    if ours and isinstance(name, str) and name:
        os.chmod(name, 0o666)  # noqa: S103 - the public surface, see above
    if isinstance(name, str) and name.startswith("/"):
        gate.self_upstream = f"unix/{name}"  # Caddy's dial syntax: unix//path
    runner = web.AppRunner(
        create_public_app(gate), access_log=None, handle_signals=False, shutdown_timeout=2
    )
    await runner.setup()
    await web.SockSite(runner, sock).start()
    log.info("browser path (forward_auth, landing page) on %s", name)
    return runner
