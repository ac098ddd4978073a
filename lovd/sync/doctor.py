"""``lovd doctor``'s PostgreSQL checks: the DSN, the server, the schema, this host's sync."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import time

import psycopg

from lovd.config import Config
from lovd.report import Check
from lovd.sync import schema
from lovd.sync.claim import META_EPOCH
from lovd.sync.pool import connect, describe

MIN_SERVER = 110000  # ON CONFLICT, make_interval, to_regclass: PostgreSQL 11 is plenty
LAG_WARN = 60.0


def _local_outbox(config: Config) -> tuple[int, float | None, int | None] | None:
    """(backlog, oldest change, our epoch) read-only from SQLite; None without a store."""
    if not config.db_path.exists():
        return None
    try:
        uri = f"{config.db_path.as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=2)) as db:
            n, oldest = db.execute("SELECT COUNT(*), MIN(created_at) FROM outbox").fetchone()
            row = db.execute("SELECT value FROM meta WHERE key = ?", (META_EPOCH,)).fetchone()
    except sqlite3.Error:
        return None
    return int(n), (float(oldest) if oldest is not None else None), (int(row[0]) if row else None)


async def checks(config: Config) -> list[Check]:
    if not config.postgres_dsn:
        return [Check("postgres", "ok", "not configured (postgres.dsn empty): no sync")]
    target = describe(config.postgres_dsn)
    try:
        conn = await connect(config.postgres_dsn, config.postgres_connect_timeout)
    except (psycopg.Error, OSError, TimeoutError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [
            Check(
                "postgres",
                "fail",
                f"cannot connect to {target}: {msg}",
                "check postgres.dsn (host, port, dbname, user; password in a passfile), "
                "that the server runs and that pg_hba.conf admits this host and user",
            )
        ]
    out: list[Check] = []
    host_id = config.host_id or socket.gethostname()
    try:
        server = conn.info.server_version
        ver = f"{server // 10000}.{server % 10000}"
        if server < MIN_SERVER:
            out.append(Check("postgres", "fail", f"{target}: PostgreSQL {ver} is too old",
                             "use PostgreSQL 11 or newer"))  # fmt: skip
        else:
            out.append(Check("postgres", "ok", f"{target}: PostgreSQL {ver}"))
        found = await schema.current_version(conn)
        if found == schema.VERSION:
            out.append(Check("postgres-schema", "ok", f"schema version {found}"))
        elif found > schema.VERSION:
            out.append(Check("postgres-schema", "fail",
                             f"schema version {found} is newer than this lovd ({schema.VERSION})",
                             "upgrade lovd on this host"))  # fmt: skip
        else:
            out.append(Check("postgres-schema", "warn",
                             f"schema version {found}, lovd wants {schema.VERSION}",
                             "start lovd: it migrates the schema itself"))  # fmt: skip
        host = None
        if found:
            cur = await conn.execute(
                "SELECT epoch, extract(epoch FROM now() - heartbeat_at)::float8 "
                "FROM lovd_hosts WHERE host_id = %s",
                (host_id,),
            )
            host = await cur.fetchone()
    finally:
        await conn.close()
    out.append(_sync_check(config, host_id, host))
    return out


def _sync_check(config: Config, host_id: str, host: tuple[int, float] | None) -> Check:
    local = _local_outbox(config)
    if local is None:
        return Check("postgres-sync", "warn", f"no local store at {config.db_path} to compare")
    backlog, oldest, mine = local
    lag = time.time() - oldest if oldest is not None else 0.0
    state = f"backlog {backlog} change(s), lag {lag:.1f} s"
    if host is None:
        return Check(
            "postgres-sync",
            "warn",
            f"host_id {host_id!r} has no row in PostgreSQL yet; {state}",
            "start lovd with postgres.dsn set (it registers the host on its first sync)",
        )
    epoch, age = int(host[0]), float(host[1])
    if mine is not None and mine != epoch:
        return Check(
            "postgres-sync",
            "fail",
            f"fenced: host_id {host_id!r} is at epoch {epoch} in PostgreSQL, this store at "
            f"{mine}; this lovd no longer writes there ({state})",
            "another lovd runs under this host_id: stop one, or give each its own host_id",
        )
    beat = f"last heartbeat {age:.0f} s ago"
    if lag > LAG_WARN or age > config.postgres_host_stale_after:
        return Check(
            "postgres-sync",
            "warn",
            f"behind: {state}, {beat}",
            "is lovd running? its log (journalctl -u lovd) says why PostgreSQL is not reached",
        )
    return Check("postgres-sync", "ok", f"{state}, epoch {epoch}, {beat}")
