"""A real lovd with real containers and a real (throwaway) PostgreSQL.

Sessions reach lovd_sessions within a second; an outage never stops the API; a kill -9
between PostgreSQL's COMMIT and the SQLite ack applies the batch's effect once; a host
whose SQLite is lost restores and re-adopts its live containers; two hosts share one
PostgreSQL, each seeing both hosts' sessions and refusing writes to the other's.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.lovdproc import LovdProc, containers, podman
from tests.pg import PgCluster, cluster
from tests.waiting import until_sync

pytestmark = pytest.mark.podman


@pytest.fixture
def pg() -> Iterator[PgCluster]:
    with cluster() as c:
        yield c


def q(pg: PgCluster, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        cur = conn.execute(sql.encode(), params)
        return list(cur.fetchall()) if cur.description else []


# The relay waits for a row lock on lovd_hosts (another connection holds it).
LOCKED_ON_HOSTS = (
    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%%lovd_hosts%%'"
)


def lovd_with_pg(tmp: Path, pg: PgCluster, host_id: str = "h1", **extra: Any) -> LovdProc:
    settings: dict[str, Any] = {
        "host_id": host_id,
        "limits": {"max_running": 6},
        "postgres": {"dsn": pg.dsn, "max_backoff": 1.0, "heartbeat_interval": 1.0},
    }
    settings.update(extra)
    return LovdProc(tmp, **settings)


def cleanup(p: LovdProc) -> None:
    p.stop()
    db = p.tmp / "state" / "lovd.db"
    iid = p.instance_id() if db.exists() else ""
    if iid:
        for name in containers(f"lovd.instance={iid}"):
            podman("rm", "-f", "-t", "0", name, check=False)
    subprocess.run(["podman", "unshare", "rm", "-rf", str(p.tmp / "state")], check=False)


def sqlite_rows(p: LovdProc) -> set[tuple[Any, ...]]:
    with sqlite3.connect(p.tmp / "state" / "lovd.db") as db:
        return set(db.execute("SELECT id, status, version, container_id FROM sessions"))


def pg_rows(pg: PgCluster, host: str = "h1") -> set[tuple[Any, ...]]:
    return set(q(pg, "SELECT id, status, version, container_id FROM lovd_sessions "
                     "WHERE host_id = %s AND status <> 'deleted'", host))  # fmt: skip


def sqlite_events(p: LovdProc) -> int:
    with sqlite3.connect(p.tmp / "state" / "lovd.db") as db:
        return int(db.execute("SELECT count(*) FROM events WHERE kind <> 'restored'").fetchone()[0])


@pytest.fixture
def lovd(tmp_path: Path, pg: PgCluster, test_image: str) -> Iterator[LovdProc]:
    p = lovd_with_pg(tmp_path, pg)
    yield p.start()
    cleanup(p)


def test_sessions_reach_postgres_within_a_second_and_outages_never_stop_the_api(
    lovd: LovdProc, pg: PgCluster
) -> None:
    status, _, s = lovd.api("POST", "/api/sessions", {})
    assert status == 201, s
    took = until_sync(lambda: (s["id"], "running") in {(r[0], r[1]) for r in pg_rows(pg)}, 1.0)
    print(f"\nrunning session in lovd_sessions {took * 1000:.0f} ms after the 201")
    assert took < 1.0  # within a second

    pg.stop()
    t0 = time.monotonic()
    status, _, s2 = lovd.api("POST", "/api/sessions", {})
    create_s = time.monotonic() - t0
    assert status == 201, s2
    t0 = time.monotonic()
    status, _, _ = lovd.api("DELETE", f"/api/sessions/{s['id']}")
    delete_s = time.monotonic() - t0
    assert status == 204
    status, _, health = lovd.api("GET", "/api/health")
    assert status == 503 and health["checks"]["postgres"]["ok"] is False
    assert health["sync"]["backlog"] > 0 and not health["sync"]["connected"]
    print(f"PostgreSQL down: create {create_s * 1000:.0f} ms, delete {delete_s * 1000:.0f} ms")

    t0 = time.monotonic()
    pg.start()
    up = time.monotonic() - t0
    took = until_sync(lambda: pg_rows(pg) == sqlite_rows(lovd), 10.0, step=0.05)
    print(
        f"in sync again {took:.2f} s after PostgreSQL accepted connections "
        f"({up + took:.2f} s after it was started)"
    )
    assert took < 5.0
    gone = q(pg, "SELECT status FROM lovd_sessions WHERE id = %s", s["id"])
    assert gone == [("deleted",)]
    status, _, health = lovd.api("GET", "/api/health")
    assert status == 200 and health["sync"]["backlog"] == 0, health
    metrics = lovd.api("GET", "/metrics")[2]
    assert "lovd_sync_up 1.0" in metrics and "lovd_sync_backlog 0.0" in metrics
    doctor = lovd.cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    assert checks["postgres"]["status"] == "ok" and "PostgreSQL 15" in checks["postgres"]["detail"]
    assert checks["postgres-schema"]["status"] == "ok"
    assert checks["postgres-sync"]["status"] == "ok", checks["postgres-sync"]


def test_kill9_between_commit_and_ack_applies_the_batch_once(lovd: LovdProc, pg: PgCluster) -> None:
    status, _, s = lovd.api("POST", "/api/sessions", {})
    assert status == 201
    until_sync(lambda: pg_rows(pg) == sqlite_rows(lovd), 5.0)
    before = q(pg, "SELECT count(*) FROM lovd_events")[0][0]
    assert before >= 3
    # Hold this host's row in PostgreSQL (NO KEY UPDATE: foreign-key checks still pass):
    # the relay's next batch writes its upserts and events, then waits on the row lock
    # (its fence) before COMMIT.
    with psycopg.connect(pg.dsn) as blocker:
        blocker.execute("SELECT 1 FROM lovd_hosts WHERE host_id = 'h1' FOR NO KEY UPDATE")
        status, _, _ = lovd.api("DELETE", f"/api/sessions/{s['id']}")
        assert status == 204
        until_sync(lambda: bool(q(pg, LOCKED_ON_HOSTS)), 5.0, "the relay blocked on lovd_hosts")
        # Hold SQLite's write lock too, so the ack after COMMIT cannot happen.
        db = sqlite3.connect(lovd.tmp / "state" / "lovd.db", timeout=10, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        blocker.rollback()  # the relay commits now ...
    until_sync(lambda: q(pg, "SELECT count(*) FROM lovd_events")[0][0] > before, 5.0)
    committed = q(pg, "SELECT max(seq) FROM lovd_events")[0][0]
    unacked = db.execute("SELECT min(seq) FROM outbox").fetchone()[0]
    assert unacked is not None and unacked <= committed  # ... and is stuck before its ack
    lovd.kill9()
    db.execute("ROLLBACK")
    db.close()
    applied = q(pg, "SELECT count(*) FROM lovd_events")[0][0]
    lovd.start()
    until_sync(lambda: lovd.api("GET", "/api/health")[2].get("sync", {}).get("backlog") == 0, 10.0)
    # The replayed batch changed nothing (no event twice); the change after it arrived.
    assert q(pg, "SELECT count(*) FROM lovd_events WHERE seq <= %s", committed)[0][0] == applied
    n, distinct = q(pg, "SELECT count(*), count(DISTINCT (epoch, seq)) FROM lovd_events")[0]
    assert n == distinct == sqlite_events(lovd)
    assert q(pg, "SELECT status FROM lovd_sessions WHERE id = %s", s["id"]) == [("deleted",)]
    assert pg_rows(pg) == sqlite_rows(lovd)


def test_kill9_before_commit_leaves_nothing_half_applied(lovd: LovdProc, pg: PgCluster) -> None:
    until_sync(lambda: lovd.api("GET", "/api/health")[2]["sync"]["connected"], 5.0)
    with psycopg.connect(pg.dsn) as blocker:
        blocker.execute("SELECT 1 FROM lovd_hosts WHERE host_id = 'h1' FOR NO KEY UPDATE")
        status, _, s = lovd.api("POST", "/api/sessions", {})
        assert status == 201
        until_sync(lambda: bool(q(pg, LOCKED_ON_HOSTS)), 5.0, "the relay blocked on lovd_hosts")
        lovd.kill9()  # mid-batch: upserts written, not committed
        blocker.rollback()
    assert q(pg, "SELECT count(*) FROM lovd_sessions WHERE id = %s", s["id"]) == [(0,)]
    lovd.start()
    until_sync(lambda: pg_rows(pg) == sqlite_rows(lovd), 10.0)
    n, distinct = q(pg, "SELECT count(*), count(DISTINCT (epoch, seq)) FROM lovd_events")[0]
    assert n == distinct == sqlite_events(lovd)


def test_lost_sqlite_with_5_live_sessions_is_restored_and_readopted(
    lovd: LovdProc, pg: PgCluster
) -> None:
    made = []
    for _ in range(5):
        status, _, s = lovd.api("POST", "/api/sessions", {})
        assert status == 201 and s["status"] == "running", s
        made.append(s)
    until_sync(lambda: pg_rows(pg) == sqlite_rows(lovd), 5.0)
    instance = lovd.instance_id()
    running_before = containers(f"lovd.instance={instance}")
    assert len(running_before) == 5
    lovd.stop()  # the containers keep running
    state = lovd.tmp / "state"
    for name in ("lovd.db", "lovd.db-wal", "lovd.db-shm"):
        (state / name).unlink(missing_ok=True)
    lovd.start()
    assert "restored 5 session(s) of host_id h1" in lovd.log_path.read_text()
    status, _, body = lovd.api("GET", "/api/sessions")
    got = {s["id"]: s for s in body["sessions"]}
    assert set(got) == {s["id"] for s in made}
    for s in made:
        r = got[s["id"]]
        assert r["status"] == "running" and r["container_id"] == s["container_id"], r
        assert r["port"] == s["port"]
    assert lovd.instance_id() == instance
    assert containers(f"lovd.instance={instance}") == running_before  # none replaced, none lost
    # The old link no longer works (no token hash left this host); the session is intact.
    token = made[0]["token"]
    status, _, _ = lovd.api("GET", f"/c/{made[0]['id']}?token={token}")
    assert status in (401, 403)
    until_sync(lambda: pg_rows(pg) == sqlite_rows(lovd), 5.0)


def test_lovd_restore_by_hand_prints_new_links(lovd: LovdProc, pg: PgCluster) -> None:
    status, _, s = lovd.api("POST", "/api/sessions", {})
    assert status == 201
    until_sync(lambda: pg_rows(pg) == sqlite_rows(lovd), 5.0)
    r = lovd.cli("restore")
    assert r.returncode == 1 and "lovd is running; stop it first" in r.stderr
    lovd.stop()
    r = lovd.cli("restore")
    assert r.returncode == 1 and "already holds 1 session" in r.stderr
    for name in ("lovd.db", "lovd.db-wal", "lovd.db-shm"):
        (lovd.tmp / "state" / name).unlink(missing_ok=True)
    r = lovd.cli("restore", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["restored"] == 1 and set(out["links"]) == {s["id"]}
    lovd.start()
    link = out["links"][s["id"]].split("localhost", 1)[1]
    status, headers, _ = lovd.api("GET", link)
    assert status == 303 and "lovd_session" in headers.get("Set-Cookie", "")
    assert lovd.api("GET", link)[0] == 410  # a link works once


def test_two_hosts_one_postgres(tmp_path: Path, pg: PgCluster, test_image: str) -> None:
    a = lovd_with_pg(tmp_path / "a", pg, "host-a").start()
    b = lovd_with_pg(tmp_path / "b", pg, "host-b").start()
    try:
        sa = a.api("POST", "/api/sessions", {})[2]
        sb = b.api("POST", "/api/sessions", {})[2]
        both = {(sa["id"], "host-a"), (sb["id"], "host-b")}
        for p, mine in ((a, "host-a"), (b, "host-b")):
            until_sync(lambda p=p: {(s["id"], s["host_id"]) for s in
                              p.api("GET", "/api/sessions?scope=all")[2]["sessions"]} == both,
                 5.0)  # fmt: skip
            body = p.api("GET", "/api/sessions?scope=all")[2]
            assert {s["host_id"]: s["read_only"] for s in body["sessions"]} == {
                mine: False,
                ("host-b" if mine == "host-a" else "host-a"): True,
            }
        status, _, problem = a.api("DELETE", f"/api/sessions/{sb['id']}")
        assert status == 409 and "belongs to host 'host-b'" in problem["detail"], problem
        assert b.api("GET", f"/api/sessions/{sb['id']}")[0] == 200
        listed = a.cli("session", "list", "--all-hosts")
        assert listed.returncode == 0 and sb["id"] in listed.stdout and "host-b" in listed.stdout
        r = a.cli("session", "rm", sb["id"])
        assert r.returncode == 1 and "belongs to host 'host-b'" in r.stderr
    finally:
        cleanup(a)
        cleanup(b)
