"""Restore: rebuild a lost SQLite store from PostgreSQL's rows for this host.

What comes back: every live session of this ``host_id`` with its status, port, times
and version, and the SQLite instance id its containers are labelled with, so the
start-up reconcile re-adopts the containers still running and marks the others
stopped (they wake on their next request, workspace intact).

What cannot come back: session tokens. PostgreSQL never holds them or their hashes
(anyone who can read PostgreSQL, or a backup of it, must not learn anything that lets
them into a session). So a restored session has no valid link: ``lovd restore``
prints a fresh link per session for the operator to hand to its user; after an
automatic restore at start-up the old links answer "this session does not exist (any
more)" and users start a new session (or the operator re-runs the restore by hand,
see the README). The container password is derived from ``host.key``, which lives
next to lovd.db: if it is lost too, restored containers reject lovd's password until
they are started again (docs/postgres-sync.md).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from lovd import ids
from lovd.config import Config
from lovd.session import machine
from lovd.session.machine import restored
from lovd.session.model import Session
from lovd.store import Store
from lovd.sync.claim import META_EPOCH
from lovd.sync.pool import Conn, connect

log = logging.getLogger(__name__)

SELECT = """
SELECT id, status, reason, port, container_id, extract(epoch FROM created_at)::float8,
    extract(epoch FROM updated_at)::float8, extract(epoch FROM expires_at)::float8,
    extract(epoch FROM last_activity)::float8,
    COALESCE(extract(epoch FROM started_at)::float8, 0), restarts, version,
    COALESCE(extract(epoch FROM used_at)::float8, 0)
FROM lovd_sessions WHERE host_id = %s AND status <> 'deleted' ORDER BY created_at
"""


class RestoreError(Exception):
    """Restore cannot run; the message says why and what to do."""


@dataclass
class Restored:
    count: int = 0
    instance_id: str = ""
    links: dict[str, str] = field(default_factory=dict)  # session id -> new token


async def _host_rows(conn: Conn, host_id: str) -> tuple[str, list[Session]]:
    cur = await conn.execute("SELECT to_regclass('lovd_hosts') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not row[0]:
        return "", []
    cur = await conn.execute("SELECT instance_id FROM lovd_hosts WHERE host_id = %s", (host_id,))
    host = await cur.fetchone()
    if host is None:
        return "", []
    cur = await conn.execute(SELECT, (host_id,))
    sessions = []
    for r in await cur.fetchall():
        (sid, status, reason, port, cid, created, updated, expires, activity, started,
         restarts, version, used) = r  # fmt: skip
        # The row as PostgreSQL recorded it (a copy, no transition; machine.py checks
        # that its state is one lovd knows).
        try:
            sessions.append(
                restored({
                    "id": str(sid), "status": str(status), "reason": str(reason),
                    "token_hash": "", "port": int(port), "container_id": str(cid),
                    "host_id": host_id, "created_at": created, "updated_at": updated,
                    "expires_at": expires, "last_activity": activity, "started_at": started,
                    "restarts": int(restarts), "version": int(version), "used_at": used,
                    "broker_hash": "", "link_hash": "",
                })
            )  # fmt: skip
        except ValueError as e:
            raise RestoreError(
                f"PostgreSQL holds session {sid} in state {status!r}, which this lovd does "
                "not know: upgrade lovd to the version that wrote it, then restore again"
            ) from e
    return str(host[0]), sessions


async def restore(
    store: Store, config: Config, host_id: str, *, new_links: bool, timeout: float | None = None
) -> Restored:
    """Fill ``store`` (which must be empty) with ``host_id``'s live sessions."""
    if store.all():
        raise RestoreError(
            f"the store {config.db_path} already holds {len(store.all())} session(s); restore "
            "only rebuilds an empty one (stop lovd and move lovd.db away first)"
        )
    conn = await connect(config.postgres_dsn, timeout or config.postgres_connect_timeout)
    try:
        instance, sessions = await _host_rows(conn, host_id)
    finally:
        await conn.close()
    out = Restored(instance_id=instance)
    if not sessions:
        return out
    if new_links:
        for i, s in enumerate(sessions):
            if not s.visible:  # a warm row: nobody's, no link
                continue
            # A single-use link (session/links.py); the cookie secret is made when the
            # link is used (this random one only marks the row as owned, not warm).
            token = ids.new_token()
            out.links[s.id] = token
            sessions[i] = dataclasses.replace(
                s,
                token_hash=ids.hash_token(ids.new_token()),
                link_hash=ids.hash_token(token),
                link_used_at=0.0,
            )
    detail = f"restored from PostgreSQL (host_id {host_id})"
    await machine.restore(store, sessions, instance, detail)
    out.count = len(sessions)
    log.info(
        "restored %d session(s) of host_id %s from PostgreSQL (instance %s)",
        out.count,
        host_id,
        instance,
    )
    return out


async def restore_if_lost(store: Store, config: Config, host_id: str) -> int:
    """At start-up: restore when this SQLite is brand new (never synced, nothing in it,
    nothing queued) and PostgreSQL has live sessions for this host. Any failure is
    logged and start-up goes on (the relay will then refuse to claim the host id
    rather than overwrite the rows a restore needs)."""
    if store.all() or (await store.outbox_stats())[0] or await store.meta_get(META_EPOCH):
        return 0
    try:
        done = await restore(store, config, host_id, new_links=False)
    except (OSError, TimeoutError, RestoreError) as e:
        log.warning("restore from PostgreSQL skipped: %s", e)
        return 0
    except Exception as e:  # noqa: BLE001 - psycopg errors: start without PostgreSQL
        log.warning("restore from PostgreSQL failed (%s: %s); starting empty", type(e).__name__, e)
        return 0
    return done.count
