"""Browser routing across hosts: N lovd hosts, one front Caddy, one PostgreSQL.

Every host runs its own Caddy site (the one lovd pushes) and publishes where other
hosts reach it as ``postgres.upstream`` (HOST:PORT, on the hosts' private network).
Browsers talk to one front Caddy, which is simply one of the hosts' own Caddy. For a
request whose session the front host does not have, its gate asks
:meth:`lovd.sync.hosts.Hosts.upstream_for` and:

- **forward_auth** (``BrowserGate.auth``): answers 204 with ``X-Lovd-Upstream: <owner's
  upstream>`` and *no* container password (:func:`elsewhere`). The front Caddy then
  proxies the request, cookie and all, to the owning host's Caddy, whose own
  forward_auth asks the owning lovd: it checks the cookie against the token hash only
  it holds, records activity, wakes the session, adds the container password, and
  streams (both Caddys use ``flush_interval -1``). The front never learns more than
  which host owns a session id.
- **the link** ``/c/{id}?token=…`` (``Public.entry``): relays the request to the owning
  host's Caddy (:func:`forward_entry`) and returns its answer (303 + the session
  cookie) unchanged, so the token is checked where its hash lives.

Hooks (in lovd/web/, not here): in ``BrowserGate.auth`` and ``Public.entry``, when the
cookie's or link's session id is not in the local store and
``gate.route_elsewhere`` (lovd/wiring.py gives it ``sync.hosts.upstream_for``) returns an
upstream, answer with :func:`elsewhere` / :func:`forward_entry` before the token is
checked (a session of another host is not a failed login here).

All hosts must share ``public_url`` (the front's Host header reaches the owner's Caddy
unchanged) and trust PostgreSQL: whoever can write ``lovd_hosts.upstream`` decides
where browsers of other hosts' sessions are sent. A host without a recent heartbeat
still gets its sessions' traffic (an idle-exited lovd is started by its socket; a host
that is really down costs its users a retryable error, not their cookie).
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from lovd.caddy import UPSTREAM_HEADER
from lovd.errors import LovdError

log = logging.getLogger(__name__)

ENTRY_TIMEOUT = aiohttp.ClientTimeout(total=10)


def elsewhere(upstream: str) -> web.Response:
    """The forward_auth answer for a session another host owns: proxy there, as is."""
    return web.Response(
        status=204, headers={UPSTREAM_HEADER: upstream, "Cache-Control": "no-store"}
    )


async def forward_entry(
    upstream: str,
    request: web.Request,
    http: aiohttp.ClientSession | None = None,
    *,
    path_qs: str = "",
) -> web.Response:
    """Relay ``/c/{id}?token=…`` to the owning host's Caddy; its answer goes back as is
    (status, Location, Set-Cookie). A host that does not answer is LovdError
    ``unavailable`` (503 + Retry-After; rendered by web/problems.py, a page for a browser).
    Without ``http`` a client is made for the call (a link is opened once per user).
    Never with the browser's cookie: the front host already asked whether the link
    would replace a live session (web/public.py); ``path_qs`` is the link when the
    request was the confirmed switch (a POST)."""
    if http is None:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as own:
            return await forward_entry(upstream, request, own, path_qs=path_qs)
    headers = {
        "Host": request.host,
        "X-Forwarded-For": request.headers.get("X-Forwarded-For", request.remote or ""),
        "X-Forwarded-Proto": request.headers.get("X-Forwarded-Proto", request.scheme),
        "Accept": request.headers.get("Accept", "*/*"),
        "Accept-Language": request.headers.get("Accept-Language", ""),
    }
    url = f"http://{upstream}{path_qs or request.path_qs}"
    try:
        async with http.get(
            url, headers=headers, allow_redirects=False, timeout=ENTRY_TIMEOUT
        ) as r:
            body = await r.read()
            out = web.Response(status=r.status, body=body)
            for name in ("Location", "Content-Type", "Cache-Control", "Retry-After"):
                if name in r.headers:
                    out.headers[name] = r.headers[name]
            for cookie in r.headers.getall("Set-Cookie", []):
                out.headers.add("Set-Cookie", cookie)
            return out
    except (aiohttp.ClientError, TimeoutError) as e:
        log.warning("browser routing: the owning host at %s did not answer: %s", upstream, e)
        raise LovdError(
            "unavailable",
            "the server that holds this session does not answer; try again shortly",
            retry_after=5,
        ) from e
