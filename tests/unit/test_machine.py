"""The one writer of a session's state (lovd/session/machine.py) against a real SQLite
store: the table, the compare-and-set, one transaction for row, event and outbox, and
waiters woken by transitions (no polling)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lovd import ids
from lovd.errors import LovdError
from lovd.metrics import Metrics
from lovd.session.machine import StateMachine
from lovd.session.model import TRANSITIONS, IllegalTransition, Session, SessionState, allowed
from lovd.session.wakes import Wakes
from lovd.store import StaleRow, Store
from tests.fakes import FakeRunner, force_state
from tests.unit.conftest import open_api

S = SessionState


@pytest.fixture
async def machine(tmp_path: Path) -> AsyncIterator[StateMachine]:
    store = await Store.open(tmp_path / "lovd.db")
    try:
        yield StateMachine(store, Metrics())
    finally:
        await store.close()


_PORTS = iter(range(20000, 30000))


async def new_row(m: StateMachine, to: SessionState = S.CREATING) -> Session:
    now = time.time()
    return await m.create(
        to,
        id=ids.new_session_id(),
        reason="",
        token_hash=ids.hash_token("t"),
        port=next(_PORTS),
        container_id="",
        host_id="h",
        created_at=now,
        updated_at=now,
        expires_at=now + 60,
        last_activity=now,
    )


async def snapshot(store: Store, sid: str) -> tuple[Any, ...]:
    """Everything a write could have touched: the row, its events, the outbox."""
    history = await store.history(sid)
    return store.get(sid), history["events"], await store.outbox_batch()


async def test_a_transition_outside_the_table_raises_and_changes_nothing(
    machine: StateMachine,
) -> None:
    s = await new_row(machine)
    await machine.transition(s.id, S.STARTING)
    before = await snapshot(machine.store, s.id)
    assert not allowed(S.STARTING, S.IDLE_STOPPED)
    with pytest.raises(IllegalTransition):
        await machine.transition(s.id, S.IDLE_STOPPED, reason="nope", container_id="c9")
    assert await snapshot(machine.store, s.id) == before
    # A new row may not begin running, and a deleted row is final.
    with pytest.raises(IllegalTransition):
        await new_row(machine, S.RUNNING)
    assert await machine.delete(s.id, "bye")
    with pytest.raises(KeyError):
        await machine.transition(s.id, S.STARTING)


async def test_every_pair_of_states_follows_the_table(machine: StateMachine) -> None:
    """From each state to each: done exactly when TRANSITIONS allows it; a refused one
    leaves row, events and outbox as they were."""
    for frm in (k for k in TRANSITIONS if k not in (None, S.DELETED)):
        for to in S:
            if to == S.DELETED:
                continue  # delete()/drop(), below
            s = await new_row(machine)
            await force_state(machine.store, s.id, frm)
            before = await snapshot(machine.store, s.id)
            if allowed(frm, to):
                row = await machine.transition(s.id, to, reason="r")
                assert (row.status, row.reason, row.version) == (to, "r", before[0].version + 1)
            else:
                with pytest.raises(IllegalTransition):
                    await machine.transition(s.id, to)
                assert await snapshot(machine.store, s.id) == before, (frm, to)
        s = await new_row(machine)
        await force_state(machine.store, s.id, frm)
        assert await machine.delete(s.id, "gone")
        assert machine.store.get(s.id) is None


async def test_a_lost_compare_and_set_is_stale_and_changes_nothing(
    machine: StateMachine,
) -> None:
    s = await new_row(machine, S.WARM)
    await machine.transition(s.id, S.STARTING, expect=(S.WARM,), reason="claimed")
    before = await snapshot(machine.store, s.id)
    with pytest.raises(StaleRow):  # a discard that came second
        await machine.transition(s.id, S.STOPPING, expect=(S.WARM,))
    assert await snapshot(machine.store, s.id) == before


async def test_row_event_and_outbox_are_one_write(machine: StateMachine) -> None:
    s = await new_row(machine)
    row = await machine.transition(s.id, S.STARTING, reason="go", event="began", port=s.port)
    assert row.status is S.STARTING  # typed, not a bare string
    events = (await machine.store.history(s.id))["events"]
    assert events[0]["kind"] == "began" and events[0]["detail"] == "go"
    outbox = await machine.store.outbox_batch()
    assert [r[3] for r in outbox if r[2] == s.id] == [1, 2]  # created, began
    counted = machine.metrics.transitions.labels("creating", "starting")._value.get()  # type: ignore[union-attr]
    assert counted == 1


async def test_the_store_refuses_a_state_change_outside_the_machine(
    machine: StateMachine,
) -> None:
    s = await new_row(machine)
    before = await snapshot(machine.store, s.id)
    with pytest.raises(ValueError, match="machine"):
        await machine.store.update(s.id, status=S.RUNNING)
    assert await snapshot(machine.store, s.id) == before
    # Fields are fine, and leave the state alone.
    row = await machine.store.update(s.id, used_at=5.0)
    assert row.status == S.CREATING and row.used_at == 5.0


async def test_a_waiter_is_woken_by_the_transition(machine: StateMachine) -> None:
    s = await new_row(machine)
    waiter = asyncio.create_task(machine.wait(s.id, lambda r: r.serving, timeout=30))
    await asyncio.sleep(0)
    assert not waiter.done()
    # A write that is no transition (the primitive, behind the machine's back) wakes
    # nobody: the waiter sleeps on transitions, it does not poll the store.
    await force_state(machine.store, s.id, S.RUNNING)
    done, _ = await asyncio.wait({waiter}, timeout=0.3)
    assert not done
    await force_state(machine.store, s.id, S.STARTING)
    t0 = time.monotonic()
    await machine.transition(s.id, S.RUNNING, container_id="c1")
    row = await asyncio.wait_for(waiter, 1)
    assert row is not None and row.serving and row.container_id == "c1"
    assert time.monotonic() - t0 < 0.5


async def test_a_waiter_sees_the_delete_and_times_out_otherwise(
    machine: StateMachine,
) -> None:
    s = await new_row(machine)
    with pytest.raises(TimeoutError):
        await machine.wait(s.id, lambda r: r.serving, timeout=0.05)
    waiter = asyncio.create_task(machine.wait(s.id, lambda r: r.serving, timeout=30))
    await asyncio.sleep(0)
    await machine.delete(s.id, "bye")
    assert await asyncio.wait_for(waiter, 1) is None


async def test_one_wake_per_session_waits_out_a_settling_row(machine: StateMachine) -> None:
    """Two sockets ask: one wake. A row someone else is creating is woken only once it
    changes (no poll), and the wake's failure stays readable."""
    s = await new_row(machine)  # creating: its creator is about to start it
    calls: list[str] = []

    async def wake(sid: str, client: str) -> Session:
        calls.append(client)
        raise LovdError("start-timeout", "did not answer")

    wakes = Wakes(machine, wake, timeout=30)
    first = wakes.ensure(s.id, "a")
    assert wakes.ensure(s.id, "b") is first and wakes.waking(s.id)
    await asyncio.sleep(0.05)
    assert calls == []  # still creating
    await machine.transition(s.id, S.FAILED, reason="creator gave up")
    with pytest.raises(LovdError):
        await asyncio.wait_for(first, 1)
    assert calls == ["a"]
    assert not wakes.waking(s.id)
    err = wakes.error(s.id)
    assert err is not None and err.code == "start-timeout"
    await wakes.drain()


async def test_one_start_and_one_wake_write_the_state_twice(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """The launcher's start: starting, then running. A wake: the same two (the broker
    credential rides on the starting write)."""
    async with open_api(tmp_path, free_ports, warm_pool=0) as a:
        writes: list[tuple[str, SessionState]] = []
        fields: list[str] = []
        real_transition = a.sessions.machine.transition
        real_update = a.store.update

        async def transition(sid: str, to: SessionState, **kw: Any) -> Session:
            writes.append((sid, SessionState(to)))
            return await real_transition(sid, to, **kw)

        async def update(sid: str, **kw: Any) -> Session:
            fields.append(sid)
            return await real_update(sid, **kw)

        a.sessions.machine.transition = transition  # type: ignore[method-assign]
        a.store.update = update  # type: ignore[method-assign]
        s, _ = await a.sessions.create(wait=True)
        assert writes == [(s.id, S.STARTING), (s.id, S.RUNNING)] and fields == []
        first_hash = a.store.get(s.id).broker_hash  # type: ignore[union-attr]
        await a.sessions.stop(s.id, S.IDLE_STOPPED, "idle")
        writes.clear()
        await a.sessions.wake(s.id)
        assert writes == [(s.id, S.STARTING), (s.id, S.RUNNING)] and fields == []
        row = a.store.get(s.id)
        # The wake's container got a credential of its own, written with "starting".
        assert row is not None and row.serving and row.broker_hash not in ("", first_hash)


async def test_a_stop_is_retried_after_its_container_stop_failed(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """The row stays stopping when Podman fails the stop; the retry is a transition the
    table allows (stopping -> stopping), not a 500."""
    async with open_api(tmp_path, free_ports, warm_pool=0) as a:
        s, _ = await a.sessions.create(wait=True)
        real_stop = a.runner.stop

        async def broken(sid: str) -> None:
            raise LovdError("runner-failed", "podman stop did not finish")

        a.runner.stop = broken  # type: ignore[method-assign]
        with pytest.raises(LovdError):
            await a.sessions.stop(s.id)
        assert a.store.get(s.id).status == S.STOPPING  # type: ignore[union-attr]
        a.runner.stop = real_stop  # type: ignore[method-assign]
        row = await a.sessions.stop(s.id)
        assert row.status == S.STOPPED and row.container_id == ""


async def test_a_stop_that_comes_in_during_reconcile_waits_and_then_wins(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """Reconcile settles a row under the session's lock; a person's stop arriving while
    it removes the container waits for it, then applies (rather than being overwritten,
    or raising)."""
    async with open_api(tmp_path, free_ports, warm_pool=0) as a:
        s, _ = await a.sessions.create(wait=True)
        await a.runner.stop(s.id)  # the container vanished
        real_stop = a.runner.stop
        stops: list[asyncio.Task[object]] = []

        async def stop_while_a_person_stops_it(sid: str) -> None:
            a.runner.stop = real_stop  # type: ignore[method-assign]
            stops.append(asyncio.ensure_future(a.sessions.stop(sid, S.IDLE_STOPPED, "idle")))
            await asyncio.sleep(0.05)  # the person's stop is under way meanwhile
            await real_stop(sid)

        a.runner.stop = stop_while_a_person_stops_it  # type: ignore[method-assign]
        await a.sessions.reconcile()
        await asyncio.wait_for(stops[0], 5)
        row = a.store.get(s.id)
        assert row is not None and (row.status, row.reason) == (S.IDLE_STOPPED, "idle")
        assert s.id not in a.runner.servers


async def test_requests_on_two_sockets_share_one_wake_and_its_failure(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """Two held requests (and the API socket's gate) wake a stopped session once; a wake
    that fails is what the progress page's status poll reports."""
    from tests.unit.test_gate import NAV, XHR, open_gate

    async with open_gate(tmp_path, free_ports) as g:
        runner = g.sessions.launcher.runner
        assert isinstance(runner, FakeRunner)
        s, token = await g.session("idle-stopped")
        runner.start_delay = 0.3
        held = asyncio.gather(
            g.auth(s, token, "GET", "/session", XHR), g.auth(s, token, "GET", "/session", XHR)
        )
        await g.sessions.wait(s.id, lambda row: row.status == S.STARTING, 5)
        # Whoever asks next (the API socket's /c/{id} shares this gate and this
        # facade) finds the same wake under way, not a second one.
        assert g.sessions.ensure_waking(s.id) is g.sessions.ensure_waking(s.id)
        first, second = await held
        assert (first.status, second.status) == (204, 204)
        assert len(runner.starts) == 1
        assert not g.sessions.wakes.waking(s.id)
        # Stopped again; now the container cannot start.
        await g.sessions.stop(s.id, S.IDLE_STOPPED, "idle")
        runner.fail_start = LovdError("runner-failed", "podman run failed (test)")
        r = await g.auth(s, token, "GET", "/", NAV)
        assert r.status == 503  # the progress page
        await g.sessions.wait(s.id, lambda row: row.status == S.FAILED, 5)
        poll = await g.client.get(
            "/_lovd/status",
            headers={"Cookie": f"lovd_session={s.id}.{token}", "Accept-Language": "en"},
        )
        body = await poll.json()
        assert body["error"] and "run failed (test)" in body["message"], body
