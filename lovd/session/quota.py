"""The per-session disk quota: a session's workspace (OpenCode's chat database lives
there) may hold at most ``limits.disk``.

What rootless Podman on these hosts can do (cgroup v1, ext4 root, lovd never root):
an ext4/XFS project quota needs root to give the workspace a project id;
``podman volume create -o size=`` needs XFS project quotas or tmpfs (which loses the
chat history at an idle stop); a loop-mounted image needs root or /dev/fuse with
CAP_SYS_ADMIN in the container. So lovd enforces it in two layers, both tested
(tests/integration/test_chat_bodies.py):

- **measured**: lovd sums the workspace's allocated blocks (cached for a few seconds,
  plus what it forwarded since the last measurement) and refuses a prompt once the sum
  reaches the quota, with a message in Norwegian and English that the chat shows.
  Nothing is deleted: the history stays readable, only new prompts are refused.
- **per file**: the session image's entrypoint lowers RLIMIT_FSIZE to the quota with
  SIGXFSZ ignored (``LOVD_FILE_MAX_KB``, lovd/session/launcher.py), so no single file
  -- the chat database -- grows past it between two measurements: the write fails
  with EFBIG instead of filling the host's disk.

Other sessions are untouched: each has its own workspace, measurement and limit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

KIND = "measured (lovd sums each workspace; prompts refused when full) + per-file RLIMIT_FSIZE"


class Unreadable(Exception):
    """Part of the workspace is not readable by lovd's own user."""


def walk_size(path: Path) -> int:
    """Allocated bytes under ``path`` (st_blocks, so sparse files count what they use),
    without following symlinks. Raises Unreadable where a directory cannot be listed."""
    total = 0
    stack = [str(path)]
    while stack:
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    total += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except FileNotFoundError:
            continue  # removed while walking (SQLite's journal comes and goes)
        except PermissionError as e:
            raise Unreadable(top) from e
    return total


async def podman_du(podman: str, path: Path) -> int:
    """Allocated bytes under ``path`` measured inside lovd's user namespace, where the
    files a container created (owned by its mapped uids) can all be read."""
    proc = await asyncio.create_subprocess_exec(
        podman,
        "unshare",
        "du",
        "-s",
        "-B1",
        "--",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise OSError(f"du {path}: {err.decode(errors='replace').strip()}")
    return int(out.split()[0])


def message(limit: int) -> str:
    mb = max(1, limit // 2**20)
    return (
        f"Denne økten har brukt opp lagringsplassen sin ({mb} MB). Start en ny økt for "
        "å fortsette; samtalen her kan fortsatt leses. "
        f"(This session has used up its storage ({mb} MB); start a new session to "
        "continue. This conversation can still be read.)"
    )


@dataclass
class _Seen:
    size: int
    at: float


@dataclass
class DiskQuota:
    """``limit`` bytes per workspace (0: off). ``workspace`` maps a session id to its
    directory; ``fallback`` measures a directory lovd cannot walk itself."""

    limit: int
    workspace: Callable[[str], Path]
    fallback: Callable[[Path], Awaitable[int]] | None = None
    ttl: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _seen: dict[str, _Seen] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    async def usage(self, sid: str) -> int:
        """The workspace's size: measured at most every ``ttl`` seconds, plus what was
        forwarded to it since (``grew``)."""
        seen = self._seen.get(sid)
        if seen is not None and self.clock() - seen.at < self.ttl:
            return seen.size
        lock = self._locks.setdefault(sid, asyncio.Lock())
        async with lock:  # one measurement per session at a time
            seen = self._seen.get(sid)
            if seen is not None and self.clock() - seen.at < self.ttl:
                return seen.size
            size = await self._measure(self.workspace(sid))
            now = self.clock()
            self._seen[sid] = _Seen(size, now)
            if len(self._seen) > 256:  # ended sessions are never asked about again
                for old in [k for k, v in self._seen.items() if now - v.at > 60 * self.ttl]:
                    self.forget(old)
            return size

    async def _measure(self, path: Path) -> int:
        try:
            return await asyncio.to_thread(walk_size, path)
        except Unreadable as e:
            if self.fallback is None:
                raise OSError(f"cannot measure {path}: {e} is not readable") from e
            return await self.fallback(path)

    def grew(self, sid: str, size: int) -> None:
        seen = self._seen.get(sid)
        if seen is not None:
            seen.size += size

    async def refusal(self, sid: str) -> str:
        """Why ``sid`` may not add to its workspace ("" when it may)."""
        if not self.limit:
            return ""
        try:
            used = await self.usage(sid)
        except OSError as e:
            # Unmeasurable: the per-file limit still holds; don't lock the chat out.
            log.warning("disk quota: %s", e, extra={"SESSION_ID": sid})
            return ""
        if used >= self.limit:
            return message(self.limit)
        return ""

    def forget(self, sid: str) -> None:
        self._seen.pop(sid, None)
        self._locks.pop(sid, None)
