"""A fair start: sessions nobody chats in give their place back after unused_timeout, and
the wait a refused visitor is told is the real one. Real app, real SQLite, fake runner,
a clock the test moves."""

from __future__ import annotations

import time
from pathlib import Path

from tests.unit.conftest import open_api


async def test_unused_sessions_give_their_place_back_when_the_wait_said(
    tmp_path: Path, free_ports: list[int]
) -> None:
    now = [time.time()]
    async with open_api(
        tmp_path,
        free_ports,
        unused_timeout=300,
        idle_timeout=3600,
        limits={"max_running": 3},
    ) as a:
        a.clock.use(lambda: now[0])
        made = []
        for _ in range(3):
            r = await a.client.post("/api/sessions")
            assert r.status == 201
            made.append((await r.json())["id"])
        used, *unused = made
        a.sessions.mark_used(used)  # what the gate does on a chat request
        await a.sessions.flush_activity()
        assert a.store.get(used).used_at > 0  # type: ignore[union-attr]

        now[0] += 100
        r = await a.client.post("/api/sessions")
        body = await r.json()
        # The soonest place: an unused session's, 200 s from now (not the idle hour).
        assert r.status == 429 and body["retry_after"] == 200
        assert r.headers["Retry-After"] == "200"
        wait = a.sessions.next_deadline()
        assert wait is not None and 199 <= wait <= 200

        now[0] += 199
        assert await a.sessions.cleanup() == []
        assert a.store.get(unused[0]).status == "running"  # type: ignore[union-attr]
        now[0] += 1.5
        await a.sessions.cleanup()
        for sid in unused:
            s = a.store.get(sid)
            assert s is not None and s.status == "idle-stopped"
            assert s.reason == "no chat request within unused_timeout"
        assert a.store.get(used).status == "running"  # type: ignore[union-attr]
        # Their workspaces are kept: an unused session wakes like an idle one.
        assert all((a.config.sessions_path / sid).is_dir() for sid in unused)
        r = await a.client.post("/api/sessions")
        assert r.status == 201  # the fourth visitor is served


async def test_idle_timeout_still_applies_to_used_sessions(
    tmp_path: Path, free_ports: list[int]
) -> None:
    now = [time.time()]
    async with open_api(
        tmp_path, free_ports, unused_timeout=300, idle_timeout=600, limits={"max_running": 1}
    ) as a:
        a.clock.use(lambda: now[0])
        sid = (await (await a.client.post("/api/sessions")).json())["id"]
        a.sessions.mark_used(sid)
        now[0] += 400  # past unused_timeout, but it was used
        await a.sessions.cleanup()
        assert a.store.get(sid).status == "running"  # type: ignore[union-attr]
        a.sessions.touch(sid)
        r = await a.client.post("/api/sessions")
        assert r.status == 429 and (await r.json())["retry_after"] == 600
        now[0] += 601
        await a.sessions.cleanup()
        s = a.store.get(sid)
        assert s is not None and (s.status, s.reason) == (
            "idle-stopped",
            "no activity for idle_timeout",
        )


async def test_a_session_still_answering_is_never_idle_stopped(
    tmp_path: Path, free_ports: list[int]
) -> None:
    now = [time.time()]
    async with open_api(tmp_path, free_ports, idle_timeout=600, warm_pool=0) as a:
        a.clock.use(lambda: now[0])
        sid = (await (await a.client.post("/api/sessions")).json())["id"]
        a.sessions.mark_used(sid)
        a.runner.busy.add(sid)  # OpenCode: a reply is still being produced
        now[0] += 601
        await a.sessions.cleanup()
        assert a.store.get(sid).status == "running"  # type: ignore[union-attr]
        assert a.sessions.activity[sid] == now[0]  # the answer counted as activity
        a.runner.busy.discard(sid)
        now[0] += 601
        await a.sessions.cleanup()
        assert a.store.get(sid).status == "idle-stopped"  # type: ignore[union-attr]
