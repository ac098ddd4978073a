"""The browser path: what Caddy asks lovd, on lovd's public socket (``caddy.auth_socket``).

Caddy sends every request that is not for lovd itself to ``GET /_lovd/auth``
(``forward_auth``, with the gate key in ``X-Lovd-Gate``; without it the answer is 404
and holds nothing). The answer decides everything:

- **403** for any request the chat UI does not need (web/allowlist.py: default deny,
  method + path; terminals, shell, files, config writes, WebSockets, …).
- **2xx**: the session cookie is valid and the container runs. The answer carries
  ``X-Lovd-Upstream: 127.0.0.1:<port>`` (derived from the cookie's session only, so a
  cookie of session A can never reach session B) and the container's own
  ``Authorization: Basic …`` (the browser never sees that password). Only chat
  requests (allowlist ``chat``) count as activity (``Sessions.touch``): polls, health
  checks and event streams never keep a session's place.
- **session not running** (starting, idle-stopped): a navigation gets a short
  "waking up" page (503 + Retry-After, refreshes itself); any other request (XHR,
  SSE, API) is *held* until the container is ready, then allowed. Never a 502. A
  session the policy stopped because nobody chatted in it (``UNUSED_REASON``) is woken
  only by a page load or a chat request; other requests get 503 without waking it.
  Wakes count against ``browser.max_running_per_client`` for the client's address.
- **the container cannot be reached** (it died, was removed, is being restarted): Caddy's
  error route asks again with ``X-Lovd-Upstream-Failed`` (lovd/caddy.py) and
  :meth:`BrowserGate.upstream_failed` answers the browser itself: the container is
  checked at once (gone → reconciled to ``stopped``; hung → restarted), the wake starts,
  and a navigation gets the waking page, anything else 503 + Retry-After. The next
  request is held as above. Never Caddy's empty 502.
- **a hung container**: a request for a running session whose container no probe has
  vouched for in the last few seconds starts a check of it in the background
  (session/health.py, ``Health.check_now``); a hang is confirmed by a few probes a
  second apart and the container restarted, so waiting requests end and come back here.
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
import contextlib
import functools
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

import aiohttp
from aiohttp import web

from lovd import ids
from lovd.caddy import (
    COOKIE_NAME,
    FAILED_HEADER,
    GATE_HEADER,
    UPSTREAM_HEADER,
    gate_key,
)
from lovd.config import Config
from lovd.errors import LovdError
from lovd.session.housekeeping import UNUSED_REASON
from lovd.session.lifecycle import Sessions
from lovd.session.model import Session, SessionState
from lovd.sync import routing
from lovd.web.allowlist import Allowlist, Decision
from lovd.web.bodycheck import BodyCheck, Rules, check_place
from lovd.web.cookies import CookieHeaders, VerifiedCookies
from lovd.web.pages import Pages, human_seconds, language
from lovd.web.problems import is_navigation, render
from lovd.web.ratelimit import RateLimiter, client_address, client_key
from lovd.web.warmprep import WarmPrep

log = logging.getLogger(__name__)

SECURE_COOKIE = "__Host-" + COOKIE_NAME
# How long a page load waits for a session that is starting before it gets the progress
# page: a container claimed from the warm pool is confirmed ready within this, so the
# person goes straight into the chat instead of through a progress page shown for a blink.
NAV_HOLD = 1.0
# How long the answer to a request Caddy could not deliver waits for the container check
# (a probe, then a Podman listing): long enough for "gone", which is what it nearly
# always is; a hang is confirmed in the background.
FAILED_CHECK_HOLD = 3.0
# Retry-After of that answer: the wake of a removed container takes a few seconds.
FAILED_RETRY_AFTER = 2
# How long the "switch session?" page's form stays valid (web/public.py).
SWITCH_TTL = 600


def _original_method(request: web.Request) -> str:
    return request.headers.get("X-Forwarded-Method", request.method).upper()


def _original_uri(request: web.Request) -> str:
    uri = request.headers.get("X-Forwarded-Uri")
    return request.path_qs if uri is None else uri  # path_qs only when needed: it costs


def _check_place(request: web.Request) -> None:
    """Every request stays in the chat's folder: OpenCode opens a project wherever
    ``?directory=`` or ``x-opencode-directory`` points (and a remote workspace for
    ``workspace``), with that folder's config, sessions and files, so any other place is
    refused on every route (bodycheck.check_place; the UI sends /work or nothing)."""
    uri = _original_uri(request)
    query = uri.partition("?")[2]
    places = [
        (k, v)
        for k, v in (parse_qsl(query, keep_blank_values=True) if query else ())
        if k in _PLACE_PARAMS
    ]
    headers = request.headers
    if places or any(h in headers for h in _PLACE_HEADERS):
        check_place(places, [(k, v) for k, v in headers.items() if k.lower() in _PLACE_HEADERS])


_PLACE_PARAMS = frozenset({"directory", "workspace"})
_PLACE_HEADERS = frozenset({"x-opencode-directory", "x-opencode-workspace"})


def _is_websocket(request: web.Request) -> bool:
    """Caddy's subrequest keeps the client's Upgrade header (a hop-by-hop header it
    restores for upgrade requests)."""
    return bool(request.headers.get("Upgrade"))


class BrowserGate:
    """Cookies, the allowlist, wake-on-request and the answer to Caddy. No global state."""

    def __init__(
        self,
        sessions: Sessions,
        *,
        http: aiohttp.ClientSession,
        prep: WarmPrep,
        failures: RateLimiter,
        starts: RateLimiter,
        hold_timeout: float,
        gate_key: str,
        self_upstream: str = "",
        route_elsewhere: Callable[[str], Awaitable[str | None]] | None = None,
        allowlist: Allowlist | None = None,
        on_request: Callable[[], None] | None = None,
        secure_only: bool = False,
    ) -> None:
        self.sessions = sessions
        # Under an https public_url only the __Host- cookie counts: a sibling domain can
        # set a plain lovd_session cookie for this host (cookie tossing), never a
        # __Host- one.
        self.secure_only = secure_only
        self._switch_key = hmac.new(sessions.host_key, b"link-switch", hashlib.sha256).digest()
        self.failures = failures
        self.starts = starts
        self.hold_timeout = hold_timeout
        self.gate_key = gate_key
        self.allowlist = allowlist or Allowlist()
        self.on_request = on_request or (lambda: None)
        # Warm containers get their first chat and store their UI files before a claim
        # (web/warmprep.py); the sessions facade calls it, so it is built before both.
        self.prep = prep
        self.chat_landing = prep.landing
        # The answer to Caddy's ~40 requests per page visit (web/cookies.py): each Cookie
        # header parsed once, each cookie verified once while its row agrees, each
        # container's Authorization header derived once.
        names = (SECURE_COOKIE,) if secure_only else (SECURE_COOKIE, COOKIE_NAME)
        self.cookie_headers = CookieHeaders(names)
        self.verified = VerifiedCookies(sessions.find, sessions.now)
        self._auth_headers: dict[str, str] = {}
        self._gate_key = gate_key.encode()
        self.pages = Pages(
            max_running=sessions.limit,
            running=sessions.running_count,
            retry_after=sessions.retry_after,
            prefetch=prep.prefetch_html,
        )
        # Caddy's dial address of this app's own socket (set by serve_public), for the
        # requests whose body lovd checks before they reach the container.
        self.self_upstream = self_upstream
        # Browser routing across hosts (lovd/sync/routing.py): given when PostgreSQL sync
        # is on; answers the owning host's upstream for a foreign session.
        self.route_elsewhere = route_elsewhere
        self.bodycheck = BodyCheck(
            session_of=self._session_of,
            password_header=sessions.container_auth,
            http=http,
            rules=Rules(models=sessions.allowed_models()),
            disk_refusal=sessions.disk.refusal,
            disk_grew=sessions.disk.grew,
        )

    @classmethod
    def from_config(
        cls,
        config: Config,
        sessions: Sessions,
        *,
        http: aiohttp.ClientSession,
        prep: WarmPrep,
        self_upstream: str = "",
        route_elsewhere: Callable[[str], Awaitable[str | None]] | None = None,
        on_request: Callable[[], None] | None = None,
        allowlist: Allowlist | None = None,
    ) -> BrowserGate:
        return cls(
            sessions,
            http=http,
            prep=prep,
            failures=RateLimiter(config.browser_auth_failures, config.browser_auth_failure_window),
            starts=RateLimiter(config.browser_start_limit, config.browser_start_window),
            hold_timeout=config.ready_timeout + 5.0,
            gate_key=gate_key(sessions.host_key),
            self_upstream=self_upstream,
            route_elsewhere=route_elsewhere,
            allowlist=allowlist,
            on_request=on_request,
            secure_only=config.public_url.startswith("https:"),
        )

    def cookie_value(self, request: web.Request) -> str | None:
        header = request.headers.get("Cookie", "")
        return self.cookie_headers.value(header, lambda: request.cookies)

    def live_session(self, request: web.Request) -> Session | None:
        """The session this browser's cookie holds now, if it is valid and not expired
        (whatever its state: a stopped one wakes). No failure is counted: this only asks
        whether a link would replace something."""
        value = self.cookie_value(request)
        if value is None:
            return None
        try:
            return self.verify(value)
        except LovdError:
            return None

    def switch_token(self, sid: str, link: str, cookie: str, issued: int) -> str:
        """The form token of the "switch session?" page: bound to the link, to the cookie
        the browser holds and to the time, keyed with the host key (a cross-site page
        can neither read nor compute it)."""
        msg = f"{sid}\0{link}\0{cookie}\0{issued}".encode()
        mac = hmac.new(self._switch_key, msg, hashlib.sha256).hexdigest()
        return f"{issued}.{mac}"

    def switch_token_ok(self, sid: str, link: str, cookie: str, token: str) -> bool:
        issued, _, _ = token.partition(".")
        if not issued.isdigit() or not 0 <= time.time() - int(issued) <= SWITCH_TTL:
            return False
        expected = self.switch_token(sid, link, cookie, int(issued))
        return hmac.compare_digest(expected.encode(), token.encode())

    def verify(self, value: str) -> Session:
        """The session a cookie value ``<id>.<token>`` belongs to, or LovdError."""
        s = self.verified.get(value)
        if s is not None:
            return s
        sid, _, token = value.partition(".")
        if not ids.is_valid(sid) or not token:
            raise LovdError("unauthorized", "this session cookie is not valid")
        s = self.verify_token(sid, token)
        self.verified.put(value, s)
        return s

    def verify_token(self, sid: str, token: str) -> Session:
        s = self.sessions.find(sid)
        if s is None or not s.token_hash:  # no row, or an unclaimed warm container
            ids.token_matches(token, "0" * 64)  # same work either way
            raise LovdError("unauthorized", "this session does not exist (any more)")
        if not token or not ids.token_matches(token, s.token_hash):
            raise LovdError("unauthorized", "this session link is not valid (wrong or old token)")
        if s.expires_at <= self.sessions.now():
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
        proto = request.headers.get("X-Forwarded-Proto", request.scheme)
        # Under an https public_url always the __Host- cookie: the only one read then.
        secure = self.secure_only or proto == "https"
        resp.set_cookie(
            SECURE_COOKIE if secure else COOKIE_NAME,
            f"{s.id}.{token}",
            httponly=True,
            samesite="Lax",
            secure=secure,
            path="/",
            max_age=max(0, int(s.expires_at - self.sessions.now())),
        )

    @staticmethod
    def clear_cookie(resp: web.StreamResponse) -> None:
        resp.del_cookie(COOKIE_NAME, path="/")
        resp.del_cookie(SECURE_COOKIE, path="/", secure=True)

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
            if e.code == "unavailable":  # the container did not answer lovd either
                value = self.cookie_value(request) or ""
                sid = value.partition(".")[0]
                if ids.is_valid(sid) and self.sessions.find(sid) is not None:
                    self.sessions.check_container(sid, "lovd could not reach it")
                e.retry_after = e.retry_after or FAILED_RETRY_AFTER
            return self.refuse(request, e, False)

    async def elsewhere(self, sid: str) -> str | None:
        """The upstream of the host that owns ``sid`` when this one does not have it."""
        if self.route_elsewhere is None or not ids.is_valid(sid) or self.sessions.find(sid):
            return None
        return await self.route_elsewhere(sid)

    def from_caddy(self, request: web.Request) -> bool:
        """Whether the request carries the gate key only Caddy's forward_auth sends."""
        sent = request.headers.get(GATE_HEADER, "")
        return hmac.compare_digest(sent.encode(), self._gate_key)

    async def auth(self, request: web.Request) -> web.StreamResponse:
        self.on_request()
        if not self.from_caddy(request):
            # Anyone else (a browser through Caddy's /_lovd/* route, a local process on
            # the socket) learns nothing here: no upstream, no container password.
            log.info("auth request without Caddy's gate key refused")
            err = LovdError("not-found", f"there is nothing at {request.path}")
            return self.refuse(request, err, is_navigation(request))
        if request.headers.get(FAILED_HEADER):
            return await self.upstream_failed(request)
        value = self.cookie_value(request)
        nav = is_navigation(request)
        if value is None:
            return self.refuse(
                request,
                LovdError("unauthorized", "you have no session here; start one on the front page"),
                nav,
            )
        cached = self.verified.get(value)
        if cached is not None:
            # Verified before and its row agrees: a session of this host, and valid
            # credentials pass the failure limit anyway.
            s = cached
        else:
            upstream = await self.elsewhere(value.partition(".")[0])
            if upstream:
                return routing.elsewhere(upstream)
            try:
                s = self.authenticate(
                    client_address(request), functools.partial(self.verify, value)
                )
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
        try:
            _check_place(request)
        except LovdError as e:
            log.info(
                "refused a request for another folder: %s", e.message, extra={"SESSION_ID": s.id}
            )
            return self.refuse(request, e, nav)
        if decision.chat:
            # Only chat activity keeps a place (a poll every 30 s must not hold one).
            self.sessions.mark_used(s.id)
            self.sessions.touch(s.id)
        if s.serving:
            if not self.sessions.vouched(s):
                # Nothing has heard from the container lately: look now, in the background
                # (a hung one is restarted in seconds rather than health.interval * failures).
                self.sessions.check_container(s.id, "a request while no probe vouched for it")
            if nav and decision.path == "/":
                return await self.land(s)
            return self.allow(s, via_lovd=decision.via_lovd)
        if s.reason == UNUSED_REASON and s.paused and not (nav or decision.chat):
            # Nobody chatted in it: a page load or a prompt wakes it, a poll does not.
            err = LovdError(
                "unavailable",
                "this session was paused because nobody used it; reload the page or send a "
                "message to wake it",
                retry_after=30,
            )
            return self.refuse(request, err, nav)
        task = self.sessions.ensure_waking(s.id, client_key(client_address(request)))
        if nav and s.status == SessionState.STARTING:
            # Still starting, or failed: the progress page says which.
            with contextlib.suppress(TimeoutError, LovdError):
                await asyncio.wait_for(asyncio.shield(task), NAV_HOLD)
            s2 = self.sessions.find(s.id)
            if s2 is not None and s2.serving:
                if decision.path == "/":
                    return await self.land(s2)
                return self.allow(s2, via_lovd=decision.via_lovd)
        if nav:
            return self.pages.render(self.pages.progress_page(s, language(request)))
        try:
            await asyncio.wait_for(asyncio.shield(task), self.hold_timeout)
        except TimeoutError:
            err = LovdError("start-timeout", "the session is still starting; try again shortly")
            return self.refuse(request, err, nav)
        except LovdError as e:
            return self.refuse(request, e, nav)
        s2 = self.sessions.find(s.id)
        if s2 is None or not s2.serving:
            err = self.sessions.wake_error(s.id) or LovdError(
                "unavailable", "the session could not be started; start a new one"
            )
            return self.refuse(request, err, nav)
        return self.allow(s2, via_lovd=decision.via_lovd)

    async def upstream_failed(self, request: web.Request) -> web.Response:
        """Caddy could not reach the container this gate named for the request (its error
        route, lovd/caddy.py). Check the container, start the wake, and answer the browser:
        the waking page for a navigation (it reloads into the chat), else 503 with
        Retry-After. Never an upstream: the request is not sent on again."""
        nav = is_navigation(request)
        status = request.headers.get(FAILED_HEADER, "")
        value = self.cookie_value(request)
        if value is None:  # forward_auth allowed it, so there was one; be safe anyway
            err = LovdError("unauthorized", "you have no session here; start one on the front page")
            return self.refuse(request, err, nav)
        sid = value.partition(".")[0]
        if await self.elsewhere(sid):
            err = LovdError(
                "unavailable",
                "the host that holds this session did not answer; try again shortly",
                retry_after=FAILED_RETRY_AFTER,
            )
            return self.refuse(request, err, nav)
        try:
            s = self.authenticate(client_address(request), functools.partial(self.verify, value))
        except LovdError as e:
            return self.refuse(request, e, nav, clear=e.code != "rate-limited")
        log.info(
            "Caddy could not reach the container (HTTP %s for %s %s): checking it",
            status[:3],
            _original_method(request),
            _original_uri(request)[:200],
            extra={"SESSION_ID": s.id},
        )
        check = self.sessions.check_container(s.id, f"Caddy could not reach it ({status[:3]})")
        # Not finished in time, or failed (logged by health.py): answer and wake anyway.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(check), FAILED_CHECK_HOLD)
        s2 = self.sessions.find(s.id) or s
        if not s2.serving:
            self.sessions.ensure_waking(s.id)
        if nav:
            return self.pages.render(self.pages.progress_page(s2, language(request)))
        err = LovdError(
            "unavailable",
            "the session's container stopped answering and is being started again; "
            f"retry in {FAILED_RETRY_AFTER} seconds",
            retry_after=FAILED_RETRY_AFTER,
        )
        return self.refuse(request, err, nav)

    async def land(self, s: Session) -> web.Response:
        """Opening the site goes straight into the session's latest chat, not OpenCode's
        project picker (web/chat_landing.py); Caddy hands this redirect to the browser."""
        where = await self.chat_landing.location(s.id, s.port)
        if where is None:
            return self.allow(s)  # OpenCode's own start page rather than an error
        return web.Response(status=303, headers={"Location": where, "Cache-Control": "no-store"})

    def allow(self, s: Session, *, via_lovd: bool = False) -> web.Response:
        """Let Caddy proxy the request to the session's container, or, for a request whose
        body lovd must check first (bodycheck.py) or that lovd answers itself
        (commands.py), to lovd's own public socket."""
        upstream = f"127.0.0.1:{s.port}"
        if via_lovd:
            if not self.self_upstream:  # rendered by the app's error middleware
                raise LovdError("unavailable", "lovd cannot check this request here")
            upstream = self.self_upstream
        return web.Response(
            status=204,
            headers={
                UPSTREAM_HEADER: upstream,
                "Authorization": self.container_auth(s.id),
                "Cache-Control": "no-store",
            },
        )

    def container_auth(self, sid: str) -> str:
        """The container's Authorization header: derived from the host key and the id
        only, so it never changes for a session."""
        auth = self._auth_headers.get(sid)
        if auth is None:
            if len(self._auth_headers) >= 10_000:
                self._auth_headers.clear()
            auth = self._auth_headers[sid] = self.sessions.container_auth(sid)
        return auth

    async def drain(self) -> None:
        """The wakes under way end with lovd (they live in session/wakes.py: one per
        session, whichever socket asked)."""
        await self.sessions.drain_wakes()

    def refuse(
        self, request: web.Request, err: LovdError, nav: bool, *, clear: bool = False
    ) -> web.Response:
        """``err`` as the page or problem+json (web/problems.py decides and renders);
        ``nav`` is the navigation decision the caller already made for this request."""
        resp = render(request, err, self.pages.error, nav=nav)
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
        page = self.pages.route_refused_page(
            what, why, language(request), websocket=decision.route is not None
        )
        return self.pages.render(page)
