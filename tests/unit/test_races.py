"""Races in the session lifecycle, each forced into the interleaving that used to lose.

Real app and SQLite, the fake runner; each test fails against the code before its fix
(named in the test)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from lovd.errors import LovdError
from lovd.podman import ContainerInfo
from lovd.session.model import SessionState
from tests.unit.conftest import open_api
from tests.waiting import until


async def test_a_start_finishing_during_reconcile_is_not_taken_for_lost(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """Before: reconcile listed containers, then read the rows; a start that finished in
    between looked like a running row without a container and was stopped."""
    async with open_api(tmp_path, free_ports, warm_pool=0) as a:
        s, _ = await a.sessions.create(wait=True)
        await a.sessions.machine.transition(s.id, SessionState.STARTING)  # as if its start ran
        real_list = a.runner.list

        async def list_then_finish_the_start() -> list[ContainerInfo]:
            listed = [c for c in await real_list() if c.session_id != s.id]
            await a.sessions.machine.transition(s.id, SessionState.RUNNING)  # the start finishes
            return listed

        a.runner.list = list_then_finish_the_start  # type: ignore[method-assign]
        report = await a.sessions.reconcile()
        assert s.id not in report["lost"]
        row = a.store.get(s.id)
        assert row is not None and row.status == SessionState.RUNNING
        assert s.id in a.runner.servers  # its container was left alone


async def test_a_warm_claim_racing_a_discard_never_hands_out_a_deleted_session(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """Before: a discard checked 'warm', then stopped the container while a create claimed
    the same row; the discard then deleted the row the user had just been given."""
    async with open_api(tmp_path, free_ports, warm_pool=1) as a:
        await a.sessions.pool(a.config.warm_max_age).fill()
        [warm] = a.sessions.warm()
        discard = asyncio.create_task(a.sessions.discard_warm(warm.id, "recycled"))
        await asyncio.sleep(0)  # the discard holds the row's lock and is stopping it
        s, token = await a.sessions.create(wait=True)
        await discard
        row = a.store.get(s.id)
        assert row is not None and row.status == SessionState.RUNNING and token
        assert a.store.get(warm.id) is None or (warm.id == s.id and row.container_id)


async def test_wake_racing_a_delete_is_a_404_not_a_crash(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """Before: wake() wrote the row without the session's lock; a delete that finished
    first made that write fail with KeyError (a 500)."""
    async with open_api(tmp_path, free_ports, warm_pool=0) as a:
        s, _ = await a.sessions.create(wait=True)
        await a.sessions.stop(s.id, SessionState.IDLE_STOPPED, "idle")
        async with a.sessions.admission.lock:  # the wake waits here, past its own check
            wake = asyncio.create_task(a.sessions.wake(s.id))
            await asyncio.sleep(0.01)
            await a.sessions.delete(s.id)
        with pytest.raises(LovdError) as e:
            await wake
        assert e.value.code == "session-not-found"
        r = await a.client.get(f"/api/sessions/{s.id}")
        assert r.status == 404


async def test_a_start_interrupted_by_shutdown_is_left_for_the_next_lovd(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """Before: a cancelled start was recorded as failed ('internal: start interrupted') and
    its container stopped; now the row and container stay for the next lovd to adopt."""
    async with open_api(tmp_path, free_ports, warm_pool=0) as a:
        a.runner.never_ready = True
        s, _ = await a.sessions.create(wait=False)
        await until(lambda: s.id in a.runner.servers, 1, "the container started")
        await a.sessions.drain()  # what shutdown does
        row = a.store.get(s.id)
        assert row is not None and row.status == SessionState.STARTING, row
        assert s.id in a.runner.servers  # the container keeps running


async def test_reconcile_asks_the_supervisor_once_per_pass(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_api(tmp_path, free_ports, warm_pool=0, limits={"max_running": 5}) as a:
        for _ in range(5):
            await a.sessions.create(wait=True)
        before = a.runner.unit_queries
        await a.sessions.reconcile()
        assert a.runner.unit_queries - before == 1


async def test_a_start_cannot_launch_while_reconcile_settles_its_row(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """Before: reconcile checked the session's lock, then stopped the (gone) container and
    wrote "stopped" without holding it; a health restart's start launched its container
    in between, and the row ended stopped with a container running (found by
    test_state_props.py). Now reconcile holds the lock: the start waits, sees the stop,
    and launches nothing."""
    async with open_api(tmp_path, free_ports, warm_pool=0) as a:
        s, _ = await a.sessions.create(wait=True)
        sid = s.id
        async with a.sessions.launcher.lock(sid):
            secret = await a.sessions.starts.begin(sid, "restarting: test")
        await a.runner.vanish(sid)  # the old container is gone; the new one not yet made
        real_stop = a.runner.stop
        in_stop, go_on = asyncio.Event(), asyncio.Event()

        async def slow_stop(session_id: str) -> None:
            in_stop.set()
            await go_on.wait()
            await real_stop(session_id)

        a.runner.stop = slow_stop  # type: ignore[method-assign]
        settle = asyncio.create_task(a.sessions.reconcile())
        await asyncio.wait_for(in_stop.wait(), 5)
        start = asyncio.create_task(a.sessions.starts.start(sid, secret=secret))
        await asyncio.sleep(0.2)  # time for a start that does not wait to launch
        go_on.set()
        await settle
        with contextlib.suppress(LovdError):
            await start
        row = a.store.get(sid)
        assert row is not None
        if row.status in (SessionState.STOPPED, SessionState.FAILED):
            assert sid not in a.runner.servers, f"{row.status} with a container running"
        else:
            assert row.status == SessionState.RUNNING and sid in a.runner.servers
