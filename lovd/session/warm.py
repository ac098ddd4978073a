"""The warm pool: session containers started ahead of demand.

OpenCode needs seconds to boot; a user should not. The pool keeps up to ``warm_pool``
containers started and ready, as store rows in state "warm" (so they survive a lovd
restart like any session), and ``POST /api/sessions`` claims one. Warm containers only
ever use free places: running + warm never exceeds ``limits.max_running``, and a session
that needs a place a warm container holds gets it (``make_room``). ``WarmPool`` only
refills, recycles old ones and backs off when starting fails.

Built on launcher.py, starts.py and admission.py; nothing here calls back into lifecycle.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from lovd.config import Config
from lovd.errors import LovdError
from lovd.session.admission import Admission
from lovd.session.launcher import Launcher
from lovd.session.machine import StateMachine
from lovd.session.model import Session, SessionState
from lovd.session.starts import Starts
from lovd.store import StaleRow, Store

log = logging.getLogger(__name__)

# Longest sleep between passes when nothing asks for one (recycling by age).
_PERIOD = 60.0


class Warm:
    def __init__(
        self,
        config: Config,
        store: Store,
        launcher: Launcher,
        admission: Admission,
        *,
        machine: StateMachine,
        starts: Starts,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        clock: Callable[[], float],
        on_ready: Callable[[Session], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.launcher = launcher
        self.admission = admission
        self.machine = machine
        self.starts = starts
        self.spawn = spawn
        self.clock = clock
        # Called with each warm container once it answers, before anyone claims it: the
        # web layer makes its first chat and stores its UI files (web/warmprep.py).
        self.on_ready = on_ready

    def rows(self) -> list[Session]:
        """Unclaimed warm-pool rows, oldest first."""
        return [s for s in self.store.all() if s.status == SessionState.WARM]

    def pick(self) -> Session | None:
        """A warm row to hand out: a ready one first, else the one furthest along."""
        rows = self.rows()
        ready = [s for s in rows if not self.launcher.lock(s.id).locked()]
        return (ready or rows)[0] if rows else None

    def wanted(self) -> int:
        """How many more warm containers the pool may start now."""
        warm = len(self.rows())
        free = self.config.max_running - self.admission.running_count() - warm
        if free > 0 and self.admission.floors.problems():
            return 0  # below a disk or memory floor: no new containers
        return max(0, min(self.config.warm_pool - warm, free))

    async def start_one(self) -> Session | None:
        """Start one warm-pool container (no owner, no token) if there is a free place."""
        async with self.admission.lock:
            if self.wanted() < 1:
                return None
            self.launcher.check_limits()  # refused before a row exists (lovd/limits.py)
            row = await self.admission.insert(SessionState.WARM, "", self.clock(), event="warm")
        s = await self.starts.start(row.id, warm=True)
        if self.on_ready is not None and s.status == SessionState.WARM and s.container_id:
            try:
                await self.on_ready(s)
            except Exception:  # the container stays usable: a claim then looks it up
                log.exception("preparing a warm container failed", extra={"SESSION_ID": s.id})
        return s

    async def claim(self, sid: str) -> Session:
        """Hand a claimed warm container to its new owner: wait for it if it is still
        booting, check it still answers, and fall back to a fresh start if not."""
        async with self.launcher.lock(sid):
            s = self.store.get(sid)
            if s is not None and s.serving:
                return s  # its warm start finished after the claim
            if s is not None and s.status == SessionState.STARTING and s.container_id:
                ok, why = await self.launcher.probe(s, timeout=1.0)
                if ok:
                    return await self.starts.running(sid, s.container_id)
                log.info(
                    "warm container did not answer (%s); starting afresh",
                    why,
                    extra={"SESSION_ID": sid},
                )
        return await self.starts.start(sid)

    async def discard(self, sid: str, reason: str) -> None:
        """Remove an unclaimed warm container and its row (claimed ones are left alone)."""
        async with self.launcher.lock(sid):
            try:
                # A compare-and-set: a claim that got there first keeps the container.
                await self.machine.transition(
                    sid, SessionState.STOPPING, expect=(SessionState.WARM,), reason=reason
                )
            except (StaleRow, KeyError):
                return
            try:
                await self.launcher.stop_container(sid)
                await self.launcher.remove_workspace(sid)
            except LovdError as e:
                # The row goes all the same: left "stopping" it would be a session no one
                # owns (reconcile would adopt its container as running), and the refill
                # loop would end on the error. Its container is then an orphan, which
                # reconcile removes after orphan_grace.
                log.warning(
                    "could not remove a warm container (reconcile will): %s",
                    e.message,
                    extra={"SESSION_ID": sid},
                )
            await self.machine.drop(sid, reason)
        self.launcher.forget(sid)
        log.info("warm container removed: %s", reason, extra={"SESSION_ID": sid})

    def make_room(self) -> None:
        """A session took a place a warm container holds: give that place up."""
        warm = self.rows()
        if warm and self.admission.running_count() + len(warm) > self.config.max_running:
            self.spawn(self.discard(warm[-1].id, "its place went to a session"))


class WarmPool:
    """The refill loop."""

    def __init__(
        self,
        warm: Warm,
        max_age: float,
        clock: Callable[[], float],
        retry_delay: float = 30.0,
        kick: asyncio.Event | None = None,
    ) -> None:
        self.warm = warm
        self.max_age = max_age
        self.clock = clock
        self.retry_delay = retry_delay
        # Set whenever capacity changes (a claim, a freed place): given by the sessions
        # facade, which sets it, so neither side is patched after construction.
        self._kick = kick or asyncio.Event()

    def kick(self) -> None:
        self._kick.set()

    async def run(self) -> None:
        """Refill whenever kicked (a claim, a freed place) and at least every minute."""
        delay = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=delay or _PERIOD)
            self._kick.clear()
            delay = 0.0 if await self.fill() else self.retry_delay

    async def fill(self) -> bool:
        """One pass: replace warm containers older than max_age, then start as many as
        there are free places. False when a start failed (the caller backs off)."""
        now = self.clock()
        rows = self.warm.rows()
        excess = max(0, len(rows) - self.warm.config.warm_pool)
        for i, s in enumerate(rows):
            if i < excess:
                await self.warm.discard(s.id, "more than warm_pool")
            elif s.created_at + self.max_age <= now:
                await self.warm.discard(s.id, "older than warm_max_age")
        while self.warm.wanted() > 0:
            try:
                if await self.warm.start_one() is None:
                    break
            except LovdError as e:
                log.warning(
                    "warm pool: could not start a container (%s); retrying in %.0f s",
                    e.message,
                    self.retry_delay,
                )
                return False
        return True
