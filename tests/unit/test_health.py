"""Health probes, history and restarts, in-process: real app, real SQLite, real HTTP
probes against the fake runner's servers (a dead server stands in for a hung one here;
tests/integration/test_health.py stops a real one with SIGSTOP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lovd.session.health import failure_class
from lovd.session.model import SessionState
from tests.unit.conftest import Api, open_api

FAST = {"health": {"failures": 2, "probe_timeout": 0.5, "restart_attempts": 2, "history": 6}}


async def kill(a: Api, sid: str) -> None:
    """The container still runs but its server stops answering."""
    await a.runner.hang(sid)


async def test_failed_probes_restart_the_same_session(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_api(tmp_path, free_ports, warm_pool=0, **FAST) as a:
        s, _ = await a.sessions.create(wait=True)
        assert (await a.sessions.health_pass())["unhealthy"] == []
        await kill(a, s.id)
        first = await a.sessions.health_pass()
        assert first["unhealthy"] == [s.id] and first["restarted"] == []  # one failure: wait
        second = await a.sessions.health_pass()
        assert second["restarted"] == [s.id]
        row = a.store.get(s.id)
        assert row is not None and row.status == SessionState.RUNNING
        assert (row.id, row.port, row.token_hash) == (s.id, s.port, s.token_hash)
        assert row.restarts == 1 and row.broker_hash != s.broker_hash  # a new credential
        assert s.id in a.runner.servers  # answering again
        r = await a.client.get(f"/api/sessions/{s.id}/health")
        report = await r.json()
        assert r.status == 200 and report["restarts"] == 1 and report["failure_class"] == ""
        details = [h["detail"] for h in report["history"]]
        assert any(d.startswith("restart 1: 2 failed probes") for d in details), details
        assert sum(d.startswith("probe failed") for d in details) == 2
        assert report["history"][-1]["ok"] is True  # the oldest kept: the first good probe


async def test_too_many_restarts_fail_the_session_but_keep_it(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_api(tmp_path, free_ports, warm_pool=0, **FAST) as a:
        s, _ = await a.sessions.create(wait=True)
        for _ in range(2):  # restart_attempts
            await kill(a, s.id)
            await a.sessions.health_pass()
            assert (await a.sessions.health_pass())["restarted"] == [s.id]
        await kill(a, s.id)
        await a.sessions.health_pass()
        assert (await a.sessions.health_pass())["failed"] == [s.id]
        row = a.store.get(s.id)
        assert row is not None and row.status == SessionState.FAILED
        assert failure_class(row.reason) == "unhealthy"
        assert (a.config.sessions_path / s.id).is_dir()  # the chat stays
        assert not (a.sessions.secrets_dir / f"{s.id}.env").exists()
        report = await (await a.client.get(f"/api/sessions/{s.id}/health")).json()
        assert report["failure_class"] == "unhealthy" and report["restarts_in_window"] == 2
        assert len(report["history"]) == 6  # health.history bounds it
        woken = await a.sessions.wake(s.id)  # a failed session wakes on request
        assert woken.status == SessionState.RUNNING


@pytest.mark.parametrize(
    ("reason", "cls"),
    [
        ("unit failed (exit-code); gave up after 3 restarts", "exit-code"),
        ("container exited with code 3", "exit-code 3"),
        ("container exited with code 137 (out of memory)", "oom"),
        ("unhealthy: 3 failed probes after 3 restarts", "unhealthy"),
        (
            "session image localhost/x is not present in the lovd user's Podman store",
            "image-missing",
        ),
        ("session did not answer /global/health within 60 s (ready_timeout)", "start-timeout"),
        ("lovd stopped while the session was being created", "interrupted"),
        ("deleted by request", ""),
    ],
)
def test_failure_classes(reason: str, cls: str) -> None:
    assert failure_class(reason) == cls


async def test_a_unit_systemd_is_restarting_is_left_to_systemd(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """Under the systemd runner a crashed container is the unit's to restart (its
    start limit fails it after restart_attempts): lovd's probes must not restart it too
    (a restart through systemctl resets the unit's start counter)."""
    from lovd.runner import UnitState

    async with open_api(tmp_path, free_ports, warm_pool=0, **FAST) as a:
        s, _ = await a.sessions.create(wait=True)
        await kill(a, s.id)
        a.runner.units[s.id] = UnitState("activating", "auto-restart", "exit-code", 1)
        for _ in range(4):
            report = await a.sessions.health_pass()
            assert report["restarted"] == [] and report["unhealthy"] == []
        a.runner.units[s.id] = UnitState("active", "running", "success", 1)
        await a.sessions.health_pass()
        assert (await a.sessions.health_pass())["restarted"] == [s.id]  # active, not answering
