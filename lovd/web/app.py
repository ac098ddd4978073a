"""The aiohttp application: the session API, health, metrics, OpenAPI and the browser entry.

``create_app`` takes every dependency explicitly; nothing here is global.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml
from aiohttp import web

from lovd import ids
from lovd.errors import LovdError
from lovd.log import request_id
from lovd.metrics import Metrics
from lovd.session.lifecycle import Sessions
from lovd.sync.service import Sync
from lovd.web.gate import BrowserGate
from lovd.web.problems import from_http, internal, problem
from lovd.web.public import add_browser_entry

log = logging.getLogger(__name__)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HealthCheck = Callable[[], Awaitable[tuple[bool, str]]]


class Requests:
    """When lovd last answered a request (the API, the browser path, the broker): what
    ``idle_exit`` measures. Made by the build and given to everything that serves."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def seen(self) -> None:
        self.last = time.monotonic()


@dataclass
class AppState:
    sessions: Sessions
    metrics: Metrics
    public_url: str
    max_body: int
    health_checks: dict[str, HealthCheck] = field(default_factory=dict)
    requests: Requests = field(default_factory=Requests)
    version: str = "0"
    usage: Callable[[str], dict[str, int]] | None = None
    sync: Sync | None = None  # PostgreSQL sync (postgres.dsn); None when off


LIVEZ = "/api/livez"
STATE: web.AppKey[AppState] = web.AppKey("lovd", AppState)
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi", dict)


# What answers only once the start-up reconcile is done (health, metrics and the OpenAPI
# description answer at once).
_ABOUT_SESSIONS = ("/api/sessions", "/api/cleanup", "/c/")


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    st = request.app[STATE]
    if request.path != LIVEZ:  # a liveness probe is no reason to stay up (idle_exit)
        st.requests.seen()
    rid = request.headers.get("X-Request-Id", "")
    if not (0 < len(rid) <= 64 and rid.isascii() and rid.replace("-", "").isalnum()):
        rid = secrets.token_hex(8)
    token = request_id.set(rid)
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    status = 500
    try:
        if request.path.startswith(_ABOUT_SESSIONS):
            await st.sessions.wait_ready()  # the start-up reconcile (bounded, then 503)
        if request.content_length is not None and request.content_length > st.max_body:
            raise LovdError(
                "body-too-large",
                f"request body of {request.content_length} bytes exceeds max_body "
                f"({st.max_body} bytes)",
            )
        resp = await handler(request)
        status = resp.status
        resp.headers["X-Request-Id"] = rid
        return resp
    except LovdError as e:
        status = e.status
        resp = problem(e, request.path)
    except web.HTTPRequestEntityTooLarge as e:
        status = 413
        resp = problem(
            LovdError("body-too-large", f"request body exceeds max_body ({st.max_body} bytes)"),
            request.path,
        )
        del e
    except web.HTTPException as e:
        if e.status < 400:
            raise
        status = e.status
        resp = problem(from_http(e, request), request.path)
        if "Allow" in e.headers:  # RFC 9110: a 405 lists the methods the resource has
            resp.headers["Allow"] = e.headers["Allow"]
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        resp = problem(internal(rid), request.path)
    finally:
        request_id.reset(token)
        st.metrics.requests.labels(request.method, route_name, str(status)).inc()
    resp.headers["X-Request-Id"] = rid
    return resp


def _query(request: web.Request, name: str, allowed: tuple[str, ...]) -> str | None:
    """The one value of query parameter ``name``, refused unless it is one of ``allowed``."""
    values = request.query.getall(name, [])
    if not values:
        return None
    if len(values) > 1 or values[0] not in allowed:
        shown = ", ".join(repr(v[:40]) for v in values)
        raise LovdError(
            "bad-request",
            f"query parameter {name} must be one of {', '.join(allowed)}; got {shown}",
        )
    return values[0]


async def _json_body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    if request.content_type not in ("application/json", "application/octet-stream", ""):
        raise LovdError(
            "unsupported-media-type", f"expected application/json, got {request.content_type}"
        )
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise LovdError("invalid-json", f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise LovdError("bad-request", "request body must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise LovdError(
            "bad-request",
            f"unknown field(s): {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(allowed)) or 'none'}",
        )
    return body


async def create_session(request: web.Request) -> web.Response:
    st = request.app[STATE]
    query = _query(request, "wait", ("true", "false", "1", "0"))
    body = await _json_body(request, {"wait"})
    if "wait" in body and not isinstance(body["wait"], bool):
        raise LovdError("bad-request", f"wait must be true or false, got {body['wait']!r}")
    wait: bool = body.get("wait", query in (None, "true", "1"))
    # The cookie secret stays with lovd (a browser gets it for the link); the API hands
    # out the single-use link token (session/links.py).
    session, _ = await st.sessions.create(wait=wait)
    link = await st.sessions.new_link(session.id)
    data = st.sessions.get(session.id).public(st.public_url)
    data["token"] = link
    data["url"] = f"{data['url']}?token={link}"
    return web.json_response(data, status=201, headers={"Location": f"/api/sessions/{session.id}"})


async def new_link(request: web.Request) -> web.Response:
    """A fresh single-use link for a session (the old one stops working)."""
    st = request.app[STATE]
    await _json_body(request, set())
    sid = ids.check(request.match_info["id"])
    link = await st.sessions.new_link(sid)
    url = f"{st.public_url.rstrip('/')}/c/{sid}?token={link}"
    return web.json_response({"id": sid, "token": link, "url": url}, status=201)


async def list_sessions(request: web.Request) -> web.Response:
    st = request.app[STATE]
    scope = _query(request, "scope", ("local", "all")) or "local"
    local = [s.public(st.public_url) for s in st.sessions.all()]
    if scope == "local":
        return web.json_response({"sessions": local})
    if st.sync is None:
        # Sync is a setting that is off, not a fault: every host there is, is this one.
        rows = [dict(r, read_only=False, host_alive=True) for r in local]
        me = st.sessions.host_id
        return web.json_response({"sessions": rows, "hosts": [], "host_id": me, "sync": "off"})
    # Other hosts' rows as PostgreSQL last saw them (read-only here); ours from SQLite.
    me = st.sync.host_id
    hosts = await st.sync.hosts.hosts()
    alive = {h["host_id"]: h["alive"] for h in hosts}
    rows = [dict(r, read_only=False, host_alive=True) for r in local]
    rows += [
        dict(r, read_only=True, host_alive=alive.get(r["host_id"], False))
        for r in await st.sync.hosts.sessions(st.public_url)
        if r["host_id"] != me
    ]
    return web.json_response({"sessions": rows, "hosts": hosts, "host_id": me, "sync": "on"})


async def get_session(request: web.Request) -> web.Response:
    st = request.app[STATE]
    s = st.sessions.get(request.match_info["id"])
    data = s.public(st.public_url)
    if st.usage is not None:
        data["usage"] = st.usage(s.id)
    if _query(request, "history", ("1", "true", "0", "false")) in ("1", "true"):
        data.update(await st.sessions.history(s.id))
    return web.json_response(data)


async def session_health(request: web.Request) -> web.Response:
    st = request.app[STATE]
    return web.json_response(await st.sessions.health_report(request.match_info["id"]))


async def delete_session(request: web.Request) -> web.Response:
    st = request.app[STATE]
    sid = ids.check(request.match_info["id"])
    try:
        await st.sessions.delete(sid)
    except LovdError as e:
        if e.code == "session-not-found" and st.sync is not None:
            await st.sync.hosts.refuse_foreign(sid)  # another host's: say so
        raise
    return web.Response(status=204)


async def stop_session(request: web.Request) -> web.Response:
    """An operator's stop: the container goes, the workspace and the chat stay, and the
    session's next browser request wakes it (as an idle-stopped one). A stopped session
    is answered as it is."""
    st = request.app[STATE]
    await _json_body(request, set())
    sid = ids.check(request.match_info["id"])
    try:
        s = await st.sessions.stop(sid, reason="stopped by request")
    except LovdError as e:
        if e.code == "session-not-found" and st.sync is not None:
            await st.sync.hosts.refuse_foreign(sid)  # another host's: say so
        raise
    return web.json_response(s.public(st.public_url))


async def cleanup(request: web.Request) -> web.Response:
    st = request.app[STATE]
    await _json_body(request, set())
    deleted = await st.sessions.cleanup()
    return web.json_response(
        {
            "removed": [sid for sid, _ in deleted],
            "deleted": [{"id": sid, "reason": why} for sid, why in deleted],
        }
    )


async def health(request: web.Request) -> web.Response:
    st = request.app[STATE]
    checks: dict[str, dict[str, Any]] = {}
    ok_all = True
    for name, check in st.health_checks.items():
        try:
            ok, detail = await check()
        except Exception as e:  # noqa: BLE001 - a failing check is a result, not a crash
            ok, detail = False, f"{type(e).__name__}: {e}"
        checks[name] = {"ok": ok, "detail": detail}
        ok_all = ok_all and ok
    body = {
        "status": "ok" if ok_all else "degraded",
        "version": st.version,
        "checks": checks,
        "sessions": {
            "running": st.sessions.running_count(),
            "total": len(st.sessions.all()),
            "limit": st.sessions.limit,
        },
    }
    if st.sync is not None:
        body["sync"] = st.sync.status()
    return web.json_response(body, status=200 if ok_all else 503)


async def livez(request: web.Request) -> web.Response:
    """Liveness: the process answers. Nothing it depends on is asked, so a monitor that
    restarts lovd on failure never restarts a working daemon for a floor or PostgreSQL."""
    st = request.app[STATE]
    return web.json_response(
        {"status": "alive", "version": st.version}, headers={"Cache-Control": "no-store"}
    )


async def metrics(request: web.Request) -> web.Response:
    st = request.app[STATE]
    resp = web.Response(body=st.metrics.render())
    resp.content_type = "text/plain"
    resp.charset = "utf-8"
    resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    return resp


def load_openapi() -> dict[str, Any]:
    text = resources.files("lovd.web").joinpath("openapi.yaml").read_text()
    # libyaml when present: the pure-Python loader takes tens of ms for this file.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    doc: dict[str, Any] = yaml.load(text, Loader=loader)  # noqa: S506 (a safe loader)
    return doc


async def openapi(request: web.Request) -> web.Response:
    # Parsed on first request, not at start-up: a socket-activated start should answer
    # its first request as soon as it can.
    doc = request.app[OPENAPI]
    if not doc:
        doc.update(load_openapi())
    return web.json_response(doc)


def create_app(
    *,
    sessions: Sessions,
    gate: BrowserGate,
    metrics_: Metrics,
    public_url: str,
    max_body: int,
    health_checks: dict[str, HealthCheck] | None = None,
    version: str = "0",
    usage: Callable[[str], dict[str, int]] | None = None,
    sync: Sync | None = None,
    requests: Requests | None = None,
) -> web.Application:
    app = web.Application(middlewares=[middleware], client_max_size=max_body)
    app[STATE] = AppState(
        sessions=sessions,
        metrics=metrics_,
        public_url=public_url,
        max_body=max_body,
        health_checks=health_checks or {},
        version=version,
        usage=usage,
        sync=sync,
        requests=requests or Requests(),
    )
    app[OPENAPI] = {}  # filled by the first GET /api/openapi.json
    app.router.add_post("/api/sessions", create_session)
    app.router.add_get("/api/sessions", list_sessions)
    app.router.add_get("/api/sessions/{id}", get_session)
    app.router.add_get("/api/sessions/{id}/health", session_health)
    app.router.add_delete("/api/sessions/{id}", delete_session)
    app.router.add_post("/api/sessions/{id}/link", new_link)
    app.router.add_post("/api/sessions/{id}/stop", stop_session)
    app.router.add_post("/api/cleanup", cleanup)
    app.router.add_get("/api/health", health)  # readiness: floors, PostgreSQL, reconcile
    app.router.add_get("/api/readyz", health)
    app.router.add_get(LIVEZ, livez)
    app.router.add_get("/api/openapi.json", openapi)
    app.router.add_get("/metrics", metrics)
    add_browser_entry(app, gate)  # /c/{id}: the public socket's gate (web/public.py)
    return app
