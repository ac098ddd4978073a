"""Podman events: lovd learns of a session container's death when it happens.

Without this, a container that dies or is removed behind lovd's back (``podman rm -f``,
an OOM kill, a crash) is noticed at the next reconcile pass (``health.interval``), and
until then the gate sends its browser to a port nobody listens on.

:class:`ContainerEvents` follows ``podman events --format json`` filtered to this
instance's containers (label ``lovd.instance=<id>``). The same stream serves both
runners: under the systemd runner the unit's ``podman run`` writes the same events.
On a ``died``/``remove`` event of a session whose row says ``running``, the session's
container is checked at once (session/health.py, ``Health.check_now``), which hands a
gone container to reconcile. lovd's own stops and restarts hold the session's lock or
have left ``running`` first, so their events change nothing.

The stream is bounded (one line at most asyncio's 64 KiB stream limit; a longer one ends
the stream) and restarted with a backoff when it ends or fails; the daemon owns the task
and cancels it at shutdown, which kills the ``podman events`` child. The child also gets
SIGTERM when lovd dies (``PR_SET_PDEATHSIG``): a ``kill -9`` of lovd leaves no reader
behind. ``spawn`` can be any function that starts a child with piped output (the
daemon's own child-process helper, where there is one).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable

from lovd import ids
from lovd.podman import LABEL_INSTANCE, LABEL_SESSION
from lovd.session.lifecycle import Sessions

log = logging.getLogger(__name__)

# The events that mean a container no longer serves ("died": its process exited, with
# any cause; "remove": it is gone, e.g. `podman rm -f`).
DEATHS = frozenset({"died", "remove"})
# A stream that lived this long was healthy: the backoff starts again from the bottom.
STABLE_SECONDS = 60.0


_PR_SET_PDEATHSIG = 1
Spawn = Callable[..., Awaitable[asyncio.subprocess.Process]]


def _death_signal() -> Callable[[], None]:
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork, not in the child
    except OSError:
        return lambda: None
    return lambda: libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


async def spawn(*argv: str) -> asyncio.subprocess.Process:
    """A child with piped stdout/stderr that gets SIGTERM when lovd dies."""
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=_death_signal(),
    )


def parse(line: bytes) -> tuple[str, str] | None:
    """(session id, status) of a container death event, else None."""
    try:
        ev = json.loads(line)
    except ValueError:
        return None
    if not isinstance(ev, dict) or ev.get("Type", "container") != "container":
        return None
    status = ev.get("Status")
    attrs = ev.get("Attributes")
    if status not in DEATHS or not isinstance(attrs, dict):
        return None
    sid = attrs.get(LABEL_SESSION)
    if not isinstance(sid, str) or not ids.is_valid(sid):
        return None
    return sid, str(status)


class ContainerEvents:
    """Follows this instance's container events; calls ``on_death(session id, status)``."""

    def __init__(
        self,
        podman: str,
        instance_id: str,
        on_death: Callable[[str, str], None],
        *,
        min_delay: float = 1.0,
        max_delay: float = 30.0,
        spawn: Spawn = spawn,
    ) -> None:
        self.argv = [
            podman,
            "events",
            "--format",
            "json",
            "--filter",
            "type=container",
            "--filter",
            f"label={LABEL_INSTANCE}={instance_id}",
        ]
        self.on_death = on_death
        self.spawn = spawn
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.streams = 0  # how many times the stream was (re)started
        self.deaths = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="podman-events")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        delay = self.min_delay
        while True:
            t0 = time.monotonic()
            try:
                why = await self._follow()
            except (OSError, ValueError) as e:  # no podman; a line over the stream limit
                why = repr(e)
            if time.monotonic() - t0 >= STABLE_SECONDS:
                delay = self.min_delay
            log.warning(
                "podman events stream ended (%s); following it again in %.0f s "
                "(meanwhile the health loop notices dead containers)",
                why,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_delay)

    async def _follow(self) -> str:
        proc = await self.spawn(*self.argv)
        self.streams += 1
        assert proc.stdout is not None and proc.stderr is not None
        try:
            while line := await proc.stdout.readline():
                event = parse(line)
                if event is not None:
                    self.deaths += 1
                    try:
                        self.on_death(*event)
                    except Exception:
                        log.exception("handling a container event failed")
            err = await proc.stderr.read(4096)
            code = await proc.wait()
            last = err.decode(errors="replace").strip().splitlines()
            return f"exit {code}" + (f": {last[-1]}" if last else "")
        finally:
            if proc.returncode is None:
                proc.kill()
                # Shielded: a cancelled close must still reap the child.
                with contextlib.suppress(ProcessLookupError):
                    await asyncio.shield(proc.wait())


def on_death(sessions: Sessions) -> Callable[[str, str], None]:
    """What the daemon does with a death: check the container of a running session."""

    def died(sid: str, status: str) -> None:
        s = sessions.find(sid)
        if s is None or not s.serving:
            return  # lovd stopped or removed it itself, or it is not a session we serve
        log.info("Podman reports the container %s", status, extra={"SESSION_ID": sid})
        sessions.check_container(sid, f"Podman reported it {status}")

    return died
