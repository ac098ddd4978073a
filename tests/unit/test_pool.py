"""The warm pool, in-process: real app, real SQLite, real readiness probes; fake runner."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from lovd import ids
from lovd.errors import LovdError
from lovd.session.model import SessionState
from lovd.session.warm import WarmPool
from tests.unit.conftest import Api, open_api
from tests.waiting import until

WARM = SessionState.WARM


def pool_of(a: Api) -> WarmPool:
    return a.sessions.pool(a.config.warm_max_age, retry_delay=0.1)


def warm_ids(a: Api) -> list[str]:
    return [s.id for s in a.sessions.warm()]


async def test_claim_hands_out_the_warm_container_and_refills(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_api(tmp_path, free_ports, warm_pool=1) as a:
        pool = pool_of(a)
        assert await pool.fill()
        [wid] = warm_ids(a)
        assert a.store.get(wid).token_hash == ""  # type: ignore[union-attr]
        assert [s.session_id for s in a.runner.starts] == [wid]
        # Invisible to the API until claimed.
        assert (await (await a.client.get("/api/sessions")).json()) == {"sessions": []}
        assert (await a.client.get(f"/api/sessions/{wid}")).status == 404
        assert (await a.client.delete(f"/api/sessions/{wid}")).status == 404
        assert (await a.client.get(f"/c/{wid}?token=x", allow_redirects=False)).status == 401

        r = await a.client.post("/api/sessions")
        s = await r.json()
        assert r.status == 201 and s["id"] == wid and s["status"] == "running"
        assert len(a.runner.starts) == 1  # no second container was started
        row = a.store.get(wid)
        assert row is not None and ids.token_matches(s["token"], row.link_hash)
        r = await a.client.get(f"/c/{wid}?token={s['token']}", allow_redirects=False)
        assert r.status == 303
        metrics = await (await a.client.get("/metrics")).text()
        assert 'lovd_warm_claims_total{result="hit"} 1.0' in metrics

        assert await pool.fill()
        [wid2] = warm_ids(a)
        assert wid2 != wid and len(a.runner.starts) == 2


async def test_warm_containers_use_free_places_only(tmp_path: Path, free_ports: list[int]) -> None:
    async with open_api(tmp_path, free_ports, warm_pool=2, limits={"max_running": 2}) as a:
        pool = pool_of(a)
        await pool.fill()
        assert len(warm_ids(a)) == 2
        one = await (await a.client.post("/api/sessions")).json()
        await pool.fill()
        assert len(warm_ids(a)) == 1  # 1 running + 1 warm = max_running
        two = await (await a.client.post("/api/sessions")).json()
        await pool.fill()
        assert warm_ids(a) == [] and a.sessions.running_count() == 2
        assert (await a.client.post("/api/sessions")).status == 429
        assert {one["status"], two["status"]} == {"running"}


async def test_a_waking_session_takes_the_place_of_a_warm_container(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_api(tmp_path, free_ports, warm_pool=1, limits={"max_running": 2}) as a:
        pool = pool_of(a)
        x = await (await a.client.post("/api/sessions")).json()  # cold: the pool is empty
        await a.sessions.stop(x["id"], "idle-stopped", "test")
        await pool.fill()
        y = await (await a.client.post("/api/sessions")).json()  # claims the warm one
        await pool.fill()
        [wid] = warm_ids(a)
        assert a.sessions.running_count() == 1
        woken = await a.sessions.wake(x["id"])
        assert woken.status == "running"
        await until(lambda: not warm_ids(a))
        assert warm_ids(a) == [] and wid not in a.runner.servers
        assert a.sessions.get(y["id"]).status == "running"


async def test_dead_warm_container_is_replaced_and_a_dead_claim_restarts(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_api(tmp_path, free_ports, warm_pool=1) as a:
        pool = pool_of(a)
        await pool.fill()
        [wid] = warm_ids(a)
        await a.runner.stop(wid)  # the container died while nobody owned it
        await a.sessions.reconcile()
        assert a.store.get(wid) is None
        assert not (a.config.sessions_path / wid).exists()
        await pool.fill()
        [wid2] = warm_ids(a)
        # Dies again, and this time a user claims it before reconcile notices:
        # the claim probes it and starts it afresh under the same id.
        await a.runner.stop(wid2)
        s = await (await a.client.post("/api/sessions")).json()
        assert s["id"] == wid2 and s["status"] == "running"
        assert [x.session_id for x in a.runner.starts].count(wid2) == 2
        assert wid2 in a.runner.servers


async def test_claim_while_the_warm_container_is_still_booting(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_api(tmp_path, free_ports, warm_pool=1) as a:
        pool = pool_of(a)
        a.runner.start_delay = 0.3
        filling = asyncio.create_task(pool.fill())
        await until(lambda: bool(warm_ids(a)), 2, "the warm row")
        [wid] = warm_ids(a)
        s = await (await a.client.post("/api/sessions")).json()
        assert s["id"] == wid and s["status"] == "running"
        assert [x.session_id for x in a.runner.starts] == [wid]  # waited; did not restart it
        await filling


async def test_failed_warm_start_leaves_nothing_and_backs_off(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_api(tmp_path, free_ports, warm_pool=1) as a:
        pool = pool_of(a)
        a.runner.fail_start = LovdError("runner-failed", "podman said no")
        assert await pool.fill() is False
        assert a.store.all() == [] and list(a.config.sessions_path.iterdir()) == []
        a.runner.fail_start = None
        assert await pool.fill() is True and len(warm_ids(a)) == 1


async def test_old_or_surplus_warm_containers_are_replaced(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_api(tmp_path, free_ports, warm_pool=2) as a:
        pool = pool_of(a)
        await pool.fill()
        old, young = warm_ids(a)
        await a.store.update(old, created_at=time.time() - 2 * pool.max_age)
        await pool.fill()
        now = warm_ids(a)
        assert old not in now and young in now and len(now) == 2
        assert old not in a.runner.servers
        # An operator lowered warm_pool to 0: the next pass empties the pool.
        object.__setattr__(a.config, "warm_pool", 0)
        await pool.fill()
        assert warm_ids(a) == [] and a.runner.servers == {}


async def test_pool_loop_refills_after_a_claim(tmp_path: Path, free_ports: list[int]) -> None:
    async with open_api(tmp_path, free_ports, warm_pool=1) as a:
        pool = pool_of(a)
        pool.kick()
        loop = asyncio.create_task(pool.run())
        try:
            await until(lambda: bool(warm_ids(a)))
            [wid] = warm_ids(a)
            s = await (await a.client.post("/api/sessions")).json()
            assert s["id"] == wid
            await until(lambda: bool(warm_ids(a)))
            assert len(warm_ids(a)) == 1 and warm_ids(a) != [wid]
            assert a.store.get(wid).status == "running"  # type: ignore[union-attr]
            assert {r.status for r in a.store.all()} == {"running", WARM}
        finally:
            loop.cancel()


async def test_the_refill_waits_for_the_claimed_chat_to_load(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """A claim kicks the refill only after warm_refill_delay: the next container's boot
    must not take the CPU the claimed chat's first page needs."""
    for delay, refills in ((3600.0, False), (0.2, True)):
        async with open_api(
            tmp_path / str(delay), free_ports, warm_pool=1, warm_refill_delay=delay
        ) as a:
            loop = asyncio.create_task(pool_of(a).run())
            try:
                a.sessions.capacity_changed()
                await until(lambda: len(warm_ids(a)) == 1)
                r = await a.client.post("/api/sessions")
                assert r.status == 201 and warm_ids(a) == []
                if refills:
                    await until(lambda: len(warm_ids(a)) == 1)
                else:
                    await asyncio.sleep(0.5)  # time for a refill that should not come
                    assert warm_ids(a) == [] and len(a.runner.starts) == 1
                    # A freed place still refills at once.
                    a.sessions.capacity_changed()
                    await until(lambda: len(warm_ids(a)) == 1)
            finally:
                loop.cancel()
