"""lovd's own PostgreSQL schema, created and migrated by lovd.

Migrations are numbered and applied in order, each in its own transaction, under a
transaction-scoped advisory lock: two hosts starting at once serialize on the lock,
and the second finds the work done (``lovd_schema`` records the version). A database
newer than this lovd is refused rather than written with an older idea of the
schema.

Never stored here: session tokens or their hashes, broker credential hashes,
container passwords. ``lovd_sessions`` is what a host needs to show and to restore
its sessions; the secrets stay in that host's SQLite and its ``host.key``.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key: "lovd" in ASCII, so other applications' locks don't collide.
LOCK_KEY = 0x6C6F7664

MIGRATIONS: list[str] = [
    # 1: hosts, sessions (one row per session, tombstones for deletions), events
    """
    CREATE TABLE lovd_hosts (
        host_id      text PRIMARY KEY,
        instance_id  text NOT NULL,
        epoch        bigint NOT NULL,
        upstream     text NOT NULL DEFAULT '',
        lovd_version text NOT NULL DEFAULT '',
        claimed_at   timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now(),
        applied_seq  bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE lovd_sessions (
        id            text PRIMARY KEY,
        host_id       text NOT NULL REFERENCES lovd_hosts (host_id),
        epoch         bigint NOT NULL,
        version       bigint NOT NULL,
        status        text NOT NULL,
        reason        text NOT NULL DEFAULT '',
        port          integer NOT NULL,
        container_id  text NOT NULL DEFAULT '',
        created_at    timestamptz NOT NULL,
        updated_at    timestamptz NOT NULL,
        expires_at    timestamptz NOT NULL,
        last_activity timestamptz NOT NULL,
        started_at    timestamptz,
        used_at       timestamptz,
        restarts      integer NOT NULL DEFAULT 0,
        synced_at     timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX lovd_sessions_host ON lovd_sessions (host_id) WHERE status <> 'deleted';
    CREATE INDEX lovd_sessions_tombstones ON lovd_sessions (updated_at)
        WHERE status = 'deleted';
    CREATE TABLE lovd_events (
        host_id    text NOT NULL,
        epoch      bigint NOT NULL,
        seq        bigint NOT NULL,
        session_id text NOT NULL,
        at         timestamptz NOT NULL,
        kind       text NOT NULL,
        status     text NOT NULL,
        detail     text NOT NULL DEFAULT '',
        PRIMARY KEY (host_id, epoch, seq)
    );
    CREATE INDEX lovd_events_at ON lovd_events (at);
    CREATE INDEX lovd_events_session ON lovd_events (session_id, at);
    """,
]

VERSION = len(MIGRATIONS)


class SchemaError(Exception):
    """The database's schema cannot be used by this lovd; the message says why."""


async def current_version(conn: psycopg.AsyncConnection[Any]) -> int:
    """The schema version in the database (0: none). Read-only."""
    cur = await conn.execute("SELECT to_regclass('lovd_schema') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not row[0]:
        return 0
    cur = await conn.execute("SELECT version FROM lovd_schema")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def migrate(conn: psycopg.AsyncConnection[Any]) -> int:
    """Bring the schema to :data:`VERSION`; returns the version found before."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        await conn.execute("CREATE TABLE IF NOT EXISTS lovd_schema (version integer NOT NULL)")
        cur = await conn.execute("SELECT version FROM lovd_schema FOR UPDATE")
        row = await cur.fetchone()
        if row is None:
            await conn.execute("INSERT INTO lovd_schema (version) VALUES (0)")
        before = int(row[0]) if row else 0
        if before > VERSION:
            raise SchemaError(
                f"the PostgreSQL schema is version {before}, newer than this lovd's "
                f"({VERSION}): upgrade lovd on this host (another host already did)"
            )
        for i, script in enumerate(MIGRATIONS[before:], start=before + 1):
            log.info("migrating the PostgreSQL schema to version %d", i)
            await conn.execute(script.encode())
            await conn.execute("UPDATE lovd_schema SET version = %s", (i,))
    return before
