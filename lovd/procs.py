"""lovd's own child processes (podman, ``podman unshare``, systemctl, systemd-run).

A Podman command whose caller died keeps its storage locks: after a ``kill -9`` of lovd an
orphaned ``podman run --replace`` and an orphaned ``podman unshare rm -rf`` deadlocked on
them and every Podman command of the lovd user hung until the orphans were killed by
hand. So every child:

- runs in a process group of its own, so that it and whatever it forks (``podman
  unshare`` does not pass signals on to its command) can be signalled as one;
- gets SIGTERM when lovd dies (``PR_SET_PDEATHSIG``). Podman treats SIGTERM as a request to
  stop at a safe point: a ``podman run -d`` cut by it exits 0, leaving at worst a
  ``Created`` container that the next ``podman run --replace`` replaces;
- carries ``LOVD_CHILD=<instance>:<lovd pid>:<lovd start>:<group>`` in its environment,
  which its descendants inherit and /proc shows to the same user. ``<group>`` is the
  child's own pid (the trampoline's ``$$``), so a descendant still in that group can be
  told from one Podman detached on purpose (conmon, slirp4netns, rootlessport, the pause
  process: each leads a group of its own and must outlive lovd).

At start-up, before the first Podman call, :func:`sweep` finds the groups a previous lovd
of this instance left behind (its pid and start time no longer name a living process),
gives them a moment to finish, then ends them. Under the systemd runner ``podman run`` is
the ExecStart of a transient unit, a child of the user's systemd manager: it carries no
marker and is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MARK = "LOVD_CHILD"
# `sh -c SCRIPT PREFIX ARGV…`: $0 is the prefix, $$ the pid that `exec` keeps.
_TRAMPOLINE = f'{MARK}="$0:$$"; export {MARK}; exec "$@"'
_PR_SET_PDEATHSIG = 1
_PROC = Path("/proc")


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def start_ticks(pid: int, proc: Path = _PROC) -> int | None:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with
    the pid it names one process, even after the pid is reused."""
    try:
        fields = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Mark:
    instance_id: str
    lovd_pid: int
    lovd_start: int
    group: int

    @classmethod
    def parse(cls, value: str) -> Mark | None:
        parts = value.rsplit(":", 3)
        if len(parts) != 4:
            return None
        try:
            return cls(parts[0], int(parts[1]), int(parts[2]), int(parts[3]))
        except ValueError:
            return None


class Spawner:
    """Starts lovd's children (see the module docstring) and knows which still run."""

    def __init__(self, instance_id: str = "", proc: Path = _PROC) -> None:
        self.instance_id = instance_id
        self.pid = os.getpid()
        self.start = start_ticks(self.pid, proc) or 0
        self._libc = _libc()
        self.live: set[asyncio.subprocess.Process] = set()
        self._waiters: set[asyncio.Future[int]] = set()

    @property
    def prefix(self) -> str:
        return f"{self.instance_id}:{self.pid}:{self.start}"

    def _preexec(self) -> None:
        # In the child, between fork and exec: no locks, no allocation beyond the call.
        if self._libc is not None:
            self._libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != self.pid:  # lovd died before the death signal was armed
            os._exit(1)

    async def exec(
        self,
        *argv: str,
        env: Mapping[str, str] | None = None,
        stdin: int = asyncio.subprocess.DEVNULL,
        stdout: int = asyncio.subprocess.PIPE,
        stderr: int = asyncio.subprocess.PIPE,
    ) -> asyncio.subprocess.Process:
        """``asyncio.create_subprocess_exec`` for one of lovd's children. A missing program
        raises FileNotFoundError, as without the trampoline."""
        path = shutil.which(argv[0])
        if path is None:
            raise FileNotFoundError(argv[0])
        child_env = dict(os.environ if env is None else env)
        child_env.pop(MARK, None)
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            _TRAMPOLINE,
            self.prefix,
            path,
            *argv[1:],
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=child_env,
            process_group=0,
            preexec_fn=self._preexec,
        )
        self.live.add(proc)
        waiter = asyncio.ensure_future(proc.wait())
        self._waiters.add(waiter)  # a task nobody references may be collected

        def gone(f: asyncio.Future[int]) -> None:
            self.live.discard(proc)
            self._waiters.discard(f)

        waiter.add_done_callback(gone)
        return proc

    async def settle(self, timeout: float) -> int:
        """Wait up to ``timeout`` for the running children (a shutdown lets a ``podman
        run`` finish, so the next lovd adopts its container); how many still run."""
        pending = [p for p in self.live if p.returncode is None]
        if pending:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in pending], timeout=timeout)
        return sum(1 for p in self.live if p.returncode is None)

    def terminate(self) -> None:
        """SIGTERM every running child's whole group (its descendants too)."""
        for p in list(self.live):
            if p.returncode is None:
                kill_group(p.pid, signal.SIGTERM)


# Podman's long-lived helpers, which a child of lovd may start and which outlive that
# command on purpose, in its process group: the rootless pause process (catatonit) holds
# the user and network namespaces every running container lives in — signalling it makes
# every container's network namespace unreachable for Podman ("unknown FS magic") — and
# conmon, slirp4netns and rootlessport serve running containers. They are never signalled.
KEEP = frozenset(
    {"catatonit", "conmon", "slirp4netns", "rootlessport", "rootlessport-ch", "pasta", "passt"}
)


def kept(pid: int, proc: Path = _PROC) -> bool:
    """Is ``pid`` one of Podman's long-lived helpers (:data:`KEEP`)?"""
    try:
        return (proc / str(pid) / "comm").read_text().strip() in KEEP
    except OSError:
        return False


def kill_group(pid: int, sig: signal.Signals, proc: Path = _PROC) -> None:
    """Signal every member of the process group ``pid`` (its leader may be gone) but
    Podman's long-lived helpers (so not ``killpg``); the process alone if it leads none."""
    members = [
        m
        for m in (int(e.name) for e in proc.iterdir() if e.name.isdigit())
        if (st := _stat(m, proc)) is not None and st[1] == pid and not kept(m, proc)
    ]
    if not members and not kept(pid, proc):
        members = [pid]
    for m in members:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(m, sig)


@dataclass(frozen=True)
class Orphan:
    pid: int
    ppid: int
    pgid: int
    lovd_pid: int
    argv: str


def _stat(pid: int, proc: Path) -> tuple[int, int] | None:
    """(ppid, pgid)"""
    try:
        fields = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[2])
    except (OSError, ValueError, IndexError):
        return None


def _marks(proc: Path) -> Iterable[tuple[int, Mark]]:
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # another user's, or gone
            continue
        for var in environ.split(b"\0"):
            if var.startswith(MARK.encode() + b"="):
                mark = Mark.parse(var[len(MARK) + 1 :].decode(errors="replace"))
                if mark is not None:
                    yield int(entry.name), mark
                break


def find_orphans(instance_id: str, proc: Path = _PROC) -> list[Orphan]:
    """Processes of this instance's lovd children whose lovd is gone: still in the group
    their lovd made for them, and that lovd's (pid, start time) names no living process."""
    found = []
    for pid, mark in _marks(proc):
        if mark.instance_id != instance_id:
            continue
        if start_ticks(mark.lovd_pid, proc) == mark.lovd_start:
            continue  # its lovd is alive (this one, or another on this state dir)
        st = _stat(pid, proc)
        if st is None or st[1] != mark.group or kept(pid, proc):
            continue  # left the group, or one of Podman's helpers that must live on
        try:
            argv = (
                (proc / str(pid) / "cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
        except OSError:
            argv = "?"
        found.append(Orphan(pid, st[0], st[1], mark.lovd_pid, argv.strip()[:300]))
    return found


async def sweep(
    instance_id: str, *, finish: float = 2.0, grace: float = 1.0, proc: Path = _PROC
) -> list[tuple[Orphan, str]]:
    """End what a previous lovd of this instance left running, before this one calls
    Podman: ``finish`` seconds to end on their own (the death signal already asked each
    group leader; a ``podman run`` completes the container it is creating first), then
    SIGTERM to each group and ``grace`` seconds, then SIGKILL. Returns each orphan with how
    it ended ("exited", "SIGTERM", "SIGKILL")."""
    orphans = find_orphans(instance_id, proc)
    if not orphans:
        return []
    for o in orphans:
        log.warning(
            "orphaned child of a previous lovd (pid %d, gone): pid %d ppid %d group %d: %s",
            o.lovd_pid,
            o.pid,
            o.ppid,
            o.pgid,
            o.argv,
        )
    ended: dict[int, str] = {}
    groups = {o.pgid for o in orphans}
    for how in ("exited", "SIGTERM", "SIGKILL"):
        if how != "exited":
            for g in groups:
                kill_group(g, signal.Signals[how], proc)
        deadline = time.monotonic() + (finish if how == "exited" else grace)
        while True:
            alive = {o.pid for o in find_orphans(instance_id, proc)}
            for o in orphans:
                if o.pid not in alive and o.pid not in ended:
                    ended[o.pid] = how
            if not alive or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        if not alive:
            break
        groups = {o.pgid for o in orphans if o.pid in alive}
    result = [(o, ended.get(o.pid, "still running")) for o in orphans]
    for o, how in result:
        log.warning("orphan pid %d (%s): %s", o.pid, o.argv.split(" ", 1)[0], how)
    return result
