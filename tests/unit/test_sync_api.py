"""PostgreSQL sync through the real API app (fake runner, real SQLite, real PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from lovd.config import Config
from lovd.session.lifecycle import Sessions
from lovd.store import Store
from lovd.sync.service import Sync
from tests.fakes import FakeRunner
from tests.pg import PgCluster, cluster
from tests.stack import open_stack, settings_merged
from tests.unit.conftest import unit_settings
from tests.unit.test_api import check_schema
from tests.unit.test_sync import pg_checksum, pg_query, sqlite_checksum
from tests.waiting import until


@pytest.fixture
def pg() -> Iterator[PgCluster]:
    with cluster() as c:
        yield c


@pytest.fixture
def free_ports(unused_tcp_port_factory: Callable[[], int]) -> list[int]:
    return [unused_tcp_port_factory() for _ in range(8)]


@dataclass
class SyncedApi:
    client: TestClient  # type: ignore[type-arg]
    sessions: Sessions
    store: Store
    sync: Sync
    db: Path
    config: Config
    runner: FakeRunner


@contextlib.asynccontextmanager
async def open_synced(
    tmp: Path, port: int, dsn: str, host_id: str, **settings: Any
) -> AsyncIterator[SyncedApi]:
    conf = unit_settings(
        tmp,
        [port],
        **settings_merged(
            {
                "warm_pool": 0,
                # restore_on_start: off, as before the one build; tests of it are in test_sync.
                "postgres": {
                    "dsn": dsn,
                    "max_backoff": 0.3,
                    "heartbeat_interval": 0.2,
                    "restore_on_start": False,
                },
            },
            settings,
        ),
    )
    runner = FakeRunner()
    try:
        async with (
            open_stack(conf, runner=lambda _: runner, host_id=host_id) as host,
            TestClient(TestServer(host.app)) as client,
        ):
            assert host.sync is not None
            host.sync.start()
            yield SyncedApi(
                client,
                host.sessions,
                host.store,
                host.sync,
                host.config.db_path,
                host.config,
                runner,
            )
    finally:
        await runner.close()


def sqlite_events(db: Path) -> int:
    with sqlite3.connect(db) as c:
        return int(c.execute("SELECT count(*) FROM events").fetchone()[0])


async def test_200_api_changes_with_postgres_stopped_halfway(
    tmp_path: Path, free_ports: list[int], pg: PgCluster
) -> None:
    """The acceptance run: the API answers throughout; after the drain PostgreSQL equals
    SQLite (checksum over every row), every change arrived once."""
    async with open_synced(tmp_path, free_ports[0], pg.dsn, "h1") as a:
        live: list[str] = []
        latencies: list[float] = []
        statuses: list[int] = []
        stopped = False
        i = 0
        while sqlite_events(a.db) < 200:
            if not stopped and sqlite_events(a.db) >= 100:
                await asyncio.to_thread(pg.stop)
                stopped = True
            t0 = time.perf_counter()
            if len(live) < 3:
                r = await a.client.post("/api/sessions", json={"wait": True})
                if r.status == 201:
                    live.append((await r.json())["id"])
            elif i % 3 == 0:
                r = await a.client.delete(f"/api/sessions/{live.pop(0)}")
            else:
                r = await a.client.get("/api/sessions")
            latencies.append(time.perf_counter() - t0)
            statuses.append(r.status)
            i += 1
        assert stopped and not a.sync.relay.status.connected
        r = await a.client.get("/api/health")
        body = await r.json()
        assert r.status == 503 and body["checks"]["postgres"]["ok"] is False
        assert body["sync"]["backlog"] > 0 and body["sync"]["lag_seconds"] > 0
        metrics = await (await a.client.get("/metrics")).text()
        assert "lovd_sync_up 0.0" in metrics and "lovd_sync_backlog" in metrics
        await asyncio.to_thread(pg.start)
        await until(lambda: _synced(a), timeout=15)
        assert set(statuses) <= {200, 201, 204}, statuses
        assert await pg_checksum(pg.dsn) == sqlite_checksum(a.db)
        n, distinct = (await pg_query(pg.dsn, "SELECT count(*), count(DISTINCT seq) "
                                      "FROM lovd_events"))[0]  # fmt: skip
        assert n == distinct == sqlite_events(a.db) >= 200
        r = await a.client.get("/api/health")
        body = await r.json()
        assert r.status == 200 and body["sync"]["backlog"] == 0, body
        check_schema("#/components/schemas/Health", body)
        print(f"\n{len(latencies)} API calls, max {max(latencies) * 1000:.1f} ms")


async def _synced(a: SyncedApi) -> bool:
    return a.sync.relay.status.connected and (await a.store.outbox_stats())[0] == 0


async def test_two_hosts_scope_all_and_a_write_to_the_other_host_is_refused(
    tmp_path: Path, free_ports: list[int], pg: PgCluster
) -> None:
    async with (
        open_synced(tmp_path / "a", free_ports[0], pg.dsn, "a",
                    postgres={"dsn": pg.dsn, "heartbeat_interval": 0.2,
                              "host_stale_after": 1.0}) as a,
        open_synced(tmp_path / "b", free_ports[0] + 300, pg.dsn, "b") as b,
    ):  # fmt: skip
        sa = (await (await a.client.post("/api/sessions")).json())["id"]
        sb = (await (await b.client.post("/api/sessions")).json())["id"]
        await until(lambda: _synced(a), 15)
        await until(lambda: _synced(b), 15)
        for x, mine in ((a, "a"), (b, "b")):
            r = await x.client.get("/api/sessions?scope=all")
            assert r.status == 200
            body = await r.json()
            assert body["host_id"] == mine
            got = {(s["id"], s["host_id"], s["read_only"]) for s in body["sessions"]}
            assert got == {(sa, "a", mine != "a"), (sb, "b", mine != "b")}
            assert {h["host_id"] for h in body["hosts"]} == {"a", "b"}
            check_schema("#/components/schemas/SyncHost", body["hosts"][0])
            for row in body["sessions"]:
                check_schema("#/components/schemas/Session", row)
        # Without scope: this host's only.
        assert [s["id"] for s in (await (await a.client.get("/api/sessions")).json())["sessions"]
                ] == [sa]  # fmt: skip
        r = await a.client.delete(f"/api/sessions/{sb}")
        problem = await r.json()
        assert r.status == 409 and problem["code"] == "conflict"
        check_schema("#/components/schemas/Problem", problem)
        assert "belongs to host 'b'" in problem["detail"] and "'b''s lovd API" in problem["detail"]
        assert problem["owner_host_id"] == "b"
        # A stop too: it goes to the owner.
        r = await a.client.post(f"/api/sessions/{sb}/stop")
        stop = await r.json()
        assert r.status == 409 and stop["code"] == "conflict" and stop["owner_host_id"] == "b"
        row = b.store.get(sb)
        assert row is not None and row.serving  # untouched
        r = await a.client.get("/api/sessions?scope=nope")
        assert r.status == 400
        # b stops heartbeating: a shows it as such.
        await b.sync.relay.close()

        async def b_stale() -> bool:
            body = await (await a.client.get("/api/sessions?scope=all")).json()
            return not {h["host_id"]: h["alive"] for h in body["hosts"]}["b"]

        await until(b_stale, 10, "b shown as not heartbeating")
        body = await (await a.client.get("/api/sessions?scope=all")).json()
        row = next(s for s in body["sessions"] if s["id"] == sb)
        assert row["host_alive"] is False
        assert {h["host_id"]: h["alive"] for h in body["hosts"]}["b"] is False
        # PostgreSQL down: scope=all is a clear 503, the local list still answers.
        await asyncio.to_thread(pg.stop)
        r = await a.client.get("/api/sessions?scope=all")
        problem = await r.json()
        assert r.status == 503 and "GET /api/sessions without scope=all" in problem["detail"]
        assert (await a.client.get("/api/sessions")).status == 200


async def test_scope_all_without_postgres_is_this_host_with_sync_off(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """Sync is a setting that is off, not a fault: 200 with this host's sessions, no 503."""
    from tests.unit.conftest import open_api

    async with open_api(tmp_path, free_ports) as a:
        s = await (await a.client.post("/api/sessions")).json()
        r = await a.client.get("/api/sessions?scope=all")
        body = await r.json()
        assert r.status == 200 and body["sync"] == "off" and body["hosts"] == []
        assert body["host_id"] == "h1"
        assert [(x["id"], x["read_only"], x["host_alive"]) for x in body["sessions"]] == [
            (s["id"], False, True)
        ]


async def test_a_hung_postgres_never_holds_the_api(
    tmp_path: Path, free_ports: list[int], pg: PgCluster
) -> None:
    """PostgreSQL stops answering without closing anything (SIGSTOP, as in a network
    partition): local requests answer as usual, scope=all gives up after read_timeout,
    the relay abandons its pass after postgres.timeout and catches up once it answers."""
    async with open_synced(tmp_path, free_ports[0], pg.dsn, "h1", postgres={
            "dsn": pg.dsn, "timeout": 1.0, "read_timeout": 0.5, "max_backoff": 0.5,
            "heartbeat_interval": 0.2}) as a:  # fmt: skip
        first = (await (await a.client.post("/api/sessions")).json())["id"]
        await until(lambda: _synced(a), 15)
        await asyncio.to_thread(pg.freeze)
        try:
            t0 = time.monotonic()
            r = await a.client.post("/api/sessions")
            assert r.status == 201
            assert (await a.client.delete(f"/api/sessions/{first}")).status == 204
            assert (await a.client.get("/api/sessions")).status == 200
            local = time.monotonic() - t0
            t0 = time.monotonic()
            r = await a.client.get("/api/sessions?scope=all")
            waited = time.monotonic() - t0
            assert r.status == 503 and waited < 1.5, (r.status, waited)
            # The relay's pass is abandoned (psycopg takes up to 10 s more to give up on
            # cancelling the query), and it reports the outage.
            await until(lambda: _down(a), timeout=20)
            assert a.sync.relay.status.backlog >= 2
        finally:
            await asyncio.to_thread(pg.thaw)
        await until(lambda: _synced(a), timeout=20)
        assert await pg_checksum(pg.dsn) == sqlite_checksum(a.db)
        print(
            f"\nhung PostgreSQL: 3 local requests {local * 1000:.0f} ms, "
            f"scope=all refused after {waited * 1000:.0f} ms"
        )


async def _down(a: SyncedApi) -> bool:
    return not a.sync.relay.status.connected


async def test_a_delete_cut_by_a_crash_reaches_postgresql_once(
    tmp_path: Path, free_ports: list[int], pg: PgCluster
) -> None:
    """A delete cut after its tombstone (the workspace removal "crashes"), then a restart
    that finishes it: PostgreSQL shows the session deleted, with one deletion event."""

    class Crash(Exception):
        pass

    async def crash(_: Path) -> None:
        raise Crash

    async with open_synced(tmp_path, free_ports[0], pg.dsn, "h1") as a:
        r = await a.client.post("/api/sessions", json={"wait": True})
        assert r.status == 201
        sid = (await r.json())["id"]
        a.runner.remove_workspace = crash  # type: ignore[method-assign]
        with pytest.raises(Crash):
            await a.sessions.delete(sid)

        async def deleted_in_pg() -> bool:
            try:
                rows = await pg_query(pg.dsn, "SELECT status FROM lovd_sessions WHERE id = %s", sid)
            except psycopg.errors.UndefinedTable:  # the relay has not made its schema yet
                return False
            return rows == [("deleted",)]

        await until(deleted_in_pg, 15)  # at once, from the tombstone
    async with open_synced(tmp_path, free_ports[0], pg.dsn, "h1") as b:
        report = await b.sessions.reconcile(startup=True)
        assert report["deletes_finished"] == [sid]
        assert await b.store.tombstones() == []
        assert not (b.config.sessions_path / sid).exists()

        async def drained() -> bool:
            return await b.store.outbox_size() == 0

        await until(drained, 15)
        assert await deleted_in_pg()
        events = await pg_query(
            pg.dsn,
            "SELECT kind FROM lovd_events WHERE session_id = %s AND status = 'deleted'",
            sid,
        )
        assert events == [("deleted",)], events
        assert await pg_checksum(pg.dsn, "h1") == sqlite_checksum(b.db)
