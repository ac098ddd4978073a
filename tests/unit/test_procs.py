"""lovd's children (lovd/procs.py) with real processes: their own group, the death signal,
the instance marker, and the start-up sweep that ends what a dead lovd left behind while
sparing what a child detached on purpose (as Podman detaches conmon and slirp4netns)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lovd.errors import LovdError
from lovd.podman import communicate
from lovd.procs import MARK, Mark, Spawner, find_orphans, start_ticks, sweep
from tests.waiting import until_sync


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_a_child_leads_its_own_group_and_carries_the_marker() -> None:
    sp = Spawner("inst1")
    proc = await sp.exec("sh", "-c", 'echo "$LOVD_CHILD"; ps -o pgid= -p $$; echo $$')
    out, _ = await proc.communicate()
    mark_text, pgid, pid = out.decode().split()
    mark = Mark.parse(mark_text)
    assert mark == Mark("inst1", os.getpid(), start_ticks(os.getpid()) or 0, proc.pid)
    assert int(pgid) == int(pid) == proc.pid != os.getpgid(0)


async def test_a_missing_program_is_file_not_found() -> None:
    with pytest.raises(FileNotFoundError):
        await Spawner("x").exec("no-such-program-lovd")


async def test_a_deadline_kills_the_whole_group() -> None:
    """`podman unshare rm` does not pass signals on: the grandchild must die too."""
    proc = await Spawner("x").exec("sh", "-c", "sleep 30 & echo $!; wait")
    assert proc.stdout is not None
    grandchild = int((await proc.stdout.readline()).decode())
    with pytest.raises(LovdError, match="did not finish"):
        await communicate(proc, None, "podman unshare", timeout=0.3)
    until_sync(lambda: not alive(grandchild), 5.0)


async def test_a_cancelled_read_is_ended_a_cancelled_write_finishes() -> None:
    sp = Spawner("x")
    read = await sp.exec("sleep", "30")
    task = asyncio.ensure_future(communicate(read, None, "podman ps", cancel_kills=True))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.wait_for(read.wait(), 5) == -signal.SIGTERM

    write = await sp.exec("sleep", "0.3")
    task = asyncio.ensure_future(communicate(write, None, "podman run"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await sp.settle(5) == 0
    assert write.returncode == 0  # left to finish: a shutdown never cuts a `podman run`


# A stand-in for lovd: starts one child through the Spawner that forks a grandchild in
# its group (as `podman unshare rm` runs rm) and one that leaves the group (as Podman
# detaches conmon), prints their pids, then waits to be killed.
FAKE_LOVD = textwrap.dedent(
    """
    import asyncio, sys
    from lovd.procs import Spawner

    async def main() -> None:
        sp = Spawner(sys.argv[1])
        script = "sleep 60 & echo $!; setsid sleep 60 & echo $!; echo $$; wait"
        proc = await sp.exec("sh", "-c", script)
        for _ in range(3):
            print((await proc.stdout.readline()).decode().strip(), flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def test_a_dead_lovds_group_is_swept_its_detached_helpers_spared(tmp_path: Path) -> None:
    iid = f"sweep{os.getpid()}"
    lovd = subprocess.Popen(
        [sys.executable, "-c", FAKE_LOVD, iid], stdout=subprocess.PIPE, text=True
    )
    try:
        assert lovd.stdout is not None
        grandchild, detached, leader = (int(lovd.stdout.readline()) for _ in range(3))
        assert f"{MARK}={iid}:".encode() in Path(f"/proc/{grandchild}/environ").read_bytes()
        assert find_orphans(iid) == []  # its lovd is alive: nothing to sweep
        lovd.kill()
        lovd.wait()
        # The death signal ended the child; what it forked lives on without a parent.
        until_sync(lambda: not alive(leader), 5.0)
        orphans = find_orphans(iid)
        assert [(o.pid, o.pgid) for o in orphans] == [(grandchild, leader)]
        assert orphans[0].ppid != lovd.pid and orphans[0].argv.startswith("sleep")

        ended = asyncio.run(sweep(iid, finish=0.2, grace=0.2))
        assert [(o.pid, how) for o, how in ended] == [(grandchild, "SIGTERM")]
        until_sync(lambda: not alive(grandchild), 5.0)
        assert alive(detached)  # it left the group: conmon, slirp4netns, the pause process
        assert find_orphans(iid) == []
        assert find_orphans("another-instance") == []
    finally:
        lovd.kill()
        for pid in (locals().get("grandchild"), locals().get("detached")):
            if isinstance(pid, int) and alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_podmans_pause_process_in_a_childs_group_is_never_signalled(tmp_path: Path) -> None:
    """Rootless Podman's pause process (catatonit) can be born in the group of the lovd
    child whose Podman call started it, and must outlive it: a signal to it makes every
    running container's network namespace unreachable. Neither a group kill (deadline,
    shutdown) nor the start-up sweep may touch it; the rest of the group still ends."""
    from lovd.procs import kill_group

    pause = tmp_path / "catatonit"  # the helper's name is what marks it (its comm)
    pause.symlink_to("/bin/sleep")
    leader = subprocess.Popen(
        ["/bin/sh", "-c", f"'{pause}' 60 & sleep 60 & wait"],
        process_group=0,
        env={**os.environ, MARK: f"i:{os.getpid()}:1:0"},
    )
    try:
        deadline = time.monotonic() + 5
        members: dict[str, int] = {}
        while time.monotonic() < deadline and len(members) < 2:
            for e in Path("/proc").iterdir():
                if not e.name.isdigit():
                    continue
                try:
                    comm = (e / "comm").read_text().strip()
                    pgid = int((e / "stat").read_text().rsplit(")", 1)[1].split()[2])
                except (OSError, ValueError, IndexError):
                    continue
                if pgid == leader.pid and comm in ("catatonit", "sleep"):
                    members[comm] = int(e.name)
            time.sleep(0.05)
        assert set(members) == {"catatonit", "sleep"}, members
        kill_group(leader.pid, signal.SIGTERM)
        leader.wait(5)
        time.sleep(0.2)
        assert (
            not Path(f"/proc/{members['sleep']}").exists()
            or "Z"
            in Path(f"/proc/{members['sleep']}/stat").read_text().rsplit(")", 1)[1].split()[0]
        )
        assert Path(f"/proc/{members['catatonit']}").exists()  # the pause process lives on
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
        leader.wait(5)
