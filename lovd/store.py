"""SQLite state: sessions, their event/health history, and the outbox.

SQLite (WAL, synchronous=FULL) is the local source of truth. lovd is its only
writer: every write takes one lock and one ``BEGIN IMMEDIATE`` transaction, and
every change to a session also appends an outbox row in that same transaction,
so a relay (PostgreSQL sync) can never miss or reorder a change, even across a
crash. Reads are served from an in-memory copy of the sessions table that is
updated only after a commit succeeds: it is derived state, rebuilt on open.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from lovd.session.model import Session, SessionState, iso

log = logging.getLogger(__name__)


_MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        token_hash TEXT NOT NULL,
        port INTEGER NOT NULL,
        container_id TEXT NOT NULL DEFAULT '',
        host_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        last_activity REAL NOT NULL,
        started_at REAL NOT NULL DEFAULT 0,
        restarts INTEGER NOT NULL DEFAULT 0,
        version INTEGER NOT NULL DEFAULT 1
    );
    CREATE UNIQUE INDEX sessions_port ON sessions(port);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX events_session ON events(session_id, seq);
    CREATE TABLE health (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL,
        ts REAL NOT NULL,
        ok INTEGER NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX health_session ON health(session_id, seq);
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        entity TEXT NOT NULL,
        key TEXT NOT NULL,
        version INTEGER NOT NULL,
        op TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 2: the credential broker (per-session credential hash, LLM/MCP usage) and the
    # first chat request (unused_timeout)
    """
    ALTER TABLE sessions ADD COLUMN used_at REAL NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN broker_hash TEXT NOT NULL DEFAULT '';
    CREATE TABLE usage (
        session_id TEXT PRIMARY KEY,
        llm_requests INTEGER NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        mcp_requests INTEGER NOT NULL DEFAULT 0,
        refused INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL DEFAULT 0
    );
    CREATE TABLE usage_daily (
        day TEXT PRIMARY KEY,
        tokens INTEGER NOT NULL DEFAULT 0
    );
    """,
    # 3: the session link's own single-use token (it used to be the cookie secret).
    # Rows from before keep their cookies; their old links (which carried the cookie
    # secret) stop working: `lovd session link ID` makes a new one.
    """
    ALTER TABLE sessions ADD COLUMN link_hash TEXT NOT NULL DEFAULT '';
    ALTER TABLE sessions ADD COLUMN link_used_at REAL NOT NULL DEFAULT 0;
    """,
]


_COLUMNS = [f.name for f in dataclasses.fields(Session)]


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    key: str  # session id
    version: int
    op: str  # upsert or delete
    payload: str  # JSON: the session's columns (no secrets) and the event name
    created_at: float


class StaleRow(Exception):
    """An ``update(expect=…)`` found the row in another state: someone else won."""


class Store:
    """One writer; reads from memory. Create with :meth:`open`."""

    def __init__(self, db: aiosqlite.Connection, instance_id: str) -> None:
        self._db = db
        self._lock = asyncio.Lock()
        self._sessions: dict[str, Session] = {}
        self.instance_id = instance_id
        # Set after every commit that wrote outbox rows: the PostgreSQL relay waits on it
        # (and clears it) instead of polling. Made here, with the store, so the relay is
        # given it rather than hooking itself into the store.
        self.outbox_written = asyncio.Event()

    @classmethod
    async def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA busy_timeout=5000")
            await db.execute("PRAGMA foreign_keys=ON")
            await _migrate(db)
            instance = await _instance_id(db)
        except BaseException:
            await db.close()
            raise
        store = cls(db, instance)
        await store._load()
        # The -wal and -shm files hold the same data as the database: same mode.
        for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                p.chmod(0o600)
        return store

    async def close(self) -> None:
        await self._db.close()

    async def _load(self) -> None:
        # Tombstones (a delete not finished yet, see tombstone()) are no live session.
        async with self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM sessions WHERE status <> ?", (SessionState.DELETED,)
        ) as cur:
            rows = await cur.fetchall()
        self._sessions = {r[0]: Session(*r) for r in rows}

    # --- reads (memory) ---

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def all(self) -> list[Session]:
        return sorted(self._sessions.values(), key=lambda s: s.created_at)

    def count(self, which: Callable[[Session], bool]) -> int:
        return sum(1 for s in self._sessions.values() if which(s))

    def used_ports(self) -> set[int]:
        return {s.port for s in self._sessions.values()}

    # --- writes ---

    async def insert(self, session: Session, event: str = "created") -> Session:
        async with self._tx() as db:
            await db.execute(
                f"INSERT INTO sessions ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
                dataclasses.astuple(session),
            )
            await self._record(db, session, "upsert", event, session.reason)
        self._sessions[session.id] = session
        self.outbox_written.set()
        return session

    async def update(
        self,
        session_id: str,
        *,
        event: str = "",
        expect: Iterable[str] | None = None,
        **changes: Any,
    ) -> Session:
        """Apply field ``changes`` to one session (a link, first use, a re-adopted container
        id); bumps version and updated_at. Never its state: that is a transition, written
        by lovd/session/machine.py only (through :meth:`write`). With ``expect``, only while
        the row's status is one of those, else ``StaleRow``."""
        if "status" in changes:
            raise ValueError("a session's state changes only through lovd/session/machine.py")
        check = None
        if expect is not None:
            wanted = set(expect)

            def check(current: Session) -> None:
                if current.status not in wanted:
                    raise StaleRow(f"session {session_id} is {current.status} now")

        return await self.write(session_id, changes, check=check, event=event)

    async def write(
        self,
        session_id: str,
        changes: dict[str, Any],
        *,
        check: Callable[[Session], None] | None = None,
        event: str = "",
    ) -> Session:
        """The one write of a row: ``check`` (which may raise to refuse, e.g. a lost
        compare-and-set) sees the row inside the write transaction, then ``changes`` are
        applied with the event row and the outbox row, all in that one transaction. The
        state machine (lovd/session/machine.py) is the only caller that changes
        ``status``; a refusal changes nothing."""
        async with self._tx() as db:
            current = self._sessions.get(session_id)
            if current is None:
                raise KeyError(session_id)
            if check is not None:
                check(current)
            changes = {"updated_at": time.time(), **changes}  # a caller may set it (restore)
            new = dataclasses.replace(current, version=current.version + 1, **changes)
            sets = ", ".join(f"{c} = ?" for c in _COLUMNS[1:])
            await db.execute(
                f"UPDATE sessions SET {sets} WHERE id = ?",
                (*dataclasses.astuple(new)[1:], session_id),
            )
            await self._record(db, new, "upsert", event or f"status:{new.status}", new.reason)
        self._sessions[session_id] = new
        self.outbox_written.set()
        return new

    async def delete(
        self,
        session_id: str,
        reason: str = "",
        *,
        check: Callable[[Session], None] | None = None,
    ) -> None:
        """Drop a row at once (a warm row nobody owns; machine.py decides)."""
        async with self._tx() as db:
            current = self._sessions.get(session_id)
            if current is None:
                return
            if check is not None:
                check(current)
            gone = _deleted(current, reason)
            await db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            await db.execute("DELETE FROM usage WHERE session_id = ?", (session_id,))
            await self._record(db, gone, "delete", "deleted", reason)
        del self._sessions[session_id]
        self.outbox_written.set()

    async def tombstone(
        self,
        session_id: str,
        reason: str = "",
        *,
        check: Callable[[Session], None] | None = None,
    ) -> bool:
        """The first step of a crash-safe delete. The row leaves the live sessions (API,
        gate, broker, admission, its port) and the outbox carries its one deletion to
        PostgreSQL, but it stays in SQLite as status 'deleted' until the container and the
        workspace are gone (:meth:`purge`): a crash in between leaves a tombstone the next
        reconcile finishes, never a stopped row whose history is gone. False: no such row."""
        async with self._tx() as db:
            current = self._sessions.get(session_id)
            if current is None:
                return False
            if check is not None:
                check(current)
            gone = _deleted(current, reason)
            # port = -rowid: unique and never a real port, so a new session may take it.
            await db.execute(
                "UPDATE sessions SET status = ?, reason = ?, updated_at = ?, "
                "version = ?, port = -rowid, token_hash = '', broker_hash = '' WHERE id = ?",
                (gone.status, reason, gone.updated_at, gone.version, session_id),
            )
            await db.execute("DELETE FROM usage WHERE session_id = ?", (session_id,))
            await self._record(db, gone, "delete", "deleted", reason)
        del self._sessions[session_id]
        self.outbox_written.set()
        return True

    async def tombstones(self) -> list[str]:
        """Sessions whose delete has not finished (:meth:`tombstone`)."""
        async with self._db.execute(
            "SELECT id FROM sessions WHERE status = ?", (SessionState.DELETED,)
        ) as cur:
            return [str(r[0]) for r in await cur.fetchall()]

    async def purge(self, session_id: str) -> None:
        """The last step of a delete: drop the tombstone (no outbox row: PostgreSQL saw the
        deletion when the tombstone was written)."""
        async with self._tx() as db:
            await db.execute(
                "DELETE FROM sessions WHERE id = ? AND status = ?",
                (session_id, SessionState.DELETED),
            )

    async def touch(self, activity: dict[str, float]) -> None:
        """Persist last-activity times in one transaction (no outbox: not a state change)."""
        live = {k: v for k, v in activity.items() if k in self._sessions}
        if not live:
            return
        async with self._tx() as db:
            await db.executemany(
                "UPDATE sessions SET last_activity = MAX(last_activity, ?) WHERE id = ?",
                [(ts, sid) for sid, ts in live.items()],
            )
        for sid, ts in live.items():
            s = self._sessions.get(sid)
            if s is not None and ts > s.last_activity:
                self._sessions[sid] = dataclasses.replace(s, last_activity=ts)

    async def history(self, session_id: str, limit: int = 50) -> dict[str, list[dict[str, Any]]]:
        async with self._db.execute(
            "SELECT ts, kind, detail FROM events WHERE session_id = ? ORDER BY seq DESC LIMIT ?",
            (session_id, limit),
        ) as cur:
            events = [{"at": iso(r[0]), "kind": r[1], "detail": r[2]} for r in await cur.fetchall()]
        async with self._db.execute(
            "SELECT ts, ok, detail FROM health WHERE session_id = ? ORDER BY seq DESC LIMIT ?",
            (session_id, limit),
        ) as cur:
            health = [
                {"at": iso(r[0]), "ok": bool(r[1]), "detail": r[2]} for r in await cur.fetchall()
            ]
        return {"events": events, "health": health}

    async def add_health(self, rows: list[tuple[str, float, bool, str]], keep: int) -> None:
        """Append probe results (session id, time, ok, detail) in one transaction and keep
        only the newest ``keep`` per session (no outbox: history, not state)."""
        live = [r for r in rows if r[0] in self._sessions]
        if not live:
            return
        async with self._tx() as db:
            await db.executemany(
                "INSERT INTO health (session_id, ts, ok, detail) VALUES (?, ?, ?, ?)",
                [(sid, ts, int(ok), detail) for sid, ts, ok, detail in live],
            )
            await db.executemany(
                "DELETE FROM health WHERE session_id = ? AND seq <= COALESCE((SELECT seq FROM "
                "health WHERE session_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?), -1)",
                [(sid, sid, keep) for sid in {r[0] for r in live}],
            )

    # --- LLM/MCP usage (the credential broker) ---

    async def load_usage(self) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
        """Per-session rows (llm_requests, input, output, mcp_requests, refused) and
        tokens per UTC day."""
        async with self._db.execute(
            "SELECT session_id, llm_requests, input_tokens, output_tokens, mcp_requests, "
            "refused FROM usage"
        ) as cur:
            rows = {r[0]: tuple(int(x) for x in r[1:]) for r in await cur.fetchall()}
        async with self._db.execute("SELECT day, tokens FROM usage_daily") as cur:
            days = {str(r[0]): int(r[1]) for r in await cur.fetchall()}
        return rows, days

    async def save_usage(
        self, rows: dict[str, tuple[int, int, int, int, int]], days: dict[str, int]
    ) -> None:
        """Write usage totals (absolute values, not deltas: a replay changes nothing)."""
        live = {sid: r for sid, r in rows.items() if sid in self._sessions}
        if not live and not days:
            return
        now = time.time()
        async with self._tx() as db:
            await db.executemany(
                "INSERT INTO usage (session_id, llm_requests, input_tokens, output_tokens, "
                "mcp_requests, refused, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(session_id) DO UPDATE SET llm_requests = excluded.llm_requests, "
                "input_tokens = excluded.input_tokens, output_tokens = excluded.output_tokens, "
                "mcp_requests = excluded.mcp_requests, refused = excluded.refused, "
                "updated_at = excluded.updated_at",
                [(sid, *r, now) for sid, r in live.items()],
            )
            await db.executemany(
                "INSERT INTO usage_daily (day, tokens) VALUES (?, ?) "
                "ON CONFLICT(day) DO UPDATE SET tokens = excluded.tokens",
                list(days.items()),
            )

    # --- outbox (consumed by the PostgreSQL relay) ---

    async def outbox_batch(self, limit: int = 500) -> list[tuple[int, str, str, int, str, str]]:
        async with self._db.execute(
            "SELECT seq, entity, key, version, op, payload FROM outbox ORDER BY seq LIMIT ?",
            (limit,),
        ) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def outbox_ack(self, upto_seq: int) -> None:
        async with self._tx() as db:
            await db.execute("DELETE FROM outbox WHERE seq <= ?", (upto_seq,))

    async def outbox_size(self) -> int:
        async with self._db.execute("SELECT COUNT(*) FROM outbox") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def outbox_read(self, limit: int) -> list[OutboxRow]:
        """The oldest unacknowledged outbox rows, in commit order."""
        async with self._db.execute(
            "SELECT seq, key, version, op, payload, created_at FROM outbox ORDER BY seq LIMIT ?",
            (limit,),
        ) as cur:
            return [
                OutboxRow(int(r[0]), str(r[1]), int(r[2]), str(r[3]), str(r[4]), float(r[5]))
                for r in await cur.fetchall()
            ]

    async def outbox_stats(self) -> tuple[int, float | None]:
        """(unacknowledged rows, created_at of the oldest) for sync lag and backlog."""
        async with self._db.execute("SELECT COUNT(*), MIN(created_at) FROM outbox") as cur:
            row = await cur.fetchone()
        if not row:
            return 0, None
        return int(row[0]), (float(row[1]) if row[1] is not None else None)

    # --- meta (small per-database facts: the PostgreSQL ownership epoch) ---

    async def meta_get(self, key: str) -> str | None:
        async with self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else None

    async def meta_set(self, key: str, value: str) -> None:
        async with self._tx() as db:
            await db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    async def restore(self, sessions: list[Session], instance_id: str, detail: str) -> None:
        """Fill an empty store with sessions rebuilt elsewhere (PostgreSQL) and take over
        the instance id their containers are labelled with, so reconcile re-adopts them.
        No outbox rows: the rows came from PostgreSQL and are already there."""
        async with self._tx() as db:
            async with db.execute("SELECT COUNT(*) FROM sessions") as cur:
                row = await cur.fetchone()
            if self._sessions or (row and row[0]):
                raise RuntimeError("restore needs an empty store")
            await db.executemany(
                f"INSERT INTO sessions ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
                [dataclasses.astuple(s) for s in sessions],
            )
            now = time.time()
            await db.executemany(
                "INSERT INTO events (session_id, ts, kind, detail) VALUES (?, ?, 'restored', ?)",
                [(s.id, now, detail) for s in sessions],
            )
            await db.execute(
                "INSERT INTO meta (key, value) VALUES ('instance_id', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (instance_id,),
            )
        self._sessions = {s.id: s for s in sessions}
        self.instance_id = instance_id

    # --- internals ---

    async def _record(
        self, db: aiosqlite.Connection, s: Session, op: str, event: str, detail: str
    ) -> None:
        now = time.time()
        await db.execute(
            "INSERT INTO events (session_id, ts, kind, detail) VALUES (?, ?, ?, ?)",
            (s.id, now, event, detail),
        )
        # No token or broker-credential hash: the outbox feeds PostgreSQL, which other
        # hosts and operators read (lovd/sync/: restored sessions get new links instead).
        secret = ("token_hash", "broker_hash", "link_hash")
        payload: dict[str, Any] = {c: getattr(s, c) for c in _COLUMNS if c not in secret}
        payload["event"] = event
        await db.execute(
            "INSERT INTO outbox (entity, key, version, op, payload, created_at) "
            "VALUES ('session', ?, ?, ?, ?, ?)",
            (s.id, s.version, op, json.dumps(payload), now),
        )

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._lock)


def _deleted(current: Session, reason: str) -> Session:
    """The row as its deletion is recorded (outbox, tombstone)."""
    return dataclasses.replace(
        current,
        status=SessionState.DELETED,  # the tombstone primitive machine.delete calls
        reason=reason,
        updated_at=time.time(),
        version=current.version + 1,
    )


class _Transaction:
    """One write transaction. Its boundaries (BEGIN, COMMIT, ROLLBACK) always run to their
    end: aiosqlite runs each statement in its own thread, so a caller cancelled while one
    is under way would otherwise leave the connection inside a transaction ("cannot start
    a transaction within a transaction" for every later write) or miss a COMMIT that did
    happen, leaving the in-memory rows behind the database."""

    def __init__(self, db: aiosqlite.Connection, lock: asyncio.Lock) -> None:
        self._db = db
        self._lock = lock

    async def __aenter__(self) -> aiosqlite.Connection:
        await self._lock.acquire()
        try:
            cancelled = await _to_the_end(self._db, "BEGIN IMMEDIATE")
            if cancelled:
                await _to_the_end(self._db, "ROLLBACK")
                raise asyncio.CancelledError
        except BaseException:
            self._lock.release()
            raise
        return self._db

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                if await _to_the_end(self._db, "COMMIT"):
                    # Committed: let the caller bring its in-memory rows up to date (the
                    # code right after the block, which does not await), then deliver the
                    # cancellation at its next await.
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                        asyncio.get_running_loop().call_soon(task.cancel)
            else:
                await _to_the_end(self._db, "ROLLBACK")
        finally:
            self._lock.release()


async def _to_the_end(db: aiosqlite.Connection, sql: str) -> bool:
    """Run ``sql`` and wait for it even if the awaiting task is cancelled meanwhile.
    Returns whether a cancellation arrived (the caller decides what it means)."""
    fut = asyncio.ensure_future(db.execute(sql))
    cancelled = False
    while True:
        try:
            await asyncio.shield(fut)
            return cancelled
        except asyncio.CancelledError:
            cancelled = True
            if fut.done():
                fut.result()  # the statement's own error, if it failed
                return True


async def _migrate(db: aiosqlite.Connection) -> None:
    async with db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    version = int(row[0]) if row else 0
    if version > len(_MIGRATIONS):
        raise RuntimeError(
            f"database schema version {version} is newer than this lovd "
            f"({len(_MIGRATIONS)}); upgrade lovd or restore a backup"
        )
    for i, script in enumerate(_MIGRATIONS[version:], start=version + 1):
        log.info("migrating database schema to version %d", i)
        await db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {i}; COMMIT;")


async def _instance_id(db: aiosqlite.Connection) -> str:
    """A random id for this state directory; it labels our containers so two lovd
    instances sharing one Podman store never collect each other's containers."""
    async with db.execute("SELECT value FROM meta WHERE key = 'instance_id'") as cur:
        row = await cur.fetchone()
    if row:
        return str(row[0])
    instance = secrets.token_hex(6)
    await db.execute("INSERT INTO meta (key, value) VALUES ('instance_id', ?)", (instance,))
    return instance
