"""The warm pool: session containers started ahead of demand.

OpenCode needs seconds to boot; a user should not. The pool keeps up to
``warm_pool`` containers started and ready, as store rows in state "warm" (so they
survive a lovd restart like any session), and ``POST /api/sessions`` claims one. Warm
containers only ever use free places: running + warm never exceeds
``limits.max_running``, and a session that needs a place a warm container holds gets
it (``Sessions._make_room``). This loop only refills, recycles old ones and backs off
when starting fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from lovd.errors import LovdError
from lovd.sessions import Sessions

log = logging.getLogger(__name__)

# Longest sleep between passes when nothing asks for one (recycling by age).
_PERIOD = 60.0


class WarmPool:
    def __init__(
        self,
        sessions: Sessions,
        max_age: float,
        clock: Callable[[], float],
        retry_delay: float = 30.0,
    ) -> None:
        self.sessions = sessions
        self.max_age = max_age
        self.clock = clock
        self.retry_delay = retry_delay
        self._kick = asyncio.Event()
        sessions.capacity_changed = self.kick

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
        warm = self.sessions.warm()
        excess = max(0, len(warm) - self.sessions.config.warm_pool)
        for i, s in enumerate(warm):
            if i < excess:
                await self.sessions.discard_warm(s.id, "more than warm_pool")
            elif s.created_at + self.max_age <= now:
                await self.sessions.discard_warm(s.id, "older than warm_max_age")
        while self.sessions.warm_wanted() > 0:
            try:
                if await self.sessions.start_warm() is None:
                    break
            except LovdError as e:
                log.warning(
                    "warm pool: could not start a container (%s); retrying in %.0f s",
                    e.message,
                    self.retry_delay,
                )
                return False
        return True
