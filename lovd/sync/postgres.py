"""The outbox relay: SQLite's outbox rows applied to PostgreSQL, exactly once in effect.

The loop, in one task owned by :class:`Relay`:

1. **Claim** this host's row in ``lovd_hosts`` (host id, SQLite instance id, ownership
   epoch). A new SQLite (fresh or restored) takes the next epoch; an older copy of the
   same host that comes back later finds a newer epoch and stops writing (fenced). A
   fresh SQLite never takes over a host id whose live sessions PostgreSQL still holds
   for another instance: that is a restore, which the operator must choose (claim.py).
2. **Snapshot** once per claim: every SQLite row is upserted (versioned, so nothing
   older wins), and this host's PostgreSQL rows SQLite no longer has become
   tombstones. This covers changes made while sync was off.
3. **Relay** batches of outbox rows in seq order, in one PostgreSQL transaction:
   versioned upserts (``WHERE version < excluded.version``, only on rows of this host
   at an epoch not newer than ours), events keyed by (host, epoch, seq) so a replay
   inserts nothing twice, then the host row's heartbeat, which doubles as the fence:
   it matches only while our epoch is current, and the row lock serializes us with
   any claim. Only after COMMIT are the rows acknowledged (deleted) in SQLite; a
   crash in between replays the batch, which changes nothing.
4. While PostgreSQL is unreachable: back off (doubling, capped by
   ``postgres.max_backoff``), keep the backlog figures current, never touch the API's
   path. The store's writes only ever set an event that wakes this loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from lovd.config import Config
from lovd.session.model import SessionState
from lovd.store import OutboxRow, Store
from lovd.sync import schema
from lovd.sync.claim import SyncRefused, claim
from lovd.sync.pool import Conn, Pool, describe
from lovd.sync.status import SyncStatus

log = logging.getLogger(__name__)

PRUNE_EVERY = 600.0
COALESCE = 0.005  # seconds the relay waits after a wake-up for the rest of a burst

UPSERT = """
INSERT INTO lovd_sessions AS s (id, host_id, epoch, version, status, reason, port,
    container_id, created_at, updated_at, expires_at, last_activity, started_at, used_at,
    restarts, synced_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, to_timestamp(%s), to_timestamp(%s), to_timestamp(%s),
    to_timestamp(%s), to_timestamp(NULLIF(%s, 0)), to_timestamp(NULLIF(%s, 0)), %s, now())
ON CONFLICT (id) DO UPDATE SET epoch = excluded.epoch, version = excluded.version,
    status = excluded.status, reason = excluded.reason, port = excluded.port,
    container_id = excluded.container_id, created_at = excluded.created_at,
    updated_at = excluded.updated_at, expires_at = excluded.expires_at,
    last_activity = excluded.last_activity, started_at = excluded.started_at,
    used_at = excluded.used_at, restarts = excluded.restarts, synced_at = now()
WHERE s.host_id = excluded.host_id AND s.epoch <= excluded.epoch
    AND s.version < excluded.version
"""

EVENT = """
INSERT INTO lovd_events (host_id, epoch, seq, session_id, at, kind, status, detail)
VALUES (%s, %s, %s, %s, to_timestamp(%s), %s, %s, %s)
ON CONFLICT DO NOTHING
"""

FENCE = """
UPDATE lovd_hosts SET heartbeat_at = now(), applied_seq = GREATEST(applied_seq, %s)
WHERE host_id = %s AND epoch = %s AND instance_id = %s
RETURNING epoch
"""


# Failures of PostgreSQL or the way to it: logged once per outage, not as bugs.
_EXPECTED = (psycopg.Error, OSError, TimeoutError, SyncRefused, schema.SchemaError)


def _upsert_params(p: dict[str, Any], host_id: str, epoch: int) -> tuple[Any, ...]:
    return (
        p["id"], host_id, epoch, p["version"], p["status"], p["reason"], p["port"],
        p["container_id"], p["created_at"], p["updated_at"], p["expires_at"],
        p["last_activity"], p.get("started_at", 0.0), p.get("used_at", 0.0),
        p.get("restarts", 0),
    )  # fmt: skip


class Relay:
    """Owns the pool and the relay task; create with :meth:`from_config`."""

    def __init__(
        self,
        config: Config,
        store: Store,
        host_id: str,
        pool: Pool,
        version: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.host_id = host_id
        self.pool = pool
        self.version = version
        self.clock = clock
        self.status = SyncStatus(configured=True, target=describe(pool.dsn))
        self._kick = store.outbox_written  # set by the store after each outbox write
        self._task: asyncio.Task[None] | None = None
        self._claimed = False
        self._last_prune = float("-inf")
        self._last_beat = float("-inf")
        # Test hook: awaited between PostgreSQL's COMMIT and the SQLite ack.
        self.after_commit: Callable[[], Awaitable[None]] | None = None

    @classmethod
    def from_config(cls, config: Config, store: Store, host_id: str, version: str) -> Relay:
        pool = Pool(config.postgres_dsn, config.postgres_pool_size, config.postgres_connect_timeout)
        return cls(config, store, host_id, pool, version)

    # --- lifetime ---

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="lovd-sync")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.pool.close()

    # --- the loop ---

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                full = await self.step()
            except Exception as e:
                failures += 1
                if not isinstance(e, _EXPECTED):
                    # A bug or a local failure (SQLite busy): the relay must outlive it.
                    log.exception("PostgreSQL sync pass failed")
                await self._back_off(e, failures)
                continue
            if failures:
                log.info(
                    "PostgreSQL sync resumed after %d failed attempt(s); %d change(s) pending",
                    failures,
                    self.status.backlog,
                )
                failures = 0
            if full:
                continue  # more rows waiting: no pause between batches
            try:
                async with asyncio.timeout(self.config.postgres_heartbeat_interval):
                    await self._kick.wait()
                # One request writes several changes in a row (a create: creating,
                # starting, running): gather them into one pass, which costs the API's
                # event loop and SQLite connection less than one pass per change.
                await asyncio.sleep(COALESCE)
            except TimeoutError:
                pass

    async def _back_off(self, e: Exception, failures: int) -> None:
        # The figures first: whoever sees the outage reported sees its backlog with it.
        try:
            await self._refresh_backlog()
        except Exception:
            log.debug("outbox figures not refreshed", exc_info=True)
        self._failed(e, failures)
        cap = self.config.postgres_max_backoff
        delay = cap if isinstance(e, SyncRefused) else min(cap, 0.1 * 2**failures)
        await asyncio.sleep(delay * random.uniform(0.8, 1.0))  # noqa: S311 - jitter

    def _failed(self, e: BaseException, failures: int) -> None:
        s = self.status
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if s.down_since is None:
            s.down_since = self.clock()
        s.connected = False
        s.last_error = msg
        self._claimed = False  # re-claim (and re-check the epoch) after any failure
        if isinstance(e, SyncRefused):
            if s.refused != msg:  # once per cause, not on every retry
                log.error("PostgreSQL sync refused: %s", msg)
            s.refused = msg
        elif failures == 1:
            log.warning(
                "PostgreSQL (%s) unreachable: %s; changes stay queued in SQLite, the API is "
                "unaffected; retrying with backoff (at most %g s)",
                s.target,
                msg,
                self.config.postgres_max_backoff,
            )
        else:
            log.debug("PostgreSQL still unreachable (%d attempts): %s", failures, msg)

    async def step(self) -> bool:
        """One pass: claim if needed, apply one batch. True if the batch was full."""
        self._kick.clear()
        # A PostgreSQL that hangs (stopped, partitioned) must not hold the relay forever:
        # past the bound the pass fails like an outage and the batch is retried.
        async with asyncio.timeout(self.config.postgres_timeout), self.pool.connection() as conn:
            if not self._claimed:
                await schema.migrate(conn)
                await self._claim(conn)
                await self._snapshot(conn)
                self._claimed = True
            rows = await self.store.outbox_read(self.config.postgres_batch)
            if rows:
                await self._apply(conn, rows)
            elif self.clock() - self._last_beat >= self.config.postgres_heartbeat_interval:
                await self._beat(conn)
            if self.clock() - self._last_prune >= PRUNE_EVERY:
                await self._prune(conn)
        s = self.status
        s.connected, s.refused, s.last_error, s.down_since = True, "", "", None
        full = len(rows) >= self.config.postgres_batch
        if full or not rows or self._kick.is_set():
            await self._refresh_backlog()
        else:  # drained, and nothing written since: no need to ask SQLite
            s.backlog, s.oldest = 0, None
        return full

    async def _refresh_backlog(self) -> None:
        self.status.backlog, self.status.oldest = await self.store.outbox_stats()

    # --- claim and snapshot ---

    async def _claim(self, conn: Conn) -> None:
        self.status.epoch = await claim(
            conn, self.store, self.host_id, self.config.postgres_upstream, self.version
        )

    async def _snapshot(self, conn: Conn) -> None:
        """Upsert every SQLite row and tombstone what SQLite no longer has (changes made
        while sync was off or before it was configured)."""
        epoch = self.status.epoch
        sessions = self.store.all()
        params = []
        for s in sessions:
            p = {k: getattr(s, k) for k in ("id", "version", "status", "reason", "port",
                                            "container_id", "created_at", "updated_at",
                                            "expires_at", "last_activity", "started_at",
                                            "used_at", "restarts")}  # fmt: skip
            params.append(_upsert_params(p, self.host_id, epoch))
        # Rows still in the outbox may be newer than memory's view at this instant, or
        # be deletions of rows no longer in memory: leave both to the relay.
        pending = {r.key for r in await self.store.outbox_read(1_000_000)}
        keep = [s.id for s in sessions] + sorted(pending)
        async with conn.transaction(), conn.cursor() as cur:
            if params:
                await cur.executemany(UPSERT, params)
            await cur.execute(
                "UPDATE lovd_sessions SET status = 'deleted', version = version + 1, "
                "reason = 'gone from its host while sync was off', updated_at = now(), "
                "synced_at = now() "
                "WHERE host_id = %s AND status <> 'deleted' AND epoch <= %s "
                "AND NOT (id = ANY(%s))",
                (self.host_id, epoch, keep),
            )
            await self._fence(cur, 0)

    # --- relay ---

    async def _apply(self, conn: Conn, rows: list[OutboxRow]) -> None:
        epoch = self.status.epoch
        t0 = time.monotonic()
        latest: dict[str, dict[str, Any]] = {}  # only each session's newest row matters
        events = []
        for r in rows:
            p = json.loads(r.payload)
            p["version"] = r.version
            if r.op == "delete":
                p["status"] = SessionState.DELETED.value
            latest[r.key] = p
            events.append(
                (self.host_id, epoch, r.seq, r.key, r.created_at,
                 p.get("event") or r.op, p["status"], p.get("reason", ""))
            )  # fmt: skip
        async with conn.transaction(), conn.cursor() as cur:
            await cur.executemany(
                UPSERT, [_upsert_params(p, self.host_id, epoch) for p in latest.values()]
            )
            await cur.executemany(EVENT, events)
            await self._fence(cur, rows[-1].seq)
        committed = self.clock()
        if self.after_commit is not None:
            await self.after_commit()
        await self.store.outbox_ack(rows[-1].seq)
        s = self.status
        s.rows_applied += len(rows)
        s.batches += 1
        s.last_commit = committed
        s.lags.extend(committed - r.created_at for r in rows)
        log.debug("applied %d outbox rows in %.1f ms", len(rows), (time.monotonic() - t0) * 1e3)

    async def _fence(self, cur: psycopg.AsyncCursor[Any], seq: int) -> None:
        """The heartbeat that proves, under the host row's lock, that our epoch is
        current; raising rolls the whole transaction back."""
        epoch = self.status.epoch
        await cur.execute(FENCE, (seq, self.host_id, epoch, self.store.instance_id))
        if await cur.fetchone() is None:
            raise SyncRefused(
                f"host_id {self.host_id!r} was claimed by another lovd in PostgreSQL since "
                f"this one took epoch {epoch}; nothing more is written there. Stop this lovd, "
                "or give it its own host_id"
            )
        self._last_beat = self.clock()

    async def _beat(self, conn: Conn) -> None:
        async with conn.transaction(), conn.cursor() as cur:
            await self._fence(cur, 0)

    async def _prune(self, conn: Conn) -> None:
        keep = self.config.postgres_retention
        async with conn.transaction():
            cur = await conn.execute(
                "DELETE FROM lovd_events WHERE at < now() - make_interval(secs => %s)", (keep,)
            )
            n_events = cur.rowcount
            cur = await conn.execute(
                "DELETE FROM lovd_sessions WHERE status = 'deleted' "
                "AND updated_at < now() - make_interval(secs => %s)",
                (keep,),
            )
        if n_events or cur.rowcount:
            log.info(
                "PostgreSQL: pruned %d events and %d tombstones older than %g s",
                n_events,
                cur.rowcount,
                keep,
            )
        self._last_prune = self.clock()

    # --- reporting ---

    async def health(self) -> tuple[bool, str]:
        s, now = self.status, self.clock()
        if s.refused:
            return False, f"sync refused: {s.refused}"
        if not s.connected:
            down = now - s.down_since if s.down_since else 0.0
            what = f"unreachable for {down:.0f} s: {s.last_error}" if s.down_since else "connecting"
            return False, (
                f"PostgreSQL ({s.target}) {what}; {s.backlog} change(s) queued in SQLite "
                f"(oldest {s.lag(now):.1f} s); the API is unaffected"
            )
        return True, (
            f"in sync with {s.target} (epoch {s.epoch}): backlog {s.backlog}, "
            f"lag {s.lag(now):.2f} s"
        )


async def discard_outbox(store: Store) -> None:
    """Without postgres.dsn nothing reads the outbox: drop what was written, so it never
    grows without bound (a later first sync takes a full snapshot instead)."""
    count, _ = await store.outbox_stats()
    if count:
        await store.outbox_ack(2**62)
