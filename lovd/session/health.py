"""Health: probe every running session, keep a bounded history, restart a hung one.

Every ``health.interval`` each running session's health path is probed with
``health.probe_timeout`` (a stopped or hung OpenCode answers nothing; the probe is what
notices, whatever the container's state says). After ``health.failures`` failed probes
in a row the container is restarted under the same session id, workspace, port and
token (a new broker credential, as at every start). At most ``health.restart_attempts``
restarts within ``health.restart_window``; one more failure and the session is failed
with reason ``unhealthy`` (its workspace stays; it wakes on its user's next request).

Between passes a container is looked at **at once** (:meth:`Health.check_now`) when
there is reason to doubt it: Caddy could not reach it (web/gate.py, the error route of
lovd/caddy.py), Podman reported it died (lovd/runtime_events.py), or its browser sends
requests while no probe has vouched for it for ``VOUCH_SECONDS``. A container that is
gone is handed to reconcile (the session becomes ``stopped`` and wakes on its next
request); one that is there but does not answer is confirmed by ``health.failures``
probes ``CONFIRM_GAP`` apart — not ``health.interval`` apart — and restarted like above.
A hung OpenCode (SIGSTOP, a deadlock) a person is waiting on is so restarted within
about VOUCH_SECONDS + health.failures * (health.probe_timeout + CONFIRM_GAP).

A failed session's reason starts with its class: ``oom``, ``exit-code N``,
``unhealthy``, ``image-missing``, ``start-timeout`` or ``interrupted``
(:func:`failure_class`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from lovd.config import Config
from lovd.errors import LovdError
from lovd.session.launcher import Launcher
from lovd.session.machine import StateMachine
from lovd.session.model import Session, SessionState
from lovd.session.starts import Starts
from lovd.store import Store

log = logging.getLogger(__name__)

# A successful probe vouches for a container this long; a request for a session whose
# container has not answered since is the moment to look again (cheap: one GET of the
# health path, at most once per VOUCH_SECONDS per session with traffic).
VOUCH_SECONDS = 5.0
# How far apart the probes that confirm a hang are: short, because a person is waiting,
# but more than one probe, because a loaded host can miss one probe_timeout.
CONFIRM_GAP = 1.0


async def _nothing(_sid: str) -> None:
    return None


def failure_class(reason: str) -> str:
    """The class of a failed session's reason ("" when it is not a failure we know)."""
    r = reason.lower()
    if "oom" in r or "out of memory" in r or "exit code 137" in r:
        return "oom"
    if m := re.search(r"exit(?:ed with)?[ -]code[ =]?(\d+)", r):
        return f"exit-code {m.group(1)}"
    if "exit-code" in r:  # systemd's Result=exit-code, without the status
        return "exit-code"
    if "unhealthy" in r:
        return "unhealthy"
    if "image" in r and ("missing" in r or "not present" in r):
        return "image-missing"
    if "did not answer" in r or "start-timeout" in r:
        return "start-timeout"
    if "interrupted" in r or "lovd stopped" in r or "vanished while lovd was down" in r:
        return "interrupted"
    return ""


@dataclass
class _Record:
    failures: int = 0  # consecutive failed probes
    restarts: collections.deque[float] = field(default_factory=collections.deque)


class Health:
    def __init__(
        self,
        config: Config,
        store: Store,
        launcher: Launcher,
        *,
        machine: StateMachine,
        starts: Starts,
        clock: Callable[[], float],
        lost: Callable[[str], Awaitable[None]] = _nothing,
    ) -> None:
        self.config = config
        self.store = store
        self.launcher = launcher
        self.machine = machine
        self.starts = starts
        self.clock = clock
        # Called with a running session whose container is gone (Sessions: reconcile).
        self.lost = lost
        self._records: dict[str, _Record] = {}
        self._restarting: set[str] = set()
        self._answered: dict[str, float] = {}  # monotonic time of the last good probe
        self._checks: dict[str, asyncio.Task[str]] = {}

    def record(self, sid: str) -> _Record:
        return self._records.setdefault(sid, _Record())

    def forget(self, sid: str) -> None:
        self._records.pop(sid, None)
        self._answered.pop(sid, None)

    def answered(self, sid: str) -> None:
        """The container answered (a probe, its readiness check)."""
        self._answered[sid] = time.monotonic()

    def vouched(self, sid: str) -> bool:
        """Did the container answer a probe within the last VOUCH_SECONDS?"""
        return time.monotonic() - self._answered.get(sid, float("-inf")) < VOUCH_SECONDS

    def check_now(self, sid: str, why: str) -> asyncio.Task[str]:
        """Look at one session's container now (one check per session at a time, however
        many ask). The task's result: "ok" (it answers), "gone" (handed to ``lost``),
        "restarted"/"failed" (it hung: :meth:`recover`), or "skipped" (not running, or
        a start/stop holds its lock: not ours to judge)."""
        task = self._checks.get(sid)
        if task is None or task.done():
            task = asyncio.create_task(self._check_now(sid, why), name=f"check-{sid}")
            self._checks[sid] = task
            task.add_done_callback(functools.partial(self._check_done, sid))
        return task

    def _check_done(self, sid: str, task: asyncio.Task[str]) -> None:
        if self._checks.get(sid) is task:
            del self._checks[sid]
        if not task.cancelled() and (e := task.exception()) is not None:
            log.warning("container check failed: %r", e, extra={"SESSION_ID": sid})

    async def _check_now(self, sid: str, why: str) -> str:
        c = self.config
        s = self.store.get(sid)
        if s is None or s.status != SessionState.RUNNING or self.launcher.lock(sid).locked():
            return "skipped"
        ok, detail = await self.launcher.probe(s, timeout=c.probe_timeout)
        if ok:
            self.answered(sid)
            return "ok"
        if not await self.launcher.container_alive(sid):
            log.warning(
                "container gone (%s; probe: %s): reconciling",
                why,
                detail,
                extra={"SESSION_ID": sid},
            )
            await self.lost(sid)
            return "gone"
        for _ in range(c.health_failures - 1):
            await asyncio.sleep(CONFIRM_GAP)
            s = self.store.get(sid)
            if s is None or s.status != SessionState.RUNNING:
                return "skipped"
            ok, detail = await self.launcher.probe(s, timeout=c.probe_timeout)
            if ok:
                self.answered(sid)
                return "ok"
        self.record(sid).failures = c.health_failures
        await self.store.add_health(
            [(sid, self.clock(), False, f"probe failed: {detail} ({why})")], c.health_history
        )
        return await self.recover(
            s, f"{c.health_failures} failed probes {CONFIRM_GAP:g} s apart after {why}"
        )

    async def drain(self) -> None:
        tasks = list(self._checks.values())
        for t in tasks:
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)

    async def check(self) -> dict[str, list[str]]:
        """One pass over the running sessions: probe all at once, record, restart."""
        c = self.config
        candidates = [
            s
            for s in self.store.all()
            if s.status == SessionState.RUNNING and not self.launcher.lock(s.id).locked()
        ]
        # A unit systemd is (re)starting is systemd's to handle (its own restart policy
        # and start limit): probing it now would count a restart in progress as a hang.
        units = await self.launcher.runner.unit_states([s.id for s in candidates])
        running = [s for s in candidates if s.id not in units or units[s.id].active == "active"]
        results = await asyncio.gather(
            *(self.launcher.probe(s, timeout=c.probe_timeout) for s in running)
        )
        now = self.clock()
        rows: list[tuple[str, float, bool, str]] = []
        report: dict[str, list[str]] = {"unhealthy": [], "restarted": [], "failed": []}
        due: list[Session] = []
        for s, (ok, detail) in zip(running, results, strict=True):
            rec = self.record(s.id)
            rec.failures = 0 if ok else rec.failures + 1
            if ok:
                self.answered(s.id)
            rows.append((s.id, now, ok, detail if ok else f"probe failed: {detail}"))
            if not ok:
                report["unhealthy"].append(s.id)
                if rec.failures >= c.health_failures:
                    due.append(s)
        await self.store.add_health(rows, c.health_history)
        for s in due:
            outcome = await self.recover(s, f"{self.record(s.id).failures} failed probes")
            report[outcome].append(s.id)
        return report

    async def recover(self, s: Session, why: str) -> str:
        """Restart ``s`` (same id, port, token, workspace) unless it used up its restarts
        in the window; then fail it as unhealthy. Returns "restarted" or "failed"."""
        c = self.config
        rec = self.record(s.id)
        now = self.clock()
        while rec.restarts and rec.restarts[0] <= now - c.restart_window:
            rec.restarts.popleft()
        if len(rec.restarts) >= c.restart_attempts:
            reason = (
                f"unhealthy: {why} after {len(rec.restarts)} restarts within "
                f"{c.restart_window:g} s (health.restart_attempts)"
            )
            async with self.launcher.lock(s.id):
                current = self.store.get(s.id)
                if current is None or current.status != SessionState.RUNNING:
                    return "failed"
                await self.launcher.stop_container(s.id)
                await self.machine.transition(
                    s.id,
                    SessionState.FAILED,
                    reason=reason,
                    container_id="",
                    broker_hash="",
                )
            await self.store.add_health([(s.id, now, False, reason)], c.health_history)
            log.warning("session failed: %s", reason, extra={"SESSION_ID": s.id})
            return "failed"
        rec.restarts.append(now)
        rec.failures = 0
        log.warning("restarting session: %s", why, extra={"SESSION_ID": s.id})
        async with self.launcher.lock(s.id):
            current = self.store.get(s.id)
            if current is None or current.status != SessionState.RUNNING:
                return "restarted"  # it changed meanwhile (a stop, a delete): nothing to do
            await self.launcher.stop_container(s.id)
            secret = await self.starts.begin(
                s.id, f"restarting: {why}", restarts=current.restarts + 1, container_id=""
            )
        await self.store.add_health(
            [(s.id, now, False, f"restart {len(rec.restarts)}: {why}")], c.health_history
        )
        try:
            await self.starts.start(s.id, secret=secret)
        except LovdError as e:
            log.warning("restart failed: %s", e.message, extra={"SESSION_ID": s.id})
            return "failed"
        return "restarted"

    def view(self, s: Session) -> dict[str, object]:
        """What GET /api/sessions/{id}/health shows besides the stored history."""
        rec = self._records.get(s.id, _Record())
        now = self.clock()
        window = [t for t in rec.restarts if t > now - self.config.restart_window]
        return {
            "status": s.status,
            "reason": s.reason,
            "failure_class": failure_class(s.reason) if s.status == SessionState.FAILED else "",
            "consecutive_failures": rec.failures,
            "restarts": s.restarts,
            "restarts_in_window": len(window),
            "restart_attempts": self.config.restart_attempts,
            "restart_window": self.config.restart_window,
            "interval": self.config.health_interval,
            "failures_before_restart": self.config.health_failures,
        }
