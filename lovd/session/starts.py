"""A start's state: the writes around the launcher's container work.

The launcher (launcher.py) brings a container up and returns what happened; this
records it through the one writer (machine.py), under the session's lock for the whole
start. A start writes the state at most twice: ``starting`` (with the broker credential
of its container), then ``running`` or ``failed``; after :meth:`Starts.begin` (a wake, a
health restart) and for a warm row only the outcome. A warm row (the pool's, nobody's)
gets only its container id when it is ready, and is dropped, not failed, when its start
fails. A shutdown (``CancelledError``) leaves row and container as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NoReturn

from lovd import ids
from lovd.errors import LovdError
from lovd.session.launcher import Launcher, StartFailed
from lovd.session.machine import StateMachine
from lovd.session.model import Session, SessionState
from lovd.store import Store

log = logging.getLogger(__name__)


class Starts:
    def __init__(
        self,
        store: Store,
        machine: StateMachine,
        launcher: Launcher,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.machine = machine
        self.launcher = launcher
        self.clock = clock

    async def begin(self, sid: str, reason: str, **fields: Any) -> str:
        """Make ``sid`` starting (a wake, a health restart), with the broker credential
        of its next container in the same write; :meth:`start` with the returned secret
        then writes only its outcome. Call with the session's lock held."""
        secret = ids.new_token()
        await self.machine.transition(
            sid, SessionState.STARTING, reason=reason, broker_hash=ids.hash_token(secret), **fields
        )
        return secret

    async def start(self, sid: str, warm: bool = False, secret: str = "") -> Session:
        """Start ``sid``'s container and wait until it answers (``LovdError`` when it does
        not: the row is failed, or dropped if it is a warm one)."""
        async with self.launcher.lock(sid):
            session = self.store.get(sid)
            if session is None:
                raise LovdError("session-not-found", f"no session {sid}")
            if session.serving:
                return session
            begun = (
                secret
                and session.status == SessionState.STARTING
                and ids.token_matches(secret, session.broker_hash)
            )
            if not begun and not warm and not session.starting_up:
                # A stop (an operator's, POST /api/sessions/{id}/stop) or a failure came
                # between the create or the claim and this start, and wins: no container.
                log.info(
                    "start not made: the session is %s now",
                    session.status,
                    extra={"SESSION_ID": sid},
                )
                return session
            if not begun:
                # A new broker credential for every start: the previous container's dies.
                secret = ids.new_token()
                broker_hash = ids.hash_token(secret)
                if warm or session.status == SessionState.STARTING:
                    # Its state is written already (warm; a claim or a resume made it
                    # starting): only the credential.
                    session = await self.store.update(sid, broker_hash=broker_hash)
                else:
                    session = await self.machine.transition(
                        sid, SessionState.STARTING, broker_hash=broker_hash
                    )
            outcome = await self.launcher.launch(session, secret)
            if isinstance(outcome, StartFailed):
                await self._failed(sid, outcome.error)
            current = self.store.get(sid)
            if warm and current is not None and current.status == SessionState.WARM:
                log.info(
                    "warm container ready in %.3f s",
                    outcome.seconds,
                    extra={"SESSION_ID": sid, "CONTAINER_ID": outcome.container_id},
                )
                return await self.store.update(sid, container_id=outcome.container_id)
            # A warm container claimed while it booted lands here too.
            return await self.running(sid, outcome.container_id, outcome.seconds)

    async def running(self, sid: str, cid: str, seconds: float = 0.0) -> Session:
        """``sid``'s container ``cid`` answers (``seconds`` after its start began)."""
        session = await self.machine.transition(
            sid,
            SessionState.RUNNING,
            container_id=cid,
            started_at=self.clock(),
            last_activity=self.clock(),
        )
        log.info(
            "session running (ready in %.3f s)",
            seconds,
            extra={"SESSION_ID": sid, "CONTAINER_ID": cid},
        )
        return session

    async def _failed(self, sid: str, err: LovdError) -> NoReturn:
        current = self.store.get(sid)
        if current is not None and current.status == SessionState.WARM:
            # Nobody owns it: drop the row (the pool retries later) rather than show a
            # failed session no one asked for.
            await self.launcher.remove_workspace(sid)
            await self.machine.drop(sid, f"warm start failed: {err.message}")
            log.warning("warm container failed: %s", err.message, extra={"SESSION_ID": sid})
            raise err
        await self.machine.transition(sid, SessionState.FAILED, reason=err.message, broker_hash="")
        log.warning("session failed: %s", err.message, extra={"SESSION_ID": sid})
        raise err
