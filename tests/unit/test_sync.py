"""PostgreSQL sync against a real (throwaway) PostgreSQL: schema, relay, fencing, restore.

The store is real SQLite; changes are written through it directly (this tests the store
and the relay; the API-level run is in test_sync_api.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from lovd import config, ids
from lovd.config import Config
from lovd.session.model import Session
from lovd.store import Store
from lovd.sync import schema
from lovd.sync.hosts import Hosts
from lovd.sync.postgres import Relay, discard_outbox
from lovd.sync.restore import RestoreError, restore, restore_if_lost
from tests.fakes import force_state
from tests.pg import PgCluster, cluster
from tests.waiting import until


@pytest.fixture
def pg() -> Iterator[PgCluster]:
    with cluster() as c:
        yield c


def make_config(tmp: Path, dsn: str, **pg_settings: Any) -> Config:
    return config.from_mapping(
        {
            "state_dir": str(tmp),
            "postgres": {
                "dsn": dsn,
                "max_backoff": 0.3,
                "heartbeat_interval": 0.2,
                "connect_timeout": 2,
                **pg_settings,
            },
        }
    )


def new_session(host: str, port: int) -> Session:
    now = time.time()
    return Session(
        ids.new_session_id(),
        "creating",
        "",
        ids.hash_token("t"),
        port,
        "",
        host,
        now,
        now,
        now + 3600,
        now,
    )


async def _b_stale(hosts: Hosts) -> bool:
    return not {h["host_id"]: h["alive"] for h in await hosts.hosts()}["b"]


async def pg_query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(sql.encode(), params)
        return list(await cur.fetchall()) if cur.description else []


_CHECK_COLS = "id, host_id, status, reason, version, port, container_id, restarts"


def sqlite_checksum(db: Path) -> tuple[int, str]:
    with sqlite3.connect(db) as c:
        rows = sorted(
            c.execute(
                f"SELECT {_CHECK_COLS}, created_at, expires_at FROM sessions "
                "WHERE status <> 'deleted'"
            )
        )  # tombstones: not sessions
    rows = [(*r[:-2], round(r[-2], 3), round(r[-1], 3)) for r in rows]
    return len(rows), hashlib.sha256(json.dumps(rows).encode()).hexdigest()


async def pg_checksum(dsn: str, host: str | None = None) -> tuple[int, str]:
    where = "status <> 'deleted'" + (" AND host_id = %s" if host else "")
    rows = await pg_query(
        dsn,
        f"SELECT {_CHECK_COLS}, round(extract(epoch FROM created_at)::numeric, 3)::float8, "
        f"round(extract(epoch FROM expires_at)::numeric, 3)::float8 FROM lovd_sessions "
        f"WHERE {where}",
        *([host] if host else []),
    )
    rows = sorted(tuple(r) for r in rows)
    return len(rows), hashlib.sha256(json.dumps(rows).encode()).hexdigest()


class Host:
    """One host's store and relay."""

    def __init__(self, store: Store, relay: Relay, cfg: Config) -> None:
        self.store, self.relay, self.cfg = store, relay, cfg

    async def synced(self) -> bool:
        return self.relay.status.connected and (await self.store.outbox_stats())[0] == 0


@pytest.fixture
async def host(tmp_path: Path, pg: PgCluster) -> AsyncIterator[Host]:
    cfg = make_config(tmp_path / "h1", pg.dsn)
    store = await Store.open(cfg.db_path)
    relay = Relay.from_config(cfg, store, "h1", "test")
    relay.start()
    try:
        yield Host(store, relay, cfg)
    finally:
        await relay.close()
        await store.close()


# --- schema ---


async def test_two_hosts_migrating_at_once_both_succeed_and_agree(pg: PgCluster) -> None:
    conns = [await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) for _ in range(4)]
    try:
        before = await asyncio.gather(*(schema.migrate(c) for c in conns))
        assert sorted(before) == [0, 1, 1, 1]  # one did the work; the others found it done
        assert await schema.current_version(conns[0]) == schema.VERSION
        await conns[0].execute("UPDATE lovd_schema SET version = 99")
        with pytest.raises(schema.SchemaError, match="upgrade lovd"):
            await schema.migrate(conns[1])
    finally:
        for c in conns:
            await c.close()


async def test_no_secret_columns_in_postgres(host: Host, pg: PgCluster) -> None:
    s = await host.store.insert(new_session("h1", 20000))
    await force_state(host.store, s.id, "running", broker_hash=ids.hash_token("b"))
    await until(host.synced, 15, "sync")
    cols = {r[0] for r in await pg_query(
        pg.dsn, "SELECT column_name FROM information_schema.columns "
        "WHERE table_name LIKE 'lovd_%%'")}  # fmt: skip
    assert not {c for c in cols if "token" in c or "hash" in c or "password" in c}
    dump = json.dumps([list(map(str, r)) for r in await pg_query(
        pg.dsn, "SELECT * FROM lovd_sessions")] + [list(map(str, r)) for r in await pg_query(
        pg.dsn, "SELECT * FROM lovd_events")])  # fmt: skip
    assert ids.hash_token("t") not in dump and ids.hash_token("b") not in dump
    payloads = [r.payload for r in await host.store.outbox_read(100)]
    assert all("token_hash" not in p and "broker_hash" not in p for p in payloads)


# --- relay ---


async def test_changes_reach_postgres_with_events_and_the_outbox_is_pruned(
    host: Host, pg: PgCluster
) -> None:
    s = await host.store.insert(new_session("h1", 20000))
    await force_state(host.store, s.id, "running", container_id="c1")
    gone = await host.store.insert(new_session("h1", 20001))
    await host.store.delete(gone.id, "bye")
    await until(host.synced, 15, "sync")
    assert await pg_checksum(pg.dsn) == sqlite_checksum(host.cfg.db_path)
    rows = await pg_query(pg.dsn, "SELECT id, status, version FROM lovd_sessions ORDER BY port")
    assert rows == [(s.id, "running", 2), (gone.id, "deleted", 2)]  # a tombstone
    kinds = await pg_query(pg.dsn, "SELECT kind FROM lovd_events ORDER BY seq")
    assert [k for (k,) in kinds] == ["created", "status:running", "created", "deleted"]
    assert await host.store.outbox_size() == 0
    assert host.relay.status.rows_applied == 4 and host.relay.status.lag(time.time()) == 0


async def test_200_changes_postgres_stopped_halfway_then_equal_and_nothing_lost(
    host: Host, pg: PgCluster
) -> None:
    rnd = random.Random(12)
    live: list[str] = []
    port = 20000
    write_times: list[float] = []
    for i in range(200):
        if i == 100:
            await asyncio.to_thread(pg.stop)
        t0 = time.perf_counter()
        if not live or rnd.random() < 0.3:
            port += 1
            live.append((await host.store.insert(new_session("h1", port))).id)
        elif rnd.random() < 0.2:
            await host.store.delete(live.pop(rnd.randrange(len(live))), "gone")
        else:
            sid = rnd.choice(live)
            st = rnd.choice(["starting", "running", "stopped"])
            await force_state(host.store, sid, st, reason=f"change {i}")
        write_times.append(time.perf_counter() - t0)
        await asyncio.sleep(0.005)
    # PostgreSQL is down: the changes since are queued, the store kept answering.
    assert not host.relay.status.connected
    assert (await host.store.outbox_stats())[0] >= 100
    health_ok, detail = await host.relay.health()
    assert not health_ok and "queued in SQLite" in detail and "API is unaffected" in detail
    assert max(write_times) < 0.5, max(write_times)
    await asyncio.to_thread(pg.start)
    await until(host.synced, what="sync", timeout=15)
    assert await pg_checksum(pg.dsn) == sqlite_checksum(host.cfg.db_path)
    counts = await pg_query(
        pg.dsn, "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM lovd_events"
    )
    assert counts == [(200, 200, 1, 200)]  # every change once, none twice
    assert host.relay.status.rows_applied == 200


async def test_a_replayed_batch_changes_nothing(tmp_path: Path, pg: PgCluster) -> None:
    """PostgreSQL committed, lovd died before the SQLite ack: the replay is a no-op."""
    cfg = make_config(tmp_path, pg.dsn)
    store = await Store.open(cfg.db_path)
    relay = Relay.from_config(cfg, store, "h1", "test")

    async def die() -> None:
        raise OSError("simulated crash between COMMIT and ack")

    relay.after_commit = die
    s = await store.insert(new_session("h1", 20000))
    await force_state(store, s.id, "running")
    with pytest.raises(OSError):
        await relay.step()
    assert await store.outbox_size() == 2  # not acknowledged
    before = await pg_query(pg.dsn, "SELECT version, status, synced_at FROM lovd_sessions")
    relay.after_commit = None
    relay._claimed = False  # as after a restart
    await relay.step()
    assert await store.outbox_size() == 0
    assert await pg_query(pg.dsn, "SELECT version, status, synced_at FROM lovd_sessions") == before
    assert (await pg_query(pg.dsn, "SELECT count(*) FROM lovd_events"))[0][0] == 2
    await relay.close()
    await store.close()


async def test_an_older_row_never_wins(host: Host, pg: PgCluster) -> None:
    s = await host.store.insert(new_session("h1", 20000))
    for st in ("starting", "running", "stopped"):
        await force_state(host.store, s.id, st)
    await until(host.synced, 15, "sync")
    conn = await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True)
    from lovd.sync.postgres import UPSERT, _upsert_params

    p = {"id": s.id, "version": 2, "status": "starting", "reason": "", "port": 1,
         "container_id": "", "created_at": 1.0, "updated_at": 1.0, "expires_at": 1.0,
         "last_activity": 1.0}  # fmt: skip
    await conn.execute(UPSERT.encode(), _upsert_params(p, "h1", host.relay.status.epoch))
    await conn.close()
    assert await pg_query(pg.dsn, "SELECT status, version FROM lovd_sessions") == [("stopped", 4)]


async def test_backoff_is_capped_and_sync_resumes(host: Host, pg: PgCluster) -> None:
    await host.store.insert(new_session("h1", 20000))
    await until(host.synced, 15, "sync")
    await asyncio.to_thread(pg.stop)
    await host.store.insert(new_session("h1", 20001))
    st = host.relay.status
    # Many attempts at max_backoff 0.3 s, each failing fast, while the change waits.
    await until(
        lambda: min(st.lag(time.time()), st.as_dict(time.time())["down_seconds"]) > 1.5,
        10,
        "1.5 s down, with the change waiting",
    )
    assert not st.connected and st.backlog == 1 and st.lag(time.time()) > 1.5
    assert st.as_dict(time.time())["down_seconds"] > 1.5
    t0 = time.monotonic()
    await asyncio.to_thread(pg.start)
    await until(host.synced, what="sync", timeout=5)
    assert time.monotonic() - t0 < 3.0  # within one capped backoff of PostgreSQL's return
    assert await pg_checksum(pg.dsn) == sqlite_checksum(host.cfg.db_path)


# --- fencing ---


async def test_a_host_never_writes_another_hosts_session(tmp_path: Path, pg: PgCluster) -> None:
    a_cfg, b_cfg = make_config(tmp_path / "a", pg.dsn), make_config(tmp_path / "b", pg.dsn)
    a, b = await Store.open(a_cfg.db_path), await Store.open(b_cfg.db_path)
    ra, rb = Relay.from_config(a_cfg, a, "a", "t"), Relay.from_config(b_cfg, b, "b", "t")
    s = await a.insert(new_session("a", 20000))
    await ra.step()
    # b holds a row with a's session id (a bug, or a forged store): its upsert is fenced.
    await b.insert(dataclasses.replace(s, host_id="b", status="failed", version=9))
    await rb.step()
    assert await pg_query(pg.dsn, "SELECT host_id, status, version FROM lovd_sessions") == [
        ("a", "creating", 1)
    ]
    for x in (ra, rb):
        await x.close()
    for st in (a, b):
        await st.close()


async def test_a_second_copy_of_a_host_is_refused_and_a_superseded_one_fenced(
    tmp_path: Path, pg: PgCluster
) -> None:
    old_cfg = make_config(tmp_path / "old", pg.dsn)
    old = await Store.open(old_cfg.db_path)
    r_old = Relay.from_config(old_cfg, old, "h1", "t")
    await old.insert(new_session("h1", 20000))
    await r_old.step()
    # A fresh database under the same host_id must not silently take over live rows.
    new_cfg = make_config(tmp_path / "new", pg.dsn)
    new = await Store.open(new_cfg.db_path)
    r_new = Relay.from_config(new_cfg, new, "h1", "t")
    from lovd.sync.claim import SyncRefused

    with pytest.raises(SyncRefused, match="lovd restore"):
        await r_new.step()
    # Restored, it takes the next epoch; the old copy is fenced from then on.
    await new.close()
    (tmp_path / "new" / "lovd.db").unlink()
    new = await Store.open(new_cfg.db_path)
    assert (await restore(new, new_cfg, "h1", new_links=False)).count == 1
    r_new = Relay.from_config(new_cfg, new, "h1", "t")
    await r_new.step()
    assert r_new.status.epoch == r_old.status.epoch + 1
    await force_state(old, old.all()[0].id, "failed", reason="stale writer")
    with pytest.raises(SyncRefused, match="claimed by another lovd"):
        await r_old.step()
    assert await pg_query(pg.dsn, "SELECT status FROM lovd_sessions") == [("creating",)]
    for x in (r_old, r_new):
        await x.close()
    for st in (old, new):
        await st.close()


# --- restore ---


async def test_restore_rebuilds_an_empty_store_without_tokens(host: Host, pg: PgCluster) -> None:
    made = []
    for i in range(5):
        s = await host.store.insert(new_session("h1", 20000 + i))
        made.append(await force_state(host.store, s.id, "running", container_id=f"c{i}"))
    await host.store.delete(made[0].id)
    await until(host.synced, 15, "sync")
    cfg = make_config(host.cfg.state_path.parent / "fresh", pg.dsn)
    fresh = await Store.open(cfg.db_path)
    assert await restore_if_lost(fresh, cfg, "h1") == 4
    assert fresh.instance_id == host.store.instance_id  # its containers' label
    by_id = {s.id: s for s in fresh.all()}
    for s in made[1:]:
        r = by_id[s.id]
        assert (r.status, r.port, r.container_id) == ("running", s.port, s.container_id)
        assert r.version == 2
        assert r.token_hash == "" and r.broker_hash == ""
    assert await restore_if_lost(fresh, cfg, "h1") == 0  # never twice
    with pytest.raises(RestoreError, match="already holds 4"):
        await restore(fresh, cfg, "h1", new_links=True)
    await fresh.close()
    # lovd restore (by hand) gives each session a new link instead.
    cfg2 = make_config(host.cfg.state_path.parent / "fresh2", pg.dsn)
    fresh2 = await Store.open(cfg2.db_path)
    done = await restore(fresh2, cfg2, "h1", new_links=True)
    assert done.count == 4 and set(done.links) == {s.id for s in made[1:]}
    for sid, token in done.links.items():
        got = fresh2.get(sid)
        # A single-use link; the cookie secret is made when it is used.
        assert got is not None and ids.token_matches(token, got.link_hash)
        assert got.token_hash and not ids.token_matches(token, got.token_hash)
    await fresh2.close()


async def test_restore_refuses_a_state_this_lovd_does_not_know(host: Host, pg: PgCluster) -> None:
    """A row PostgreSQL holds in a state lovd has no name for (a newer lovd wrote it) is
    refused with what to do, and the store stays empty."""
    s = await host.store.insert(new_session("h1", 20000))
    await until(host.synced)
    await pg_query(pg.dsn, "UPDATE lovd_sessions SET status = 'hibernating' WHERE id = %s", s.id)
    cfg = make_config(host.cfg.state_path.parent / "fresh", pg.dsn)
    fresh = await Store.open(cfg.db_path)
    with pytest.raises(RestoreError, match="'hibernating'"):
        await restore(fresh, cfg, "h1", new_links=False)
    assert fresh.all() == []
    await fresh.close()


async def test_restore_when_postgres_is_down_starts_empty(tmp_path: Path, pg: PgCluster) -> None:
    await asyncio.to_thread(pg.stop)
    cfg = make_config(tmp_path, pg.dsn)
    store = await Store.open(cfg.db_path)
    t0 = time.monotonic()
    assert await restore_if_lost(store, cfg, "h1") == 0
    assert time.monotonic() - t0 < cfg.postgres_connect_timeout + 1
    await store.close()


# --- hosts, pruning, no DSN ---


async def test_hosts_listing_ownership_and_routing(tmp_path: Path, pg: PgCluster) -> None:
    a_cfg = make_config(tmp_path / "a", pg.dsn, upstream="10.0.0.1:80")
    b_cfg = make_config(tmp_path / "b", pg.dsn, upstream="10.0.0.2:80", host_stale_after=1)
    a, b = await Store.open(a_cfg.db_path), await Store.open(b_cfg.db_path)
    ra, rb = Relay.from_config(a_cfg, a, "a", "t"), Relay.from_config(b_cfg, b, "b", "t")
    sa = await a.insert(new_session("a", 20000))
    sb = await b.insert(new_session("b", 20001))
    await ra.step()
    await rb.step()
    hosts_a = Hosts(ra.pool, "a", 2.0, 1.0)
    listed = await hosts_a.sessions("https://chat.example")
    assert {(r["id"], r["host_id"]) for r in listed} == {(sa.id, "a"), (sb.id, "b")}
    from lovd.errors import LovdError

    with pytest.raises(LovdError, match=r"belongs to host .b.*read-only") as e:
        await hosts_a.refuse_foreign(sb.id)
    assert e.value.status == 409
    await hosts_a.refuse_foreign(sa.id)  # ours: no refusal
    assert await hosts_a.upstream_for(sb.id) == "10.0.0.2:80"
    assert await hosts_a.upstream_for(sa.id) is None  # local: the gate handles it
    # b stops heartbeating: shown as such, still routed to.
    await until(lambda: _b_stale(hosts_a), 10, "b shown as not heartbeating")
    await ra.step()
    alive = {h["host_id"]: h["alive"] for h in await hosts_a.hosts()}
    assert alive == {"a": True, "b": False}
    hosts_a._routes.clear()
    assert await hosts_a.upstream_for(sb.id) == "10.0.0.2:80"
    assert await hosts_a.upstream_for(ids.new_session_id()) is None  # nobody's
    await asyncio.to_thread(pg.stop)
    with pytest.raises(LovdError, match="PostgreSQL cannot be read") as e:
        await hosts_a.sessions("x")
    assert e.value.status == 503
    for x in (ra, rb):
        await x.close()
    for st in (a, b):
        await st.close()


async def test_old_events_and_tombstones_are_pruned(host: Host, pg: PgCluster) -> None:
    s = await host.store.insert(new_session("h1", 20000))
    await host.store.delete(s.id)
    await until(host.synced, 15, "sync")
    await pg_query(pg.dsn, "UPDATE lovd_events SET at = at - interval '8 days'")
    await pg_query(pg.dsn, "UPDATE lovd_sessions SET updated_at = updated_at - interval '8 days'")
    keep = await host.store.insert(new_session("h1", 20001))
    host.relay._last_prune = float("-inf")
    await until(host.synced, 15, "sync")
    await host.relay.step()
    assert await pg_query(pg.dsn, "SELECT id FROM lovd_sessions") == [(keep.id,)]
    assert await pg_query(pg.dsn, "SELECT session_id FROM lovd_events") == [(keep.id,)]


async def test_without_a_dsn_the_outbox_does_not_grow(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "lovd.db")
    for i in range(5):
        await store.insert(new_session("h1", 20000 + i))
    await discard_outbox(store)
    assert await store.outbox_size() == 0
    await store.close()


async def test_sync_turned_on_later_takes_a_snapshot(tmp_path: Path, pg: PgCluster) -> None:
    cfg = make_config(tmp_path, pg.dsn)
    store = await Store.open(cfg.db_path)
    a = await store.insert(new_session("h1", 20000))
    await store.insert(new_session("h1", 20001))
    await discard_outbox(store)  # sync was off
    await force_state(store, a.id, "running")
    relay = Relay.from_config(cfg, store, "h1", "t")
    await relay.step()
    assert await pg_checksum(pg.dsn) == sqlite_checksum(cfg.db_path)
    await relay.close()
    await store.close()


# --- lovd doctor ---


async def test_doctor_reports_server_schema_and_sync_state(host: Host, pg: PgCluster) -> None:
    from lovd.sync.doctor import checks

    await host.store.insert(new_session("h1", 20000))
    await until(host.synced, 15, "sync")
    cfg = config.from_mapping({"state_dir": str(host.cfg.state_path), "host_id": "h1",
                               "postgres": {"dsn": pg.dsn}})  # fmt: skip
    got = {c.name: c for c in await checks(cfg)}
    assert got["postgres"].status == "ok" and "PostgreSQL 15" in got["postgres"].detail
    assert got["postgres-schema"].status == "ok"
    assert got["postgres-sync"].status == "ok" and "backlog 0" in got["postgres-sync"].detail
    # Another lovd took the host id over: this store is fenced.
    await pg_query(pg.dsn, "UPDATE lovd_hosts SET epoch = epoch + 1")
    got = {c.name: c for c in await checks(cfg)}
    assert got["postgres-sync"].status == "fail" and "fenced" in got["postgres-sync"].detail
    await pg_query(pg.dsn, "UPDATE lovd_schema SET version = 99")
    got = {c.name: c for c in await checks(cfg)}
    assert got["postgres-schema"].status == "fail" and "upgrade lovd" in got["postgres-schema"].fix
    await asyncio.to_thread(pg.stop)
    got = {c.name: c for c in await checks(cfg)}
    assert got["postgres"].status == "fail" and "pg_hba.conf" in got["postgres"].fix


async def test_doctor_without_a_dsn_says_sync_is_off(tmp_path: Path) -> None:
    from lovd.sync.doctor import checks

    got = await checks(config.from_mapping({"state_dir": str(tmp_path)}))
    assert [(c.name, c.status) for c in got] == [("postgres", "ok")]
    assert "no sync" in got[0].detail


def test_a_bad_dsn_is_a_config_error_that_does_not_echo_it() -> None:
    with pytest.raises(config.ConfigError, match=r"postgres\.dsn") as e:
        config.from_mapping({"postgres": {"dsn": "host=x password='s3cret"}})
    assert "s3cret" not in str(e.value)
