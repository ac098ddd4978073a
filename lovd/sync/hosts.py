"""Cross-host reads from PostgreSQL: every host's sessions, who owns one, where it lives.

Read-only and bounded in time (``postgres.read_timeout``): these run while a request
waits, so a slow or absent PostgreSQL turns into a clear 503, never a hang. A host
whose heartbeat is older than ``postgres.host_stale_after`` is shown as not alive.

Browser routing across hosts (N hosts, one front Caddy): every host's lovd is the
front Caddy's forward_auth for requests whose session it owns. For a session it does
not own, the gate asks :meth:`Hosts.upstream_for`, which answers the owning host's
``postgres.upstream`` (that host's own Caddy site, reachable from the front), and
sends it as the upstream: the front Caddy proxies the request there unchanged, and
the owner's Caddy and lovd authenticate the cookie, wake the session and stream as
for any local request. Tokens therefore never leave their host.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from lovd.errors import LovdError
from lovd.sync.pool import Pool

log = logging.getLogger(__name__)

ROUTE_CACHE_SECONDS = 2.0


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


LIST = """
SELECT s.id, s.host_id, s.status, s.reason, s.port, s.container_id,
    extract(epoch FROM s.created_at)::float8, extract(epoch FROM s.updated_at)::float8,
    extract(epoch FROM s.expires_at)::float8, extract(epoch FROM s.last_activity)::float8,
    s.restarts, s.used_at IS NOT NULL, s.version
FROM lovd_sessions s WHERE s.status NOT IN ('deleted', 'warm') ORDER BY s.created_at
"""

HOSTS = """
SELECT host_id, epoch, upstream, lovd_version, extract(epoch FROM heartbeat_at)::float8,
    extract(epoch FROM now())::float8
FROM lovd_hosts ORDER BY host_id
"""

OWNER = """
SELECT s.host_id, h.upstream, extract(epoch FROM now() - h.heartbeat_at)::float8
FROM lovd_sessions s JOIN lovd_hosts h USING (host_id)
WHERE s.id = %s AND s.status NOT IN ('deleted', 'warm')
"""


@dataclass(frozen=True)
class Owner:
    host_id: str
    upstream: str
    alive: bool


class Hosts:
    def __init__(self, pool: Pool, host_id: str, read_timeout: float, stale_after: float) -> None:
        self.pool = pool
        self.host_id = host_id
        self.read_timeout = read_timeout
        self.stale_after = stale_after
        self._routes: dict[str, tuple[float, str | None]] = {}
        self._strays: set[asyncio.Future[list[tuple[Any, ...]]]] = set()

    def _forget(self, task: asyncio.Future[list[tuple[Any, ...]]]) -> None:
        self._strays.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an abandoned read's failure is no news

    async def _run(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql.encode(), params)
            return list(await cur.fetchall())

    async def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One read within ``read_timeout``, retried once on a fresh connection (a pooled
        one may predate a PostgreSQL restart); any failure becomes a 503 that says what
        to do. A read that overruns is left to finish in the background: cancelling a
        query on a hung server takes psycopg up to 10 s, and the request must not wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        last: BaseException | None = None
        for _ in range(2):
            task = asyncio.ensure_future(self._run(sql, params))
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
            if not done:
                task.cancel()
                self._strays.add(task)
                task.add_done_callback(self._forget)
                last = TimeoutError(f"no answer within {self.read_timeout:g} s")
                break
            try:
                return task.result()
            except (psycopg.Error, OSError, TimeoutError) as e:
                last = e
        raise LovdError(
            "unavailable",
            f"PostgreSQL cannot be read ({type(last).__name__}: {str(last).strip()[:200]}); "
            "other hosts' sessions are shown only while it answers. This host's own "
            "sessions: GET /api/sessions without scope=all",
            retry_after=5,
        ) from last

    async def hosts(self) -> list[dict[str, Any]]:
        out = []
        for host_id, epoch, upstream, version, beat, now in await self._query(HOSTS):
            out.append(
                {
                    "host_id": host_id,
                    "epoch": int(epoch),
                    "upstream": upstream,
                    "version": version,
                    "heartbeat_at": _iso(beat),
                    "heartbeat_age": round(now - beat, 1),
                    "alive": now - beat <= self.stale_after,
                }
            )
        return out

    async def sessions(self, public_url: str) -> list[dict[str, Any]]:
        """Every host's live sessions as PostgreSQL last saw them, in the API's shape."""
        rows = []
        for r in await self._query(LIST):
            (sid, host_id, status, reason, port, cid, created, updated, expires, activity,
             restarts, used, version) = r  # fmt: skip
            rows.append(
                {
                    "id": sid,
                    "status": status,
                    "reason": reason,
                    "url": f"{public_url.rstrip('/')}/c/{sid}",
                    "container_id": cid,
                    "port": int(port),
                    "host_id": host_id,
                    "created_at": _iso(created),
                    "updated_at": _iso(updated),
                    "expires_at": _iso(expires),
                    "last_activity": _iso(activity),
                    "restarts": int(restarts),
                    "used": bool(used),
                    "version": int(version),
                }
            )
        return rows

    async def owner(self, session_id: str) -> Owner | None:
        rows = await self._query(OWNER, (session_id,))
        if not rows:
            return None
        host_id, upstream, age = rows[0]
        return Owner(str(host_id), str(upstream), float(age) <= self.stale_after)

    async def refuse_foreign(self, session_id: str) -> None:
        """Raise a clear refusal if ``session_id`` belongs to another host (a write to it
        must go to that host); return if PostgreSQL knows no other owner."""
        try:
            owner = await self.owner(session_id)
        except LovdError:
            return  # PostgreSQL down: the caller's own "not found" stands
        if owner is None or owner.host_id == self.host_id:
            return
        raise LovdError(
            "conflict",
            f"session {session_id} belongs to host {owner.host_id!r}, not this one "
            f"({self.host_id!r}); sessions of other hosts are read-only here. Send the request "
            f"to {owner.host_id!r}'s lovd API",
            extra={"owner_host_id": owner.host_id, "owner_alive": owner.alive},
        )

    async def upstream_for(self, session_id: str) -> str | None:
        """The browser-routing resolver for the gate (lovd/web/gate.py, lovd/web/public.py).

        For a session this host does not have: the owning host's ``postgres.upstream``
        (HOST:PORT of its Caddy site, as the front Caddy dials it) when another host owns
        it, else None (the gate then answers as for an unknown session). A host without
        a recent heartbeat still gets its sessions' requests: its lovd may only have
        exited when idle (its Caddy and socket activation answer), and if it is really
        down the browser gets a retryable error and keeps its cookie, instead of being
        told its session no longer exists.
        Cached for a couple of seconds, so a page's burst of requests costs one query;
        never raises (PostgreSQL down means None).
        """
        now = time.monotonic()
        hit = self._routes.get(session_id)
        if hit is not None and now - hit[0] < ROUTE_CACHE_SECONDS:
            return hit[1]
        try:
            owner = await self.owner(session_id)
        except LovdError as e:
            log.warning("browser routing: %s", e.message)
            return None
        upstream = None
        if owner is not None and owner.host_id != self.host_id:
            upstream = owner.upstream or None
        if len(self._routes) > 10_000:
            self._routes.clear()
        self._routes[session_id] = (now, upstream)
        return upstream
