"""Make what runs match the store: adopt live containers, record lost ones, collect
orphans. Run at start (re-adoption after a crash, an upgrade or an idle exit) and
periodically.

One batched query per pass: the containers (one Podman call) and the supervisor's
view of every session's unit (one systemctl call under the systemd runner).

The rows are read before the containers are listed, and a row that changed in between
(a start that finished, a stop) is left for the next pass: judged against a container
list taken before it started, it would look lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from lovd import ids
from lovd.config import Config
from lovd.errors import LovdError
from lovd.metrics import Metrics
from lovd.podman import ContainerInfo
from lovd.runner import UnitState
from lovd.session.launcher import Launcher
from lovd.session.machine import StateMachine
from lovd.session.model import UNIT_BUSY, Session, SessionState
from lovd.store import StaleRow, Store

log = logging.getLogger(__name__)

# 128 + SIGTERM: what --init reports when `podman stop` ended the server.
SIGTERM_EXIT = 143
# Rows that keep no container (an idle-stopped one with a live container is adopted).
_RESTING = frozenset({SessionState.STOPPED, SessionState.FAILED})


class Reconciler:
    def __init__(
        self,
        config: Config,
        store: Store,
        launcher: Launcher,
        metrics: Metrics,
        *,
        machine: StateMachine,
        discard_warm: Callable[[str, str], Awaitable[None]],
    ) -> None:
        self.config = config
        self.store = store
        self.launcher = launcher
        self.machine = machine
        self.runner = launcher.runner
        self.metrics = metrics
        self.discard_warm = discard_warm
        self._orphans_seen: dict[str, float] = {}

    async def reconcile(self, *, startup: bool = False) -> dict[str, list[str]]:
        with self.metrics.reconcile_seconds.time():
            return await self._reconcile(startup)

    async def _reconcile(self, startup: bool) -> dict[str, list[str]]:
        seen = {s.id: s.version for s in self.store.all()}
        containers = {c.session_id: c for c in await self.runner.list()}
        units = await self.runner.unit_states(list(seen))
        report: dict[str, list[str]] = {
            "adopted": [],
            "lost": [],
            "resume": [],
            "orphans_removed": [],
        }
        for sid, version in seen.items():
            s = self.store.get(sid)
            if s is None or s.version != version or self.launcher.lock(sid).locked():
                continue  # changed since the snapshot, or in flight: the next pass decides
            c = containers.get(sid)
            alive = c is not None and c.state == "running"
            unit = units.get(sid)
            if s.status == SessionState.WARM:
                if alive and c is not None and s.container_id != c.id:
                    await self.store.update(sid, container_id=c.id)
                elif not alive and (unit is None or unit.active not in UNIT_BUSY):
                    await self.discard_warm(sid, "warm container stopped")
                continue
            # Decided and written under the session's lock (taken at once: nothing was
            # awaited since the check above), so a start cannot launch a container between
            # this pass's look and its write.
            async with self.launcher.lock(sid):
                await self._settle(s, c, alive, unit, startup, report)
        await self._orphans(containers, report)
        return report

    async def _settle(
        self,
        s: Session,
        c: ContainerInfo | None,
        alive: bool,
        unit: UnitState | None,
        startup: bool,
        report: dict[str, list[str]],
    ) -> None:
        """One session's row against its container (the caller holds its lock)."""
        sid = s.id
        if s.adoptable and alive:
            assert c is not None
            if not s.serving:
                if not await self._move(
                    s, SessionState.RUNNING, reason="re-adopted", container_id=c.id
                ):
                    return
            elif s.container_id != c.id:
                await self.store.update(sid, reason="re-adopted", container_id=c.id)
            report["adopted"].append(sid)
        elif s.status in _RESTING and alive:
            # A stop that failed (Podman stuck at a failed start's cleanup) left it;
            # nothing runs for a stopped or failed session.
            log.warning(
                "stopping the container of a %s session", s.status, extra={"SESSION_ID": sid}
            )
            await self.launcher.stop_container(sid)
        elif s.expects_container and not alive:
            if unit is not None and unit.active in UNIT_BUSY:
                # systemd is still acting on it: stopping it now would cancel the
                # restart policy (ExecStopPost keeps a crashed unit "deactivating").
                return
            if unit is not None and unit.active == "failed":
                reason = (  # NRestarts also counts the attempt refused at the start limit
                    f"unit failed ({unit.result}); gave up after "
                    f"{max(0, unit.restarts - 1)} restarts"
                )
                to = SessionState.FAILED
            elif c is not None and c.exit_code == SIGTERM_EXIT:
                # `podman stop`: a clean stop, not a failure.
                reason = "container was stopped (SIGTERM)"
                to = SessionState.STOPPED
            elif c is not None and c.exit_code:
                reason = f"container exited with code {c.exit_code}"
                to = SessionState.FAILED
            elif startup and s.starting_up:
                # A start the previous lovd did not finish (a shutdown, a crash): the
                # caller starts it again rather than failing a session nobody failed.
                if await self._move(
                    s, SessionState.STARTING, reason="resumed after lovd restarted"
                ):
                    report["resume"].append(sid)
                return
            elif s.status == SessionState.CREATING:
                reason = "interrupted: lovd stopped while the session was being created"
                to = SessionState.FAILED
            else:
                reason = (
                    "container vanished while lovd was down"
                    if startup
                    else "container stopped unexpectedly"
                )
                to = SessionState.STOPPED
            await self.launcher.stop_container(sid)
            if not await self._move(s, to, reason=reason, container_id="", broker_hash=""):
                return
            report["lost"].append(sid)
            log.warning("session %s: %s", to, reason, extra={"SESSION_ID": sid})

    async def _move(self, s: Session, to: SessionState, **fields: Any) -> bool:
        """A compare-and-set from the state this pass decided on: a stop, a wake or a
        delete that came in meanwhile wins (False), and the next pass looks again."""
        try:
            await self.machine.transition(s.id, to, expect=(s.status,), **fields)
        except (StaleRow, KeyError):
            return False
        return True

    async def _orphans(
        self, containers: dict[str, ContainerInfo], report: dict[str, list[str]]
    ) -> None:
        now = time.monotonic()
        known = {s.id for s in self.store.all()}
        for sid, c in containers.items():
            if sid in known:
                continue
            first = self._orphans_seen.setdefault(c.id, now)
            # Podman's Created is wall-clock; the grace also runs from when we first saw it.
            age = max(time.time() - c.created, now - first)
            if age >= self.config.orphan_grace:
                log.info("removing orphan container %s", c.name, extra={"CONTAINER_ID": c.id})
                await self.runner.client.remove(c.name)
                if ids.is_valid(sid):
                    self.launcher.drop_secret(sid)
                self._orphans_seen.pop(c.id, None)
                report["orphans_removed"].append(c.name)
        secrets = self.launcher.secrets_dir
        for f in secrets.glob("*.env") if secrets.is_dir() else ():
            if f.stem not in known and f.stem not in containers:
                f.unlink(missing_ok=True)


class Readiness:
    """Whether the start-up reconcile has finished. Until it has, the stored rows may not
    match what runs (a container that vanished while lovd was down is still ``running``
    here), so a request about sessions waits for it — at most ``hold`` seconds, then 503
    with Retry-After — while health, metrics and the OpenAPI description answer at once."""

    def __init__(self, hold: float = 10.0, *, done: bool = False) -> None:
        self.hold = hold
        self._done = asyncio.Event()
        if done:
            self._done.set()
        self.attempts = 0
        self.error = ""
        self.retry_in = 0.0
        self.summary = ""
        self._since = time.monotonic()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def failed(self, error: str, retry_in: float) -> None:
        self.attempts += 1
        self.error = error
        self.retry_in = retry_in

    def finished(self, summary: str) -> None:
        self.attempts += 1
        self.summary = summary
        self._done.set()

    def detail(self) -> str:
        if self.done:
            return self.summary
        waited = time.monotonic() - self._since
        if not self.error:
            return f"reconciling with Podman for {waited:.1f} s"
        return (
            f"reconciling with Podman for {waited:.1f} s: attempt {self.attempts} failed "
            f"({self.error}); retrying every {self.retry_in:g} s"
        )

    async def health(self) -> tuple[bool, str]:
        return self.done, self.detail()

    async def wait(self) -> None:
        """Return once reconciled; past ``hold`` raise 503 ``unavailable`` with Retry-After."""
        if self.done:
            return
        try:
            await asyncio.wait_for(self._done.wait(), self.hold)
        except TimeoutError:
            raise LovdError(
                "unavailable",
                f"lovd has just started and is still {self.detail()}; the sessions are "
                "answered once it is done (GET /api/health shows progress)",
                retry_after=max(1, round(self.retry_in or 2)),
            ) from None
