"""The runner's storage lock: a `podman run` alone, removals together, a waiting run first,
and a cancelled holder never leaves it taken."""

from __future__ import annotations

import asyncio

import pytest

from lovd.runner import StorageLock


async def test_runs_alone_removals_together_a_waiting_run_first() -> None:
    lock = StorageLock()
    log: list[str] = []

    async def op(kind: str, name: str, hold: float) -> None:
        ctx = lock.exclusive() if kind == "run" else lock.shared()
        async with ctx:
            log.append(f"+{name}")
            await asyncio.sleep(hold)
            log.append(f"-{name}")

    rm1 = asyncio.ensure_future(op("rm", "rm1", 0.1))
    rm2 = asyncio.ensure_future(op("rm", "rm2", 0.1))
    await asyncio.sleep(0.01)
    run = asyncio.ensure_future(op("run", "run", 0.05))
    await asyncio.sleep(0.01)
    rm3 = asyncio.ensure_future(op("rm", "rm3", 0.01))
    await asyncio.gather(rm1, rm2, run, rm3)
    assert log[:2] == ["+rm1", "+rm2"]  # together
    assert log.index("+run") > max(log.index("-rm1"), log.index("-rm2"))  # after them
    assert log.index("+rm3") > log.index("-run")  # arrived while the run waited: after it


@pytest.mark.parametrize("kind", ["run", "rm"])
async def test_a_cancelled_holder_releases_it(kind: str) -> None:
    lock = StorageLock()

    async def hold() -> None:
        async with lock.exclusive() if kind == "run" else lock.shared():
            await asyncio.sleep(10)

    task = asyncio.ensure_future(hold())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(1):
        async with lock.exclusive():
            pass
