"""One wake per session, whichever socket (the gate, the public site, the API's entry)
asked: the requests for a stopped session all wait on the same task, and its error stays
readable (the progress page's status poll) until the next wake begins."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from lovd.errors import LovdError
from lovd.session.machine import StateMachine
from lovd.session.model import Session, SessionState

log = logging.getLogger(__name__)


class Wakes:
    def __init__(
        self,
        machine: StateMachine,
        wake: Callable[[str, str], Awaitable[Session]],
        timeout: float,
    ) -> None:
        self.machine = machine
        self._wake_fn = wake
        # How long a wake waits for a row someone else is moving (creating, stopping).
        self.timeout = timeout
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._errors: dict[str, LovdError] = {}

    def ensure(self, sid: str, client: str = "") -> asyncio.Task[None]:
        """The wake of ``sid``: the one under way, else a new one (for ``client``, the
        browser's address key that counts it against browser.max_running_per_client)."""
        task = self._tasks.get(sid)
        if task is None or task.done():
            self._errors.pop(sid, None)
            task = asyncio.create_task(self._wake(sid, client), name=f"wake-{sid}")
            self._tasks[sid] = task
            task.add_done_callback(lambda t: self._done(sid, t))
        return task

    def waking(self, sid: str) -> bool:
        return sid in self._tasks

    def error(self, sid: str) -> LovdError | None:
        """Why the last wake of ``sid`` failed (None: it did not, or one is under way)."""
        return self._errors.get(sid)

    def _done(self, sid: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(sid) is task:
            del self._tasks[sid]
        if not task.cancelled():
            err = task.exception()
            if isinstance(err, LovdError):
                self._errors[sid] = err

    async def _wake(self, sid: str, client: str) -> None:
        # creating: the creator is about to start it; stopping: let the stop finish.
        try:
            s = await self.machine.wait(sid, lambda s: not s.settling, self.timeout)
        except TimeoutError as e:
            now = self.machine.get(sid)
            state = now.status if now is not None else SessionState.DELETED
            raise LovdError("start-timeout", f"session stuck in state {state}") from e
        if s is None:
            raise LovdError("unauthorized", "this session was deleted")
        if s.serving:
            return
        if s.status != SessionState.STARTING:
            log.info("waking session on request", extra={"SESSION_ID": sid})
        await self._wake_fn(sid, client)

    async def drain(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
