"""The browser path: what Caddy asks lovd, on lovd's public socket (``caddy.auth_socket``).

Caddy sends every request that is not for lovd itself to ``GET /_lovd/auth``
(``forward_auth``, with the gate key in ``X-Lovd-Gate``; without it the answer is 404
and holds nothing). The answer decides everything:

- **403** for any request the chat UI does not need (web/allowlist.py: default deny,
  method + path; terminals, shell, files, config writes, WebSockets, …).
- **2xx**: the session cookie is valid and the container runs. The answer carries
  ``X-Lovd-Upstream: 127.0.0.1:<port>`` (derived from the cookie's session only, so a
  cookie of session A can never reach session B) and the container's own
  ``Authorization: Basic …`` (the browser never sees that password). Activity is
  recorded (``Sessions.touch``).
- **session not running** (starting, idle-stopped): a navigation gets a short
  "waking up" page (503 + Retry-After, refreshes itself); any other request (XHR,
  SSE, API) is *held* until the container is ready, then allowed. Never a 502.
- **anything else** is returned by Caddy to the browser as is: 401 (no/invalid
  cookie, deleted session), 403 (expired), 429 (too many failures from one client
  address; a valid cookie is never refused for other clients' failures), with an HTML
  page for navigations and problem+json otherwise.

The same socket serves the landing page at ``/`` (Caddy routes ``/`` there when the
request has no session cookie), ``POST /_lovd/start`` (rate-limited per client
address), ``/_lovd/status`` (polled by the progress page), static assets and the
``/c/{id}?token=…`` entry. It is a separate socket from the API so that Caddy (and
so the internet) can reach only this surface, never the operator API.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import html
import json
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from string import Template
from urllib.parse import urlsplit

from aiohttp import web

from lovd import ids
from lovd.caddy import AUTH_PATH, COOKIE_NAME, GATE_HEADER, UPSTREAM_HEADER, gate_key
from lovd.config import Config
from lovd.errors import CODES, LovdError
from lovd.sessions import Sessions
from lovd.store import Session
from lovd.web.allowlist import Allowlist, Decision
from lovd.web.bodycheck import BodyCheck

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
SECURE_COOKIE = "__Host-" + COOKIE_NAME
_STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".html": "text/html"}
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_STARTING = ("creating", "starting")


class RateLimiter:
    """Sliding-window counter per key (a client address): at most ``limit`` hits per
    ``window`` seconds. Memory is bounded: the oldest keys are dropped past ``max_keys``."""

    def __init__(
        self,
        limit: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10000,
    ) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self.max_keys = max_keys
        self._hits: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )

    def retry_after(self, key: str) -> int | None:
        """Seconds until ``key`` may try again, or None when it is under the limit."""
        q = self._hits.get(key)
        if q is None:
            return None
        cutoff = self.clock() - self.window
        while q and q[0] <= cutoff:
            q.popleft()
        if not q:
            del self._hits[key]
            return None
        if len(q) < self.limit:
            return None
        return max(1, math.ceil(q[0] - cutoff))

    def hit(self, key: str) -> None:
        q = self._hits.get(key)
        if q is None:
            q = self._hits[key] = collections.deque()
            while len(self._hits) > self.max_keys:
                self._hits.popitem(last=False)
        else:
            self._hits.move_to_end(key)
        q.append(self.clock())
        while len(q) > self.limit:
            q.popleft()


def client_address(request: web.Request) -> str:
    """The client as Caddy saw it. Caddy (2.5+) replaces a client-sent X-Forwarded-For
    unless trusted_proxies is configured, so the last entry is Caddy's own view."""
    xff = request.headers.get("X-Forwarded-For", "")
    if xff:
        return xff.rsplit(",", 1)[-1].strip()
    return request.remote or "local"


def _original_method(request: web.Request) -> str:
    return request.headers.get("X-Forwarded-Method", request.method).upper()


def _original_uri(request: web.Request) -> str:
    return request.headers.get("X-Forwarded-Uri", request.path_qs)


def _is_websocket(request: web.Request) -> bool:
    """Caddy's subrequest keeps the client's Upgrade header (a hop-by-hop header it
    restores for upgrade requests)."""
    return bool(request.headers.get("Upgrade"))


def is_navigation(request: web.Request) -> bool:
    """A top-level page load (show a page) rather than XHR/SSE/asset (hold or JSON)."""
    mode = request.headers.get("Sec-Fetch-Mode")
    if mode is not None:
        return mode == "navigate"
    accept = request.headers.get("Accept", "")
    return _original_method(request) == "GET" and "text/html" in accept


def human_seconds(seconds: int) -> str:
    if seconds < 90:
        return f"{seconds} s"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{math.ceil(minutes / 60)} h"


def _static_files() -> dict[str, bytes]:
    base = resources.files("lovd.web").joinpath("static")
    return {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}


@dataclass
class Page:
    status: int
    title: str
    main: str
    head: str = ""
    retry_after: int | None = None


class BrowserGate:
    """Auth, wake-on-request and the browser pages. Holds no global state."""

    def __init__(
        self,
        sessions: Sessions,
        *,
        failures: RateLimiter,
        starts: RateLimiter,
        hold_timeout: float,
        gate_key: str,
        allowlist: Allowlist | None = None,
        on_request: Callable[[], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.failures = failures
        self.starts = starts
        self.hold_timeout = hold_timeout
        self.gate_key = gate_key
        self.allowlist = allowlist or Allowlist()
        self.on_request = on_request or (lambda: None)
        self.static = _static_files()
        self._template = Template(self.static["page.html"].decode())
        self._wakes: dict[str, asyncio.Task[None]] = {}
        self._wake_errors: dict[str, LovdError] = {}
        # Caddy's dial address of this app's own socket (set by serve_public), for the
        # requests whose body lovd checks before they reach the container.
        self.self_upstream = ""
        self.bodycheck = BodyCheck(
            session_of=self._session_of,
            password_header=sessions.env.basic_auth,
            http=sessions.http,
        )

    @classmethod
    def from_config(
        cls,
        config: Config,
        sessions: Sessions,
        on_request: Callable[[], None] | None = None,
        allowlist: Allowlist | None = None,
    ) -> BrowserGate:
        return cls(
            sessions,
            failures=RateLimiter(config.browser_auth_failures, config.browser_auth_failure_window),
            starts=RateLimiter(config.browser_start_limit, config.browser_start_window),
            hold_timeout=config.ready_timeout + 5.0,
            gate_key=gate_key(sessions.env.host_key),
            allowlist=allowlist,
            on_request=on_request,
        )

    # --- credentials ---

    @staticmethod
    def cookie_value(request: web.Request) -> str | None:
        return request.cookies.get(SECURE_COOKIE) or request.cookies.get(COOKIE_NAME) or None

    def verify(self, value: str) -> Session:
        """The session a cookie value ``<id>.<token>`` belongs to, or LovdError."""
        sid, _, token = value.partition(".")
        if not ids.is_valid(sid) or not token:
            raise LovdError("unauthorized", "this session cookie is not valid")
        return self.verify_token(sid, token)

    def verify_token(self, sid: str, token: str) -> Session:
        s = self.sessions.store.get(sid)
        if s is None or not s.token_hash:  # no row, or an unclaimed warm container
            ids.token_matches(token, "0" * 64)  # same work either way
            raise LovdError("unauthorized", "this session does not exist (any more)")
        if not token or not ids.token_matches(token, s.token_hash):
            raise LovdError("unauthorized", "this session link is not valid (wrong or old token)")
        if s.expires_at <= self.sessions.clock():
            raise LovdError("forbidden", "this session has expired; start a new one")
        return s

    def authenticate(self, addr: str, check: Callable[[], Session]) -> Session:
        """Run ``check`` (a cookie or link verification) under the failure limit.

        Valid credentials always pass: many users share one address behind a NAT, and
        one of them guessing must not lock the others out. Invalid ones count against
        the address, and once it is over the limit they get 429 instead of the reason.
        """
        try:
            return check()
        except LovdError as e:
            retry = self.failures.retry_after(addr)
            if retry is not None:
                raise LovdError(
                    "rate-limited",
                    "too many failed attempts from your address; "
                    f"try again in {human_seconds(retry)}",
                    retry_after=retry,
                ) from e
            self.failures.hit(addr)
            log.info("browser auth refused for %s: %s", addr, e.message)
            raise

    def set_cookie(
        self, request: web.Request, resp: web.StreamResponse, s: Session, token: str
    ) -> None:
        secure = request.headers.get("X-Forwarded-Proto", request.scheme) == "https"
        resp.set_cookie(
            SECURE_COOKIE if secure else COOKIE_NAME,
            f"{s.id}.{token}",
            httponly=True,
            samesite="Lax",
            secure=secure,
            path="/",
            max_age=max(0, int(s.expires_at - self.sessions.clock())),
        )

    @staticmethod
    def clear_cookie(resp: web.StreamResponse) -> None:
        resp.del_cookie(COOKIE_NAME, path="/")
        resp.del_cookie(SECURE_COOKIE, path="/", secure=True)

    # --- forward_auth ---

    def _session_of(self, request: web.Request) -> Session:
        value = self.cookie_value(request)
        if value is None:
            raise LovdError("unauthorized", "you have no session here; start one on the front page")
        return self.verify(value)

    async def checked_chat(self, request: web.Request) -> web.StreamResponse:
        """A chat request the gate sent here (allowlist ``body``): check, then forward."""
        try:
            return await self.bodycheck.handle(request)
        except LovdError as e:
            return self.refuse(request, e, False)

    def from_caddy(self, request: web.Request) -> bool:
        """Whether the request carries the gate key only Caddy's forward_auth sends."""
        sent = request.headers.get(GATE_HEADER, "")
        return hmac.compare_digest(sent.encode(), self.gate_key.encode())

    async def auth(self, request: web.Request) -> web.StreamResponse:
        self.on_request()
        if not self.from_caddy(request):
            # Anyone else (a browser through Caddy's /_lovd/* route, a local process on
            # the socket) learns nothing here: no upstream, no container password.
            log.info("auth request without Caddy's gate key refused")
            err = LovdError("not-found", f"there is nothing at {request.path}")
            return self.refuse(request, err, _wants_html(request))
        value = self.cookie_value(request)
        nav = is_navigation(request)
        if value is None:
            return self.refuse(
                request,
                LovdError("unauthorized", "you have no session here; start one on the front page"),
                nav,
            )
        addr = client_address(request)
        try:
            s = self.authenticate(addr, functools.partial(self.verify, value))
        except LovdError as e:
            return self.refuse(request, e, nav, clear=e.code != "rate-limited")
        decision = self.allowlist.check(
            _original_method(request), _original_uri(request), websocket=_is_websocket(request)
        )
        if not decision.allowed:
            log.info(
                "refused %s %s for a session's browser: %s",
                decision.method,
                decision.path[:200],
                decision.reason,
                extra={"SESSION_ID": s.id},
            )
            return self.refuse_route(request, decision, nav)
        if decision.chat:
            self.sessions.mark_used(s.id)
        if s.status == "running":
            return self.allow(s, via_lovd=decision.body)
        if s.status == "failed":
            err = LovdError("unavailable", f"this session failed ({s.reason}); start a new one")
            return self.refuse(request, err, nav, clear=True)
        task = self.ensure_waking(s.id)
        if nav:
            return self.render(self.progress_page(s))
        try:
            await asyncio.wait_for(asyncio.shield(task), self.hold_timeout)
        except TimeoutError:
            err = LovdError("start-timeout", "the session is still starting; try again shortly")
            return self.refuse(request, err, nav)
        except LovdError as e:
            return self.refuse(request, e, nav)
        s2 = self.sessions.store.get(s.id)
        if s2 is None or s2.status != "running":
            err = self._wake_errors.get(s.id) or LovdError(
                "unavailable", "the session could not be started; start a new one"
            )
            return self.refuse(request, err, nav)
        return self.allow(s2, via_lovd=decision.body)

    def allow(self, s: Session, *, via_lovd: bool = False) -> web.Response:
        """Let Caddy proxy the request to the session's container, or, for a request whose
        body lovd must check first (bodycheck.py), to lovd's own public socket."""
        self.sessions.touch(s.id)
        upstream = f"127.0.0.1:{s.port}"
        if via_lovd:
            if not self.self_upstream:
                err = LovdError("unavailable", "lovd cannot check this request here")
                return web.Response(status=err.status, text=err.message)
            upstream = self.self_upstream
        return web.Response(
            status=204,
            headers={
                UPSTREAM_HEADER: upstream,
                "Authorization": self.sessions.env.basic_auth(s.id),
                "Cache-Control": "no-store",
            },
        )

    # --- waking ---

    def ensure_waking(self, sid: str) -> asyncio.Task[None]:
        """One wake-up per session, however many requests wait for it."""
        task = self._wakes.get(sid)
        if task is None or task.done():
            self._wake_errors.pop(sid, None)
            task = asyncio.create_task(self._wake(sid), name=f"wake-{sid}")
            self._wakes[sid] = task
            task.add_done_callback(lambda t: self._wake_done(sid, t))
        return task

    def _wake_done(self, sid: str, task: asyncio.Task[None]) -> None:
        if self._wakes.get(sid) is task:
            del self._wakes[sid]
        if not task.cancelled() and isinstance(task.exception(), LovdError):
            err = task.exception()
            assert isinstance(err, LovdError)
            self._wake_errors[sid] = err

    async def _wake(self, sid: str) -> None:
        deadline = time.monotonic() + self.hold_timeout
        while True:
            s = self.sessions.store.get(sid)
            if s is None:
                raise LovdError("unauthorized", "this session was deleted")
            if s.status == "running":
                return
            if s.status not in ("creating", "stopping"):
                break
            # creating: the creator is about to start it; stopping: let the stop finish.
            if time.monotonic() > deadline:
                raise LovdError("start-timeout", f"session stuck in state {s.status}")
            await asyncio.sleep(0.05)
        if s.status != "starting":
            log.info("waking session on request", extra={"SESSION_ID": sid})
        await self.sessions.wake(sid)

    async def drain(self) -> None:
        tasks = list(self._wakes.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- pages and refusals ---

    def render(self, page: Page) -> web.Response:
        body = self._template.substitute(
            title=html.escape(page.title), main=page.main, head=page.head
        )
        resp = web.Response(status=page.status, text=body, content_type="text/html")
        resp.headers.update(_PAGE_HEADERS)
        if page.retry_after is not None:
            resp.headers["Retry-After"] = str(page.retry_after)
        return resp

    def refuse(
        self, request: web.Request, err: LovdError, nav: bool, *, clear: bool = False
    ) -> web.Response:
        if nav:
            resp = self.render(self.refusal_page(err))
        else:
            body = err.problem(request.headers.get("X-Forwarded-Uri", request.path))
            resp = web.Response(
                status=err.status, body=json.dumps(body).encode(), content_type=PROBLEM
            )
            resp.headers["Cache-Control"] = "no-store"
            if err.retry_after is not None:
                resp.headers["Retry-After"] = str(err.retry_after)
        if err.status == 401 and not nav:
            # No WWW-Authenticate challenge: browsers must not pop up a password dialog.
            resp.headers.pop("WWW-Authenticate", None)
        if clear:
            self.clear_cookie(resp)
        return resp

    def refuse_route(self, request: web.Request, decision: Decision, nav: bool) -> web.Response:
        """403 for a request the chat UI does not need (web/allowlist.py)."""
        what = f"{decision.method} {decision.path[:200]}"
        if decision.route is not None:  # a known route, but not as a WebSocket
            why = "WebSocket connections are not available in this service"
        else:
            why = (
                "it is not available in this service: a session's browser may use only "
                "what the chat needs"
            )
        err = LovdError("forbidden", f"{what}: {why}", extra={"refused": "opencode-route"})
        if not nav:
            return self.refuse(request, err, nav)
        main = (
            "<h1>Not available here</h1>"
            f'<p class="notice" role="alert">{html.escape(what)}: {html.escape(why)}.</p>'
            '<p><a href="/">Back to your session</a></p>'
        )
        return self.render(Page(403, "Not available here", main))

    def refusal_text(self, err: LovdError) -> str:
        if err.code == "too-many-sessions" and err.retry_after is not None:
            limit = err.extra.get("limit", self.sessions.config.max_running)
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
            f'<p class="notice" role="alert">{text}</p>' + _start_form("Start a new session")
        )
        return Page(err.status, CODES[err.code][1], main, head=retry, retry_after=err.retry_after)

    def progress_page(self, s: Session) -> Page:
        waking = s.status not in _STARTING
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
        limit = self.sessions.config.max_running
        used = self.sessions.running_count()
        if not message and used >= limit:
            # Say how long the wait really is (the soonest place to free up), and let
            # Retry-After say the same.
            retry_after = self.sessions.retry_after()
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
            + _start_form("Start a new session")
            + f'<p class="muted">{used} of {limit} places are in use right now. '
            "Your session is private to this browser.</p>"
        )
        return Page(status, "Start", main, retry_after=retry_after)

    # --- handlers of the public app ---

    async def landing(self, request: web.Request) -> web.Response:
        self.on_request()
        return self.render(self.landing_page())

    async def start(self, request: web.Request) -> web.Response:
        self.on_request()
        if not _same_origin(request):
            err = LovdError("forbidden", "sessions can only be started from this site's own page")
            return self.refuse(request, err, True)
        if self._has_live_session(request):
            return web.Response(status=303, headers={"Location": "/", "Cache-Control": "no-store"})
        addr = client_address(request)
        retry = self.starts.retry_after(addr)
        if retry is not None:
            msg = (
                f"You have started {self.starts.limit} sessions recently — "
                f"try again in {human_seconds(retry)}."
            )
            return self.render(self.landing_page(msg, 429, retry))
        self.starts.hit(addr)
        try:
            s, token = await self.sessions.create(wait=False)
        except LovdError as e:
            log.info("browser session start refused for %s: %s", addr, e.message)
            return self.render(self.landing_page(self.refusal_text(e), e.status, e.retry_after))
        log.info("session started from the browser by %s", addr, extra={"SESSION_ID": s.id})
        resp = web.Response(status=303, headers={"Location": "/", "Cache-Control": "no-store"})
        self.set_cookie(request, resp, s, token)
        return resp

    def _has_live_session(self, request: web.Request) -> bool:
        value = self.cookie_value(request)
        if value is None:
            return False
        try:
            return self.verify(value).status != "failed"
        except LovdError:
            return False

    async def status(self, request: web.Request) -> web.Response:
        """Polled by the progress page: where is my session?"""
        self.on_request()
        value = self.cookie_value(request)
        addr = client_address(request)
        try:
            if value is None:
                raise LovdError(
                    "unauthorized", "you have no session here; start one on the front page"
                )
            s = self.authenticate(addr, functools.partial(self.verify, value))
        except LovdError as e:
            return _status_json(e.status, False, self.refusal_text(e), e.retry_after, error=True)
        if s.status == "running":
            return _status_json(200, True, "Ready.")
        err = self._wake_errors.get(s.id)
        if err is not None and s.id not in self._wakes:
            return _status_json(200, False, self.refusal_text(err), err.retry_after, error=True)
        if s.status == "failed":
            return _status_json(200, False, f"This session failed ({s.reason}).", None, error=True)
        msg = "Starting…" if s.status in _STARTING else "Waking up…"
        return _status_json(200, False, msg)

    async def entry(self, request: web.Request) -> web.StreamResponse:
        """``/c/{id}?token=…``: trade the one-time link for a session cookie, then go to ``/``."""
        self.on_request()
        addr = client_address(request)
        token = request.query.get("token", "")
        try:
            sid = request.match_info["id"]
            s = self.authenticate(addr, lambda: self.verify_token(ids.check(sid), token))
        except LovdError as e:
            return self.refuse(request, e, _wants_html(request))
        resp = web.Response(status=303, headers={"Location": "/", "Cache-Control": "no-store"})
        self.set_cookie(request, resp, s, token)
        return resp

    async def static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        data = self.static.get(name)
        suffix = "." + name.rsplit(".", 1)[-1]
        if data is None or suffix not in _STATIC_TYPES or name == "page.html":
            raise web.HTTPNotFound()
        return web.Response(
            body=data,
            content_type=_STATIC_TYPES[suffix],
            headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    async def ping(self, request: web.Request) -> web.Response:
        return web.Response(text="lovd\n", headers={"Cache-Control": "no-store"})

    async def not_found(self, request: web.Request) -> web.Response:
        err = LovdError("not-found", f"there is nothing at {request.path}")
        return self.refuse(request, err, _wants_html(request))


def _wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def _same_origin(request: web.Request) -> bool:
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser form post (curl); cookies are SameSite=Lax anyway
    host = request.headers.get("X-Forwarded-Host") or request.host
    return urlsplit(origin).netloc == host


def _start_form(label: str) -> str:
    return (
        '<form method="post" action="/_lovd/start">'
        f'<button type="submit">{html.escape(label)}</button></form>'
    )


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
    app = web.Application(middlewares=[_errors], client_max_size=4096)
    r = app.router
    r.add_get(AUTH_PATH, gate.auth)
    # Reached only as the upstream the gate names for them (see BrowserGate.allow).
    r.add_post("/session", gate.checked_chat)
    r.add_post("/session/{oc}/prompt_async", gate.checked_chat)
    r.add_get("/", gate.landing)
    r.add_get("/_lovd/", gate.landing)
    r.add_post("/_lovd/start", gate.start)
    r.add_get("/_lovd/status", gate.status)
    r.add_get("/_lovd/ping", gate.ping)
    r.add_get("/_lovd/static/{name}", gate.static_file)
    r.add_get("/c/{id}", gate.entry)
    r.add_route("*", "/{tail:.*}", gate.not_found)
    app.on_shutdown.append(lambda _app: gate.drain())
    return app


def add_browser_entry(app: web.Application, sessions: Sessions) -> None:
    """Register ``GET /c/{id}`` on another app (the API socket), sharing the same logic."""
    gate = BrowserGate.from_config(sessions.config, sessions)
    app.router.add_get("/c/{id}", gate.entry)


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
