"""The SQLite store against a real database file: outbox atomicity and durability."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path

import pytest

from lovd import ids
from lovd.store import Session, Store
from tests.fakes import force_state


def new_session(port: int = 20000) -> Session:
    now = time.time()
    return Session(
        ids.new_session_id(),
        "creating",
        "",
        ids.hash_token("t"),
        port,
        "",
        "h",
        now,
        now,
        now + 60,
        now,
    )


async def test_every_change_writes_one_outbox_row_in_order(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "lovd.db")
    s = await store.insert(new_session())
    await force_state(store, s.id, "starting")
    await force_state(store, s.id, "running", container_id="c1")
    await store.delete(s.id, "bye")
    rows = await store.outbox_batch()
    assert [(r[2], r[3], r[4]) for r in rows] == [
        (s.id, 1, "upsert"),
        (s.id, 2, "upsert"),
        (s.id, 3, "upsert"),
        (s.id, 4, "delete"),
    ]
    last = json.loads(rows[-1][5])
    assert last["status"] == "deleted" and last["reason"] == "bye"
    await store.outbox_ack(rows[1][0])
    assert await store.outbox_size() == 2
    await store.close()


async def test_failed_write_changes_nothing(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "lovd.db")
    a = await store.insert(new_session(20000))
    before = await store.outbox_size()
    with pytest.raises(sqlite3.IntegrityError):  # same port: the unique index refuses it
        await store.insert(new_session(20000))
    assert await store.outbox_size() == before
    assert [s.id for s in store.all()] == [a.id]
    await store.close()


async def test_state_survives_reopen_and_schema_is_versioned(tmp_path: Path) -> None:
    db = tmp_path / "lovd.db"
    store = await Store.open(db)
    s = await store.insert(new_session())
    await force_state(store, s.id, "running")
    instance = store.instance_id
    await store.close()
    again = await Store.open(db)
    got = again.get(s.id)
    assert got is not None and got.status == "running" and got.version == 2
    assert again.instance_id == instance
    await again.close()
    with sqlite3.connect(db) as conn:
        from lovd.store import _MIGRATIONS

        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(_MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert oct(db.stat().st_mode & 0o777) == "0o600"


async def test_schema_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    """A database written by the previous release keeps its rows and gains the columns."""
    from lovd.store import _MIGRATIONS

    db = tmp_path / "lovd.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(_MIGRATIONS[0])
        conn.execute(
            "INSERT INTO sessions (id, status, token_hash, port, host_id, created_at, "
            "updated_at, expires_at, last_activity) VALUES "
            "('0123456789abcdef', 'running', 'h', 20001, 'h', 1, 1, 9e9, 1)"
        )
        conn.execute("PRAGMA user_version = 1")
    store = await Store.open(db)
    got = store.get("0123456789abcdef")
    assert got is not None and got.status == "running"
    assert got.used_at == 0.0 and got.broker_hash == ""
    # Its cookie still works; its old link (which carried the cookie secret) does not.
    assert got.token_hash == "h" and got.link_hash == "" and got.link_used_at == 0.0
    await store.close()


async def test_usage_is_saved_absolute_and_dies_with_the_session(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "lovd.db")
    s = await store.insert(new_session())
    await store.save_usage(
        {s.id: (1, 10, 20, 3, 0), "feedfeedfeedfeed": (9, 9, 9, 9, 9)}, {"2026-11-30": 30}
    )
    await store.save_usage({s.id: (2, 15, 25, 3, 1)}, {"2026-11-30": 40})  # a replay-safe upsert
    rows, days = await store.load_usage()
    assert rows == {s.id: (2, 15, 25, 3, 1)}  # no row for a session that does not exist
    assert days == {"2026-11-30": 40}
    await store.delete(s.id)
    rows, _ = await store.load_usage()
    assert rows == {}
    await store.close()


async def test_outbox_never_carries_the_broker_credential_hash(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "lovd.db")
    s = await store.insert(new_session())
    await store.update(s.id, broker_hash=ids.hash_token("secret"))
    payloads = [json.loads(r[5]) for r in await store.outbox_batch()]
    assert payloads and all("broker_hash" not in p for p in payloads)
    await store.close()


async def test_wal_and_shm_files_get_the_database_mode(tmp_path: Path) -> None:
    db = tmp_path / "lovd.db"
    store = await Store.open(db)
    await store.insert(new_session())
    for suffix in ("-wal", "-shm"):
        f = db.with_name(db.name + suffix)
        assert f.exists() and oct(f.stat().st_mode & 0o777) == "0o600", suffix
    await store.close()


async def test_a_write_cancelled_at_any_point_leaves_the_store_usable_and_true(
    tmp_path: Path,
) -> None:
    """A caller cancelled in the middle of a write (shutdown drains, a bounded wait) must
    neither leave the connection inside a transaction nor leave the rows in memory behind
    what was committed. Cancel one update after 0, 1, 2, … turns of the event loop, until
    one runs through uncancelled; after each, the store writes again and memory matches
    the database file."""
    store = await Store.open(tmp_path / "lovd.db")
    s = await store.insert(new_session())
    turns = 0
    while True:
        task = asyncio.create_task(store.update(s.id, reason=f"try {turns}"))
        for _ in range(turns):
            await asyncio.sleep(0)
        finished = task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.update(s.id, container_id=f"c{turns}")  # the connection still writes
        with sqlite3.connect(tmp_path / "lovd.db") as db:
            reason, version = db.execute(
                "SELECT reason, version FROM sessions WHERE id = ?", (s.id,)
            ).fetchone()
        row = store.get(s.id)
        assert row is not None and (row.reason, row.version) == (reason, version), turns
        if finished:
            break
        turns += 1
    assert turns > 3  # the cancellations landed inside the write, not only before it
    await store.close()
