"""Caddy's admin API: lovd pushes one static server config and keeps it there.

Routing never changes per session. lovd owns exactly one object in Caddy's config,
the HTTP server ``apps.http.servers.<name>`` tagged ``"@id": "<name>"``:

1. ``/c/*`` and ``/_lovd/*`` (and ``/`` for visitors without a session cookie) go to
   lovd's public socket (landing page, session start, progress, browser entry) —
   except ``/_lovd/auth*``, which Caddy answers itself with 404;
2. everything else goes through ``forward_auth`` to lovd's ``/_lovd/auth``, which
   answers 2xx with ``X-Lovd-Upstream: 127.0.0.1:<port>`` and the container's
   ``Authorization`` header, and ``reverse_proxy`` dials that header (streaming,
   ``flush_interval -1``). Client-supplied ``X-Lovd-*`` headers are deleted first.
3. when that ``reverse_proxy`` cannot reach the container (dial refused, the connection
   closed before a response: the container died, was removed, or is being restarted),
   Caddy's error routes (``handle_errors``) send the request to lovd's ``/_lovd/auth``
   again with ``X-Lovd-Upstream-Failed: <status>``; lovd checks the container at once,
   starts the wake, and answers the browser itself (the waking page, or 503 with
   Retry-After) — never Caddy's bare 502. Only requests that passed forward_auth (they
   carry the ``X-Lovd-Upstream`` lovd set) take that route.

Every response of the site (OpenCode's UI and lovd's own pages) leaves with
``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer`` and a Content-Security-Policy
``frame-ancestors 'none'`` (its own header: browsers enforce every CSP they get), and
OpenCode's CSP has its ``connect-src`` narrowed to ``'self'`` (it ships ``*``): no
framing (clickjacking), no session link in a Referer, no page script talking to
another origin (``RESPONSE_HEADERS``).

HTTPS: a public_url ``https://<public name>`` gets a certificate Caddy manages. A host
without a public name sets ``caddy.tls``: the server then speaks TLS on its addresses
(``tls_connection_policies``) with the certificates the operator loaded into Caddy's own
``tls`` app, which lovd never touches. Over TLS browsers speak HTTP/2, so the UI's burst
of ~30 gated API calls shares one connection instead of queueing for six. Caddy tells
lovd the scheme (``X-Forwarded-Proto: https``, set by reverse_proxy and forward_auth
alike, never taken from the client), and the gate sets the ``__Host-`` Secure cookie.

The container's password must never reach a browser, so lovd answers ``/_lovd/auth``
only to a request carrying ``X-Lovd-Gate: <gate key>``, which only the forward_auth
subrequest sets. The key is HMAC(host key, "caddy-gate"): it lives in Caddy's config
(never sent to a client), and it survives lovd restarts without a Caddy reload.

Opening and closing sessions therefore never reloads Caddy (Caddy 2.6 reloads its
whole config on every admin change and force-closes WebSockets of the old config).

The contract of :class:`CaddyManager`:

- ``apply()`` is idempotent: it reads lovd's object and writes only when it differs
  (no write = no reload). It never touches config outside lovd's ``@id``.
- ``run()`` checks every ``caddy.check_interval`` seconds and re-applies when Caddy
  restarted (empty config) or somebody replaced the config; it logs transitions once.
- On 2.6 the admin API on a unix socket only accepts an *empty* ``Host`` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from lovd.config import Config
from lovd.session.launcher import load_host_key

log = logging.getLogger(__name__)

COOKIE_NAME = "lovd_session"
AUTH_PATH = "/_lovd/auth"
UPSTREAM_HEADER = "X-Lovd-Upstream"
GATE_HEADER = "X-Lovd-Gate"
# Set by Caddy's error route (its value: Caddy's error status) when the container the
# gate named could not be reached; lovd then answers the browser itself.
FAILED_HEADER = "X-Lovd-Upstream-Failed"
# What the documentation renderings (caddy/lovd.caddy.json, caddy/lovd.caddyfile) show
# instead of a real key: a Caddy placeholder, so a hand-run Caddy can take it from its
# environment.
GATE_KEY_PLACEHOLDER = "{env.LOVD_GATE_KEY}"


def gate_key(host_key: bytes) -> str:
    """The secret Caddy's forward_auth sends to lovd (see the module docstring)."""
    return hmac.new(host_key, b"caddy-gate", hashlib.sha256).hexdigest()


class CaddyError(Exception):
    """The admin API refused a request or cannot be reached; the message says which."""


@dataclass(frozen=True)
class Site:
    """What lovd's Caddy server looks like; rendered by :func:`render_server`."""

    name: str
    listen: tuple[str, ...]
    auth_socket: str
    public_url: str = ""
    gate_key: str = GATE_KEY_PLACEHOLDER
    # OpenCode's UI files on the host (lovd/web/assets.py); "" = every file via the gate.
    assets_dir: str = ""
    # caddy.tls: TLS on ``listen`` with the certificates Caddy has loaded itself.
    tls: bool = False

    @property
    def hosts(self) -> list[str]:
        """Host names from public_url, so Caddy can manage certificates for HTTPS."""
        parts = urlsplit(self.public_url)
        host = parts.hostname or ""
        if parts.scheme == "https" and host and host not in ("localhost", "127.0.0.1"):
            return [host]
        return []


# Set on every response (see the module docstring). Deferred: applied when the response
# is written, so they replace what an upstream sent instead of adding to it.
RESPONSE_HEADERS: dict[str, list[str]] = {
    "X-Frame-Options": ["DENY"],
    "Referrer-Policy": ["no-referrer"],
}
FRAME_ANCESTORS = "frame-ancestors 'none'"
# OpenCode's own CSP, connect-src narrowed: its UI talks to its own origin only.
CONNECT_SRC = "connect-src 'self' data:"


# A chat's own record (GET /session/ses_…): the UI asks for it four times at once when a
# chat opens, and Chromium's HTTP cache lets identical GETs in flight share an answer
# only when that answer is fresh; otherwise each waits for the one before it (a chain
# of four round trips: ~0.3 s on a quiet machine, ~0.6 s at 150 ms). Two seconds of
# freshness, private to that browser, lets them share one; only this route, only 200s.
CHAT_RECORD = r"^/session/ses_[A-Za-z0-9]+$"
CHAT_RECORD_CACHE = "private, max-age=2"


def _proxy_to_lovd(dial: str) -> dict[str, Any]:
    return {"handler": "reverse_proxy", "upstreams": [{"dial": dial}]}


# Vite's hashed file names never change content: a browser may keep them for a year.
ASSET_CACHE = "public, max-age=31536000, immutable"
HASHED = r"^/assets/[^/]+-[A-Za-z0-9_-]{8}\.[a-z0-9]+$"
# The UI's unhashed files (favicons, manifest, /assets/Inter.ttf) may change with an
# upgrade: an hour, then the browser revalidates (ETag, Last-Modified).
TOP_FILE_CACHE = "public, max-age=3600"
TOP_FILES = r"^/[A-Za-z0-9_][A-Za-z0-9_.-]*\.(png|svg|ico|webmanifest)$"
# Compressed by Caddy: what lovd and OpenCode answer besides the precompressed UI files.
# Not text/event-stream: a streamed answer must reach the browser event by event.
COMPRESSIBLE = [
    "text/html*",
    "text/css*",
    "text/plain*",
    "text/javascript*",
    "application/javascript*",
    "application/json*",
    "application/problem+json*",
    "application/manifest+json*",
    "image/svg+xml*",
]


def static_routes(site: Site, when: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenCode's UI files straight from disk, without forward_auth (lovd/web/assets.py):
    only names that exist there; anything else (the HTML shell, every API route) falls
    through to the gate."""
    if not site.assets_dir:
        return []
    exists = {"file": {"root": site.assets_dir, "try_files": ["{http.request.uri.path}"]}}
    files = {
        "handler": "file_server",
        "root": site.assets_dir,
        "precompressed": {"zstd": {}, "gzip": {}},
        "precompressed_order": ["zstd", "gzip"],
    }

    def cache(value: str) -> dict[str, Any]:
        return {"handler": "headers", "response": {"set": {"Cache-Control": [value]}}}

    return [
        {
            "match": [{**when, "path_regexp": {"pattern": HASHED}, **exists}],
            "handle": [cache(ASSET_CACHE), files],
            "terminal": True,
        },
        {
            "match": [{**when, "path": ["/assets/*"], **exists}],
            "handle": [cache(TOP_FILE_CACHE), files],
            "terminal": True,
        },
        {
            "match": [{**when, "path_regexp": {"pattern": TOP_FILES}, **exists}],
            "handle": [cache(TOP_FILE_CACHE), files],
            "terminal": True,
        },
    ]


def encode_route(when: dict[str, Any]) -> dict[str, Any]:
    """zstd/gzip for every later route (a non-terminal route's handler wraps the rest)."""
    route: dict[str, Any] = {
        "handle": [
            {
                "handler": "encode",
                "encodings": {"zstd": {}, "gzip": {}},
                "prefer": ["zstd", "gzip"],
                "match": {"headers": {"Content-Type": COMPRESSIBLE}},
            }
        ]
    }
    if when:
        route["match"] = [when]
    return route


def _ask_lovd(
    lovd: str,
    key: str,
    extra: dict[str, list[str]] | None = None,
    *,
    delete: list[str] | None = None,
) -> dict[str, Any]:
    """A GET of lovd's gate (``/_lovd/auth``) about the request at hand, as forward_auth and
    the error route both ask it: the original method and URI, and the gate key."""
    request: dict[str, Any] = {
        "set": {
            "X-Forwarded-Method": ["{http.request.method}"],
            "X-Forwarded-Uri": ["{http.request.uri}"],
            GATE_HEADER: [key],
            **(extra or {}),
        }
    }
    if delete:
        request["delete"] = delete
    return {
        "handler": "reverse_proxy",
        "upstreams": [{"dial": lovd}],
        "rewrite": {"method": "GET", "uri": AUTH_PATH},
        "headers": {"request": request},
    }


def render_server(site: Site) -> dict[str, Any]:
    """The JSON of lovd's Caddy server (the same as ``caddy adapt`` makes of caddy/Caddyfile)."""
    lovd = f"unix/{site.auth_socket}"
    forward_auth: dict[str, Any] = {
        # What Caddyfile's `forward_auth <lovd> { uri /_lovd/auth; copy_headers … }` adapts to.
        **_ask_lovd(lovd, site.gate_key),
        "handle_response": [
            {
                "match": {"status_code": [2]},
                "routes": [
                    {
                        "handle": [
                            {
                                "handler": "headers",
                                "request": {
                                    "set": {
                                        "Authorization": [
                                            "{http.reverse_proxy.header.Authorization}"
                                        ],
                                        UPSTREAM_HEADER: [
                                            "{http.reverse_proxy.header.X-Lovd-Upstream}"
                                        ],
                                    }
                                },
                            }
                        ]
                    }
                ],
            }
        ],
    }
    to_session: dict[str, Any] = {
        "handler": "reverse_proxy",
        "upstreams": [{"dial": "{http.request.header.X-Lovd-Upstream}"}],
        # Stream SSE and chunked responses as they come; no buffering, no read timeout.
        "flush_interval": -1,
        "headers": {
            "request": {"delete": [UPSTREAM_HEADER]},
            "response": {
                "replace": {
                    "Content-Security-Policy": [
                        {"search_regexp": "connect-src[^;]*", "replace": CONNECT_SRC}
                    ]
                }
            },
        },
    }

    def match(extra: dict[str, Any] | None = None) -> dict[str, Any]:
        m: dict[str, Any] = dict(extra or {})
        if site.hosts:
            m["host"] = site.hosts
        return {"match": [m]} if m else {}

    routes: list[dict[str, Any]] = [
        # Never trust internal headers from the client (runs before anything else).
        {
            **match(),
            "handle": [
                {
                    "handler": "headers",
                    "request": {"delete": ["X-Lovd-*"]},
                    "response": {
                        "set": RESPONSE_HEADERS,
                        "add": {"Content-Security-Policy": [FRAME_ANCESTORS]},
                        "deferred": True,
                    },
                }
            ],
        },
        # The auth answer carries the container's password: only forward_auth's
        # subrequest (straight to lovd's socket) may get it, never a browser.
        {
            **match({"path": [f"{AUTH_PATH}*"]}),
            "handle": [
                {
                    "handler": "static_response",
                    "status_code": 404,
                    "headers": {"Content-Type": ["text/plain; charset=utf-8"]},
                    "body": "Not found: lovd's auth answer is only for Caddy itself.\n",
                }
            ],
            "terminal": True,
        },
        *static_routes(site, {"host": site.hosts} if site.hosts else {}),
        encode_route({"host": site.hosts} if site.hosts else {}),
        {
            **match({"path": ["/c/*", "/_lovd/*"]}),
            "handle": [_proxy_to_lovd(lovd)],
            "terminal": True,
        },
        {
            **match(
                {
                    "path": ["/"],
                    "not": [{"header": {"Cookie": [f"*{COOKIE_NAME}=*"]}}],
                }
            ),
            "handle": [_proxy_to_lovd(lovd)],
            "terminal": True,
        },
        {
            **match({"method": ["GET"], "path_regexp": {"pattern": CHAT_RECORD}}),
            "handle": [
                {
                    "handler": "headers",
                    "response": {
                        "set": {"Cache-Control": [CHAT_RECORD_CACHE]},
                        "require": {"status_code": [200]},
                        "deferred": True,
                    },
                }
            ],
        },
        {**match(), "handle": [forward_auth, to_session], "terminal": True},
    ]
    # Caddy's own answer to a container it cannot reach is an empty 502. Instead, lovd
    # answers (web/gate.py, BrowserGate.upstream_failed). The upstream header is present
    # only when forward_auth allowed the request (clients' X-Lovd-* were deleted above);
    # the container's password is not sent on.
    upstream_failed: dict[str, Any] = {
        # 502: could not reach it. Not 499: the browser left (a closed tab, a page that
        # moved on from an event stream), which says nothing about the container.
        "match": [
            {
                "header": {UPSTREAM_HEADER: ["*"]},
                "vars": {"{http.error.status_code}": ["502"]},
            }
        ],
        "handle": [
            _ask_lovd(
                lovd,
                site.gate_key,
                {FAILED_HEADER: ["{http.error.status_code}"]},
                delete=["Authorization", UPSTREAM_HEADER, "Content-Length"],
            )
        ],
    }
    server: dict[str, Any] = {
        "@id": site.name,
        "listen": list(site.listen),
        "routes": routes,
        "errors": {"routes": [upstream_failed]},
    }
    if site.tls:
        # One policy without matchers: every handshake on these addresses gets TLS (and
        # HTTP/2) with whichever loaded certificate fits the name, or the address itself
        # when the browser sends no SNI (an IP address).
        server["tls_connection_policies"] = [{}]
    if not site.hosts:
        # No certificate management (ACME) and no HTTP->HTTPS redirect server: plain HTTP
        # on the configured addresses, or TLS with the operator's own certificates.
        server["automatic_https"] = {"disable": True}
    return server


class CaddyAdmin:
    """A tiny admin API client. ``address`` is ``unix//path`` or ``host:port``."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        self.address = address
        if address.startswith("unix/"):
            self._base = "http://caddy-admin"
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=address[len("unix/") :])
            self._headers = {"Host": ""}  # Caddy 2.6: only an empty Host passes on a unix socket
        else:
            self._base = "http://" + address.removeprefix("tcp/")
            connector = aiohttp.TCPConnector(limit=4)
            self._headers = {}
        self._http = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
        )

    async def close(self) -> None:
        await self._http.close()

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self._headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._http.request(
                method, self._base + path, data=data, headers=headers
            ) as r:
                raw = await r.read()
                status = r.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise CaddyError(f"Caddy admin API at {self.address} unreachable: {e!r}") from e
        try:
            decoded = json.loads(raw) if raw.strip() else None
        except ValueError:
            decoded = raw.decode(errors="replace")
        return status, decoded

    async def get(self, path: str) -> Any:
        """The config at ``path``; ``None`` when it does not exist."""
        status, body = await self.request("GET", path)
        if status in (404, 400):  # unknown @id / invalid traversal path
            return None
        _check(status, body, "GET", path)
        return body

    async def send(self, method: str, path: str, body: Any) -> None:
        status, resp = await self.request(method, path, body)
        _check(status, resp, method, path)


def _check(status: int, body: Any, method: str, path: str) -> None:
    if status >= 300:
        detail = body.get("error") if isinstance(body, dict) else body
        raise CaddyError(f"Caddy refused {method} {path}: HTTP {status}: {detail}")


def ui_root(config: Config, environ: Mapping[str, str] = os.environ) -> Path:
    """Where lovd keeps OpenCode's UI files for Caddy (lovd/web/assets.py): systemd's
    cache directory (units/lovd.service: 0755, readable by Caddy's user, unlike the 0750
    state directory), else ``<state_dir>/ui``."""
    cache = environ.get("CACHE_DIRECTORY", "").split(":")[0]
    return Path(cache) / "ui" if cache else config.state_path / "ui"


def auth_socket_path(config: Config, listen: str) -> str:
    """``caddy.auth_socket``, else ``auth.sock`` beside the API's unix socket."""
    if config.caddy_auth_socket:
        return config.caddy_auth_socket
    kind, _, where = listen.partition(":")
    if kind == "unix":
        return str(Path(where).with_name("auth.sock"))
    return str(config.secrets_path / "auth.sock")


class CaddyManager:
    """Keeps lovd's server in Caddy's config; see the module docstring for the contract."""

    @classmethod
    def from_config(
        cls, config: Config, auth_socket: str, host_key: bytes | None = None
    ) -> CaddyManager | None:
        """None when lovd does not manage Caddy (``caddy.admin`` empty). The host key
        (for the gate key) is read from the state directory unless given."""
        if not config.caddy_admin:
            return None
        if host_key is None:
            host_key = load_host_key(config.state_path)
        site = Site(
            name=config.caddy_server,
            listen=tuple(config.caddy_listen),
            auth_socket=auth_socket,
            public_url=config.public_url,
            gate_key=gate_key(host_key),
            assets_dir=str(ui_root(config) / "www"),
            tls=config.caddy_tls,
        )
        return cls(CaddyAdmin(config.caddy_admin), site, config.caddy_check_interval)

    def __init__(self, admin: CaddyAdmin, site: Site, interval: float = 1.0) -> None:
        self.admin = admin
        self.site = site
        self.desired = render_server(site)
        self.interval = interval
        self.ok = False
        self.detail = "not checked yet"
        self.applies = 0  # how many writes (= Caddy reloads) lovd caused
        self.last_apply_seconds = 0.0
        self._task: asyncio.Task[None] | None = None

    async def current(self) -> Any:
        return await self.admin.get(f"/id/{self.site.name}")

    async def apply(self) -> bool:
        """Make Caddy's copy of lovd's server equal to ``desired``. True when it wrote."""
        current = await self.current()
        if current == self.desired:
            return False
        t0 = time.monotonic()
        if current is not None:
            await self.admin.send("PATCH", f"/id/{self.site.name}", self.desired)
        else:
            await self._create(self.desired)
        self.applies += 1
        self.last_apply_seconds = time.monotonic() - t0
        if await self.current() != self.desired:
            raise CaddyError(
                f"Caddy accepted lovd's server '{self.site.name}' but reads back something else"
            )
        return True

    async def _create(self, server: dict[str, Any]) -> None:
        """POST sets the object at a path, but the parent must exist: a freshly started
        Caddy may have no ``apps`` at all, so create the shallowest missing level."""
        name = self.site.name
        get = self.admin.get
        if await get("/config/apps/http/servers") is not None:
            await self.admin.send("POST", f"/config/apps/http/servers/{name}", server)
        elif await get("/config/apps/http") is not None:
            await self.admin.send("POST", "/config/apps/http/servers", {name: server})
        elif await get("/config/apps") is not None:
            await self.admin.send("POST", "/config/apps/http", {"servers": {name: server}})
        else:
            await self.admin.send("POST", "/config/apps", {"http": {"servers": {name: server}}})

    async def remove(self) -> None:
        """Delete lovd's server (an operator action; lovd never does this on its own)."""
        status, body = await self.admin.request("DELETE", f"/id/{self.site.name}")
        if status not in (200, 404):
            _check(status, body, "DELETE", f"/id/{self.site.name}")

    async def check(self) -> None:
        """One round of the loop: verify, re-apply when needed, record health."""
        try:
            wrote = await self.apply()
        except CaddyError as e:
            if self.ok or self.detail == "not checked yet":
                log.warning("Caddy: %s (retrying every %.1f s)", e, self.interval)
            self.ok, self.detail = False, str(e)
            return
        if wrote:
            log.info(
                "Caddy: applied lovd's server '%s' on %s (%.0f ms)",
                self.site.name,
                ", ".join(self.site.listen),
                self.last_apply_seconds * 1000,
            )
        elif not self.ok:
            log.info("Caddy: lovd's server '%s' is in place", self.site.name)
        if self.site.tls and not await self._has_certificates():
            detail = (
                "caddy.tls is on but Caddy has no certificate to serve: browsers cannot "
                "connect; load one in Caddy's own config (apps.tls.certificates, e.g. "
                "load_files) or set caddy.tls false"
            )
            if self.ok or self.detail != detail:
                log.warning("Caddy: %s", detail)
            self.ok, self.detail = False, detail
            return
        self.ok, self.detail = True, f"server '{self.site.name}' on {', '.join(self.site.listen)}"

    async def _has_certificates(self) -> bool:
        """Whether Caddy's tls app (the operator's, never written by lovd) loads or
        manages any certificate lovd's TLS server could serve."""
        try:
            loaded = await self.admin.get("/config/apps/tls/certificates")
            managed = await self.admin.get("/config/apps/tls/automation/policies")
        except CaddyError:
            return True  # unknown: the server check above reports an unreachable Caddy
        return bool(loaded) or bool(managed)

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="caddy-manager")

    async def close(self) -> None:
        """Stop the loop. lovd's server stays in Caddy: a restarting lovd keeps its routes."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.admin.close()

    async def health(self) -> tuple[bool, str]:
        return self.ok, self.detail
