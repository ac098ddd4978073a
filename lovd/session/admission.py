"""Places and ports: who may start now, and when the next place frees up.

``limits.max_running`` places are shared by creating, starting and running sessions;
warm containers use free places only (warm.py gives them up). A refusal says when the
soonest place frees up, from the same policy that will free it (housekeeping.py).

One client address (an IPv6 /64 counts as one) may hold at most
``browser.max_running_per_client`` of them, so a single visitor cannot take every place:
the sessions it started or woke from the browser are remembered here, in memory only
(addresses are never stored or synced; after a restart places are unattributed until
their next wake). The operator API has no client and is not limited by it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path

from lovd import ids
from lovd.config import Config, parse_size
from lovd.errors import LovdError
from lovd.session.machine import StateMachine
from lovd.session.model import Session, SessionState
from lovd.store import Store

log = logging.getLogger(__name__)

# When no running session has a deadline, the wait a refusal suggests.
RETRY_AFTER_DEFAULT = 30
# How soon to try again after a refusal for lack of disk or memory.
FLOOR_RETRY_AFTER = 60


def disk_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def memory_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


class Floors:
    """Free disk under state_dir and free host memory, against floors.*: new sessions
    are refused below them (running ones are not touched); recovers by itself."""

    def __init__(
        self,
        config: Config,
        *,
        disk: Callable[[Path], int] = disk_free,
        memory: Callable[[], int] = memory_available,
    ) -> None:
        self.path = config.state_path
        self.disk_floor = parse_size(config.disk_floor)
        self.memory_floor = parse_size(config.memory_floor)
        self.disk = disk
        self.memory = memory

    def _read(self) -> tuple[int | None, int | None]:
        """Free disk and available memory; None where it cannot be read (a missing
        state_dir; /proc/meminfo hidden by a sandbox): never a reason to refuse."""
        try:
            disk: int | None = self.disk(self.path)
        except OSError as e:
            log.warning("floors.disk_free not checked: %s", e)
            disk = None
        try:
            memory: int | None = self.memory()
        except OSError as e:
            log.warning("floors.memory_free not checked: %s", e)
            memory = None
        return disk, memory

    def problems(self) -> list[str]:
        disk, memory = self._read()
        out = []
        if self.disk_floor and disk is not None and disk < self.disk_floor:
            out.append(
                f"only {gib(disk)} of disk is free under {self.path} "
                f"(floors.disk_free is {gib(self.disk_floor)}): free some space"
            )
        if self.memory_floor and memory is not None and memory < self.memory_floor:
            out.append(
                f"only {gib(memory)} of memory is available on this host "
                f"(floors.memory_free is {gib(self.memory_floor)})"
            )
        return out

    def summary(self) -> tuple[bool, str]:
        """For /api/health and lovd doctor: the floors and the current values."""
        problems = self.problems()
        disk, memory = self._read()
        shown = [
            f"disk {gib(disk)} free under {self.path}" if disk is not None else "disk unknown",
            f"memory {gib(memory)} available" if memory is not None else "memory unknown",
            f"floors {gib(self.disk_floor)} / {gib(self.memory_floor)}",
        ]
        return not problems, "; ".join([*shown, *problems])


class Admission:
    def __init__(
        self,
        config: Config,
        store: Store,
        frees_at: Callable[[Session], float | None],
        clock: Callable[[], float],
        host_id: str,
        machine: StateMachine,
    ) -> None:
        self.config = config
        self.store = store
        self.machine = machine
        self.host_id = host_id
        self.frees_at = frees_at
        self.clock = clock
        self.floors = Floors(config)
        # Held while deciding and inserting, so two creates never take the last place.
        self.lock = asyncio.Lock()
        # Session id -> the client key (web/ratelimit.py) that started or woke it last.
        self.owners: dict[str, str] = {}

    def running_count(self) -> int:
        return self.store.count(lambda s: s.holds_place)

    def retry_after(self) -> int:
        """Seconds until a place may free up, counting unused and idle sessions."""
        ends = [
            t for s in self.store.all() if s.holds_place and (t := self.frees_at(s)) is not None
        ]
        if not ends:
            return RETRY_AFTER_DEFAULT
        return max(1, min(math.ceil(min(ends) - self.clock()), 3600))

    def check_floors(self) -> None:
        """Raise ``unavailable`` while free disk or memory is below its floor."""
        problems = self.floors.problems()
        if problems:
            raise LovdError(
                "unavailable",
                "no new sessions right now: " + "; ".join(problems),
                retry_after=FLOOR_RETRY_AFTER,
            )

    def admit(self, client: str = "") -> None:
        """Raise ``too-many-sessions`` (with the real wait) when every place is taken, or
        when ``client`` already holds browser.max_running_per_client of them. Call with
        ``lock`` held."""
        limit = self.config.max_running
        if self.running_count() >= limit:
            retry = self.retry_after()
            raise LovdError(
                "too-many-sessions",
                f"all {limit} session places are in use; try again in {retry} s",
                retry_after=retry,
                extra={"limit": limit},
            )
        per = self.config.browser_max_running_per_client
        if not client or not per:
            return
        held = self.held_by(client)
        if len(held) >= per:
            ends = [t for s in held if (t := self.frees_at(s)) is not None]
            wait = math.ceil(min(ends) - self.clock()) if ends else RETRY_AFTER_DEFAULT
            retry = max(1, min(wait, 3600))
            raise LovdError(
                "too-many-sessions",
                f"your address already has {len(held)} running session(s), the most one "
                f"address may have (browser.max_running_per_client); use the one you have, "
                f"or try again in {retry} s",
                retry_after=retry,
                extra={"limit": limit, "per_client": per},
            )

    def held_by(self, client: str) -> list[Session]:
        """The places ``client`` holds now (forgets sessions that are gone)."""
        out = []
        for sid, owner in list(self.owners.items()):
            s = self.store.get(sid)
            if s is None:
                del self.owners[sid]
            elif owner == client and s.holds_place:
                out.append(s)
        return out

    def hold(self, sid: str, client: str) -> None:
        """Record that ``client`` started or woke ``sid`` (nothing without a client)."""
        if client:
            self.owners[sid] = client

    def pick_port(self) -> int:
        used = self.store.used_ports()
        for port in self.config.ports:
            if port in used:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise LovdError(
            "unavailable",
            f"no free port in port_range {self.config.port_range}; widen it in lovd.conf",
        )

    async def insert(
        self, state: SessionState, token_hash: str, now: float, event: str = "created"
    ) -> Session:
        """A new row with a fresh id and port (call with ``lock`` held)."""
        return await self.machine.create(
            state,
            event=event,
            id=ids.new_session_id(),
            reason="",
            token_hash=token_hash,
            port=self.pick_port(),
            container_id="",
            host_id=self.host_id,
            created_at=now,
            updated_at=now,
            expires_at=self.config.expires_at(now),
            last_activity=now,
        )
