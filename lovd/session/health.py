"""Health: probe every running session, keep a bounded history, restart a hung one.

Every ``health.interval`` each running session's health path is probed with
``health.probe_timeout`` (a stopped or hung OpenCode answers nothing; the probe is what
notices, whatever the container's state says). After ``health.failures`` failed probes
in a row the container is restarted under the same session id, workspace, port and
token (a new broker credential, as at every start). At most ``health.restart_attempts``
restarts within ``health.restart_window``; one more failure and the session is failed
with reason ``unhealthy`` (its workspace stays; it wakes on its user's next request).

A failed session's reason starts with its class: ``oom``, ``exit-code N``,
``unhealthy``, ``image-missing``, ``start-timeout`` or ``interrupted``
(:func:`failure_class`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from lovd.config import Config
from lovd.errors import LovdError
from lovd.session.launcher import Launcher
from lovd.session.model import Session, SessionState
from lovd.store import Store

log = logging.getLogger(__name__)


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
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.store = store
        self.launcher = launcher
        self.clock = clock
        self._records: dict[str, _Record] = {}
        self._restarting: set[str] = set()

    def record(self, sid: str) -> _Record:
        return self._records.setdefault(sid, _Record())

    def forget(self, sid: str) -> None:
        self._records.pop(sid, None)

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
                await self.store.update(
                    s.id,
                    status=SessionState.FAILED,
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
            await self.store.update(
                s.id,
                status=SessionState.STARTING,
                reason=f"restarting: {why}",
                restarts=current.restarts + 1,
                container_id="",
            )
        await self.store.add_health(
            [(s.id, now, False, f"restart {len(rec.restarts)}: {why}")], c.health_history
        )
        try:
            await self.launcher.start(s.id)
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
