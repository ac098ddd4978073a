"""A delete is crash-safe (lifecycle.delete): a tombstone first, then the container, the
workspace, the tombstone. A delete cut at each step, then a restart: the session was
gone for the API from the first step (never a row offered for wake whose history is
gone), the next start finishes the delete, and PostgreSQL's outbox carries exactly one
deletion. Before: the workspace went first and the row last, so a crash in between left
a "stopped" row without its workspace.

Fake runner, real SQLite and app; the crash is an exception at the step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lovd.session.model import SessionState
from tests.unit.conftest import open_api


class Crash(Exception):
    """lovd dies here (the test then opens a new lovd on the same state)."""


async def _crash(*_: Any) -> None:
    raise Crash


STEPS = ("container", "workspace", "tombstone")


@pytest.mark.parametrize("step", STEPS)
async def test_a_delete_cut_at_each_step_is_finished_at_the_next_start(
    tmp_path: Path, free_ports: list[int], step: str
) -> None:
    async with open_api(tmp_path, free_ports, warm_pool=0) as a:
        s, _ = await a.sessions.create(wait=True)
        keep, _ = await a.sessions.create(wait=True)  # another session, left alone
        workspace = a.config.sessions_path / s.id
        assert workspace.is_dir()
        if step == "container":
            a.sessions.launcher.stop_container = _crash  # type: ignore[method-assign]
        elif step == "workspace":
            a.runner.remove_workspace = _crash  # type: ignore[method-assign]
        else:
            a.store.purge = _crash  # type: ignore[method-assign]
        with pytest.raises(Crash):
            await a.sessions.delete(s.id)
        # Already gone for the API, the gate and admission: no wake of a half-deleted one.
        assert (await a.client.get(f"/api/sessions/{s.id}")).status == 404
        assert (await a.client.post(f"/api/sessions/{s.id}/wake")).status == 404
        assert a.store.get(s.id) is None
        assert await a.store.tombstones() == [s.id]
        assert workspace.exists() == (step != "tombstone")

    async with open_api(tmp_path, free_ports, warm_pool=0) as b:  # lovd starts again
        assert b.store.get(s.id) is None  # the tombstone is not loaded as a session
        listed = [x["id"] for x in (await (await b.client.get("/api/sessions")).json())["sessions"]]
        assert s.id not in listed and keep.id in listed
        stopped = []
        real_stop = b.runner.stop

        async def stop(sid: str) -> None:
            stopped.append(sid)
            await real_stop(sid)

        b.runner.stop = stop  # type: ignore[method-assign]
        report = await b.sessions.reconcile(startup=True)
        assert report["deletes_finished"] == [s.id]
        assert s.id in stopped  # a container that outlived the crash goes too
        assert not workspace.exists()
        assert await b.store.tombstones() == []
        # PostgreSQL (the outbox) saw the delete exactly once, at the tombstone.
        ops = [
            (r.op, json.loads(r.payload)["status"])
            for r in await b.store.outbox_read(10_000)
            if r.key == s.id
        ]
        assert ops.count(("delete", "deleted")) == 1 and ops[-1] == ("delete", "deleted"), ops
        # The other session keeps its row and workspace (the fake container did not
        # outlive the first lovd, so reconcile records it stopped).
        row = b.store.get(keep.id)
        assert row is not None and row.status == SessionState.STOPPED
        assert (b.config.sessions_path / keep.id).is_dir()
        assert (await b.sessions.reconcile())["deletes_finished"] == []


async def test_a_failed_workspace_removal_is_retried_by_the_next_reconcile(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """Not only after a crash: a delete whose workspace removal failed (a Podman error)
    is finished by the periodic reconcile."""
    from lovd.errors import LovdError

    async with open_api(tmp_path, free_ports, warm_pool=0) as a:
        s, _ = await a.sessions.create(wait=True)
        real = a.runner.remove_workspace

        async def fails(path: Path) -> None:
            raise LovdError("runner-failed", "could not remove workspace")

        a.runner.remove_workspace = fails  # type: ignore[method-assign]
        r = await a.client.delete(f"/api/sessions/{s.id}")
        assert r.status == 502
        assert (await a.client.get(f"/api/sessions/{s.id}")).status == 404
        assert (await a.sessions.reconcile())["deletes_finished"] == []  # still failing
        a.runner.remove_workspace = real  # type: ignore[method-assign]
        assert (await a.sessions.reconcile())["deletes_finished"] == [s.id]
        assert not (a.config.sessions_path / s.id).exists()


async def test_a_tombstone_gives_its_port_back(tmp_path: Path, free_ports: list[int]) -> None:
    """The tombstone keeps its row until the workspace is gone, but not its port (the
    port column is unique): a new session may take the port at once."""
    async with open_api(tmp_path, free_ports, warm_pool=0) as a:
        s, _ = await a.sessions.create(wait=True)
        await a.store.tombstone(s.id, "test")
        from dataclasses import replace

        again = replace(s, id="0123456789abcdef", status="creating")
        assert (await a.store.insert(again)).port == s.port
