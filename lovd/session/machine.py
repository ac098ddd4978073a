"""The one writer of a session's state.

Every change of ``Session.status`` is a :meth:`StateMachine.transition` (or a new row,
a delete, a restore, all here): checked against the table in model.py (a change outside
it is a bug: ``IllegalTransition``), written as a compare-and-set together with its event
row and its outbox row in one store transaction (store.py ``write``), counted, and
announced to whoever waits on that session (:meth:`StateMachine.wait`). Writes of other
fields (a link, first use, a re-adopted container's id) stay plain store updates, which
refuse a ``status``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from lovd.metrics import Metrics
from lovd.session.model import IllegalTransition, Session, SessionState, allowed
from lovd.store import StaleRow, Store

log = logging.getLogger(__name__)


class StateMachine:
    def __init__(self, store: Store, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics
        # Per session, the event its waiters sleep on; replaced at every change.
        self._changed: dict[str, asyncio.Event] = {}

    # --- writes ---

    async def create(self, to: SessionState, *, event: str = "created", **fields: Any) -> Session:
        """A new row in state ``to`` (the table's ``None`` row says which may begin)."""
        to = SessionState(to)  # callers (tests, the CLI's API) may name it as a string
        if not allowed(None, to):
            raise IllegalTransition(f"a new session may not begin in state {to}")
        row = await self.store.insert(Session(status=to, **fields), event=event)
        self._changed_to(row.id, None, to)
        return row

    async def transition(
        self,
        sid: str,
        to: SessionState,
        *,
        expect: Iterable[SessionState] | None = None,
        reason: str = "",
        event: str = "",
        **fields: Any,
    ) -> Session:
        """Move ``sid`` to ``to`` with ``reason`` and ``fields``. With ``expect``, only
        from one of those states (else ``StaleRow``: someone else won). ``KeyError``: no
        such row. Both are decided inside the write transaction; a refusal writes
        nothing."""
        to = SessionState(to)
        wanted = None if expect is None else frozenset(expect)
        frm: list[SessionState] = []

        def check(current: Session) -> None:
            if wanted is not None and current.status not in wanted:
                raise StaleRow(f"session {sid} is {current.status} now")
            if not allowed(current.status, to):
                raise IllegalTransition(f"session {sid}: {current.status} -> {to}")
            frm.append(current.status)

        changes = {**fields, "status": to, "reason": reason}
        row = await self.store.write(sid, changes, check=check, event=event)
        self._changed_to(sid, frm[0], to)
        return row

    async def delete(self, sid: str, reason: str) -> bool:
        """The first step of a crash-safe delete (store.py ``tombstone``): the row leaves
        the live sessions. False: no such row."""
        frm: list[SessionState] = []
        done = await self.store.tombstone(sid, reason, check=self._to_deleted(sid, frm))
        if done:
            self._changed_to(sid, frm[0], SessionState.DELETED)
        return done

    async def drop(self, sid: str, reason: str) -> None:
        """Drop a row outright (a warm row nobody owns: no tombstone, no history kept)."""
        frm: list[SessionState] = []
        await self.store.delete(sid, reason, check=self._to_deleted(sid, frm))
        if frm:
            self._changed_to(sid, frm[0], SessionState.DELETED)

    def _to_deleted(self, sid: str, frm: list[SessionState]) -> Callable[[Session], None]:
        def check(current: Session) -> None:
            if not allowed(current.status, SessionState.DELETED):
                raise IllegalTransition(f"session {sid}: {current.status} -> deleted")
            frm.append(current.status)

        return check

    def _changed_to(self, sid: str, frm: SessionState | None, to: SessionState) -> None:
        if self.metrics is not None:
            self.metrics.transitions.labels(frm.value if frm else "new", to.value).inc()
        ev = self._changed.pop(sid, None)
        if ev is not None:
            ev.set()

    # --- waits ---

    def get(self, sid: str) -> Session | None:
        return self.store.get(sid)

    async def wait(
        self, sid: str, until: Callable[[Session], bool], timeout: float
    ) -> Session | None:
        """The row once ``until`` holds for it, or None once it is gone; woken by each
        transition of ``sid`` (no polling). ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while True:
                s = self.store.get(sid)
                if s is None or until(s):
                    return s
                await self._changed.setdefault(sid, asyncio.Event()).wait()


def restored(fields: dict[str, Any]) -> Session:
    """A row rebuilt from elsewhere (PostgreSQL, lovd/sync/restore.py), in the state it
    was recorded in there: a copy, not a change. A state lovd does not know (or a
    deleted row) is refused."""
    state = SessionState(fields["status"])
    if state == SessionState.DELETED:
        raise ValueError(f"session {fields.get('id')} is deleted; there is nothing to restore")
    return Session(**{**fields, "status": state})


async def restore(store: Store, rows: list[Session], instance_id: str, detail: str) -> None:
    """Fill an empty store with rows rebuilt by :func:`restored` (store.py ``restore``):
    each keeps the state it was recorded in, so reconcile re-adopts or records it."""
    for s in rows:
        if s.status == SessionState.DELETED:
            raise ValueError(f"session {s.id} is deleted; there is nothing to restore")
    await store.restore(rows, instance_id, detail)
