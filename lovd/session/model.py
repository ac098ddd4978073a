"""Session states and the sets of them the rest of lovd reasons about.

States (MISSION.md): creating → starting → running → (idle-stopped ⇄ running) →
stopping → stopped/failed → deleted. "deleted" rows leave the table (the outbox carries
the deletion). "warm" rows are the warm pool: started containers no user owns yet (no
token), invisible to the API until POST /api/sessions claims one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class SessionState(StrEnum):
    WARM = "warm"
    CREATING = "creating"
    STARTING = "starting"
    RUNNING = "running"
    IDLE_STOPPED = "idle-stopped"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    DELETED = "deleted"


STATES = tuple(s.value for s in SessionState)
# Sessions that hold one of the limits.max_running places.
ACTIVE = frozenset({SessionState.CREATING, SessionState.STARTING, SessionState.RUNNING})
# Whose container may hold a valid broker credential (a warm container's OpenCode
# connects to the MCP server while it boots).
BROKER_LIVE = frozenset({SessionState.WARM, SessionState.STARTING, SessionState.RUNNING})
# Rows reconcile may find with a live container and adopt as running.
ADOPTABLE = frozenset(
    {
        SessionState.RUNNING,
        SessionState.STARTING,
        SessionState.IDLE_STOPPED,
        SessionState.STOPPING,
    }
)
# Rows that should have a live container; without one reconcile records why.
EXPECT_CONTAINER = frozenset(
    {
        SessionState.RUNNING,
        SessionState.STARTING,
        SessionState.CREATING,
        SessionState.STOPPING,
    }
)
# Every state change lovd may make: from (None: a new row) to. A write outside this table
# is a bug, refused by the one writer (session/machine.py). A row may also be written
# without a state change (its fields), which is no transition. "deleted" is final.
_W, _C, _S, _R = (
    SessionState.WARM,
    SessionState.CREATING,
    SessionState.STARTING,
    SessionState.RUNNING,
)
_I, _X, _O, _F, _D = (
    SessionState.IDLE_STOPPED,
    SessionState.STOPPING,
    SessionState.STOPPED,
    SessionState.FAILED,
    SessionState.DELETED,
)
TRANSITIONS: dict[SessionState | None, frozenset[SessionState]] = {
    # the warm pool boots a row no one owns; an API create makes a row to start
    None: frozenset({_W, _C}),
    # claimed (starting until the claim checked it answers); discarded; its boot failed
    _W: frozenset({_S, _X, _D}),
    # the launcher takes it; it failed; lovd restarted (resumed or failed); deleted
    _C: frozenset({_S, _X, _F, _D}),
    # ready; failed; stopped by request; vanished; started again (resume, restart); deleted
    _S: frozenset({_S, _R, _X, _O, _F, _D}),
    # stop (via stopping); health restart (starting) or gave up (failed); vanished; deleted
    _R: frozenset({_S, _X, _O, _F, _D}),
    # woken; re-adopted after a restart; stopped again; deleted
    _I: frozenset({_S, _R, _X, _D}),
    # done (stopped, idle-stopped or failed); re-adopted; resumed; vanished; deleted;
    # stopped again (a stop whose container stop failed half-way is retried: stop())
    _X: frozenset({_S, _R, _I, _X, _O, _F, _D}),
    # woken; stopped again; deleted
    _O: frozenset({_S, _X, _D}),
    _F: frozenset({_S, _X, _D}),
    _D: frozenset(),
}


class IllegalTransition(Exception):
    """A state change outside TRANSITIONS: a bug in lovd, never a user's error."""


def allowed(frm: SessionState | str | None, to: SessionState | str) -> bool:
    """Whether TRANSITIONS allows ``frm`` → ``to`` (None: a new row)."""
    key = None if frm is None else SessionState(frm)
    return SessionState(to) in TRANSITIONS[key]


# Rows a person's browser waits on while someone else moves them: a creator is about to
# start it (creating), a stop is finishing (stopping). A wake waits for the next state.
SETTLING = frozenset({SessionState.CREATING, SessionState.STOPPING})
# A first start (the progress page says "starting", not "waking").
STARTING_UP = frozenset({SessionState.CREATING, SessionState.STARTING})


# Unit states in which systemd, not lovd, decides what happens next.
UNIT_BUSY = frozenset({"activating", "active", "deactivating", "reloading"})


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass(frozen=True)
class Session:
    id: str
    status: SessionState
    reason: str
    token_hash: str
    port: int
    container_id: str
    host_id: str
    created_at: float
    updated_at: float
    expires_at: float
    last_activity: float
    started_at: float = 0.0
    restarts: int = 0
    version: int = 1
    used_at: float = 0.0  # first chat request since the last start (0: none yet)
    broker_hash: str = ""  # hash of the running container's broker credential
    # The session link's own token (never the cookie secret): its hash, and when it was
    # exchanged for a cookie (0: not yet). A link works once (lovd/session/links.py).
    link_hash: str = ""
    link_used_at: float = 0.0

    def __post_init__(self) -> None:
        # Rows come from SQLite, PostgreSQL and tests as plain strings: one type from here
        # on (a name outside SessionState is refused here, not compared later).
        if type(self.status) is not SessionState:
            object.__setattr__(self, "status", SessionState(self.status))

    # --- named questions about the row (no caller outside session/ compares states) ---

    @property
    def serving(self) -> bool:
        """Its container runs and answers: requests may go to it."""
        return self.status == SessionState.RUNNING

    @property
    def holds_place(self) -> bool:
        """It holds one of the limits.max_running places."""
        return self.status in ACTIVE

    @property
    def broker_live(self) -> bool:
        """Its container may hold a valid broker credential."""
        return self.status in BROKER_LIVE

    @property
    def adoptable(self) -> bool:
        """Reconcile may adopt it as running when its container lives."""
        return self.status in ADOPTABLE

    @property
    def expects_container(self) -> bool:
        """It should have a live container (without one, reconcile records why)."""
        return self.status in EXPECT_CONTAINER

    @property
    def visible(self) -> bool:
        """The API, the gate and PostgreSQL readers see it (a warm row is nobody's yet)."""
        return self.status != SessionState.WARM

    @property
    def settling(self) -> bool:
        """Someone else is moving it (SETTLING): a wake waits for the next state."""
        return self.status in SETTLING

    @property
    def starting_up(self) -> bool:
        """On its way to its first answer (created or starting), rather than woken."""
        return self.status in STARTING_UP

    @property
    def paused(self) -> bool:
        """Stopped for idleness or disuse; a request may wake it."""
        return self.status == SessionState.IDLE_STOPPED

    def public(self, public_url: str) -> dict[str, Any]:
        """The API representation (never the token hash)."""
        return {
            "id": self.id,
            "status": self.status.value,
            "reason": self.reason,
            "url": f"{public_url.rstrip('/')}/c/{self.id}",
            "container_id": self.container_id,
            "port": self.port,
            "host_id": self.host_id,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "expires_at": iso(self.expires_at),
            "last_activity": iso(self.last_activity),
            "restarts": self.restarts,
            "used": bool(self.used_at),
        }
