"""Activity, and the policy that stops and deletes sessions by time.

Activity (chat requests the gate lets through, model calls through the broker, an
answer OpenCode is still producing) and first chat requests are recorded in
memory and written to the store in batches: the gate must stay cheap. The policy:

- a running session with no chat request within ``unused_timeout`` of its start is
  stopped (its place goes to someone who will use it; it wakes when its page is loaded
  or a prompt is sent, never for a poll: web/gate.py);
- a running session with no activity for ``idle_timeout`` is stopped the same way,
  unless OpenCode is still answering (its session status is busy); a session calling
  its LLM or MCP server through the broker is active too;
- nothing a user may come back to is deleted by anything but the expiry policy: a
  session past ``session_ttl``, or stopped/failed/idle-stopped for ``delete_after``
  (0 turns either off, like every 0 among the timeouts; session_ttl 0 gives
  ``config.NEVER`` as expires_at).
  A stopped or failed session keeps its workspace and chat history and wakes on its
  user's next request like an idle-stopped one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from lovd.config import Config
from lovd.errors import LovdError
from lovd.session.model import Session, SessionState
from lovd.store import Store

log = logging.getLogger(__name__)


class Activity:
    """Last activity and first chat request per session, not yet written."""

    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock
        self.seen: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def touch(self, sid: str) -> None:
        self.seen[sid] = self.clock()

    def mark_used(self, sid: str) -> None:
        s = self.store.get(sid)
        if s is not None and not s.used_at:
            self.used.setdefault(sid, self.clock())

    def is_used(self, s: Session) -> bool:
        return bool(s.used_at) or s.id in self.used

    def last(self, s: Session) -> float:
        return max(s.last_activity, self.seen.get(s.id, 0.0))

    def forget(self, sid: str) -> None:
        self.seen.pop(sid, None)
        self.used.pop(sid, None)

    async def flush(self) -> None:
        pending, self.seen = self.seen, {}
        await self.store.touch(pending)
        used, self.used = self.used, {}
        for sid, at in used.items():
            s = self.store.get(sid)
            if s is not None and not s.used_at:
                await self.store.update(sid, used_at=at, event="first-chat")


class Housekeeping:
    def __init__(
        self,
        config: Config,
        store: Store,
        activity: Activity,
        *,
        stop: Callable[[str, SessionState, str], Awaitable[Session]],
        delete: Callable[[str, str], Awaitable[None]],
        busy: Callable[[Session], Awaitable[bool]],
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.store = store
        self.activity = activity
        self.stop = stop
        self.delete = delete
        self.busy = busy
        self.clock = clock

    def frees_at(self, s: Session) -> float | None:
        """When the policy will stop ``s`` and free its place: the end of its
        unused_timeout (no chat request yet) or of its idle_timeout, whichever is first."""
        c = self.config
        ends: list[float] = []
        if c.unused_timeout and not self.activity.is_used(s):
            ends.append(max(s.created_at, s.started_at) + c.unused_timeout)
        if c.idle_timeout:
            ends.append(self.activity.last(s) + c.idle_timeout)
        return min(ends, default=None)

    def idle_reason(self, s: Session, now: float) -> str:
        """Why the policy stops ``s`` now ("" while it may keep running)."""
        c = self.config
        unused = c.unused_timeout and not self.activity.is_used(s)
        if unused and max(s.created_at, s.started_at) + c.unused_timeout <= now:
            return UNUSED_REASON
        if c.idle_timeout and self.activity.last(s) + c.idle_timeout <= now:
            return "no activity for idle_timeout"
        return ""

    def next_deadline(self) -> float | None:
        """Seconds until the soonest running session reaches its unused/idle deadline."""
        ends = [
            t
            for s in self.store.all()
            if s.status == SessionState.RUNNING and (t := self.frees_at(s)) is not None
        ]
        return min(ends) - self.clock() if ends else None

    async def cleanup(self) -> list[tuple[str, str]]:
        """Apply the policy once. Returns what it deleted and why, as (id, reason)."""
        await self.activity.flush()
        now = self.clock()
        c = self.config
        deleted: list[tuple[str, str]] = []
        for s in self.store.all():
            if s.status == SessionState.WARM:
                continue  # the pool's (warm_max_age)
            try:
                why = ""
                if s.expires_at <= now:
                    why = "expired (session_ttl)"
                elif (
                    c.delete_after and s.status in RESTING and s.updated_at + c.delete_after <= now
                ):
                    why = f"{s.status} for longer than delete_after"
                if why:
                    try:
                        await self.delete(s.id, why)
                    except LovdError as e:
                        if e.code == "session-not-found" or self.store.get(s.id) is not None:
                            raise
                        # Tombstoned, so deleted: only removing its container or workspace
                        # failed, which the next reconcile finishes (finish_deletes).
                        log.warning(
                            "deleted %s, its removal is left to reconcile: %s",
                            s.id,
                            e.message,
                            extra={"SESSION_ID": s.id},
                        )
                    deleted.append((s.id, why))
                elif s.status == SessionState.RUNNING and (why := self.idle_reason(s, now)):
                    if await self.busy(s):
                        # Still answering (a long tool run, a slow model): that is activity.
                        self.activity.touch(s.id)
                        continue
                    await self.stop(s.id, SessionState.IDLE_STOPPED, why)
            except LovdError as e:
                log.warning("cleanup of %s failed: %s", s.id, e.message, extra={"SESSION_ID": s.id})
        return deleted


# Why the policy stopped a session nobody chatted in: the gate wakes such a session only
# for a chat request or a page load, never for a poll (web/gate.py).
UNUSED_REASON = "no chat request within unused_timeout"
# Sessions without a container that keep their workspace until delete_after.
RESTING = frozenset({SessionState.STOPPED, SessionState.FAILED, SessionState.IDLE_STOPPED})
