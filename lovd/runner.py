"""Runners start and stop one session container each. Two implementations, one contract.

The contract (both runners, tested against real Podman):

- ``start(spec)`` starts the container, replacing any leftover container of the same
  session. The session's secrets are already in ``spec.secret_file`` (written by the
  sessions service; never argv). It returns the container id once Podman reports the container
  running — *not* once the server inside is ready (the sessions service probes
  that). Failure raises ``LovdError`` (``image-missing`` or ``runner-failed``)
  and leaves no container behind.
- ``stop(session_id)`` stops and removes the container (``--rm``).
  Idempotent: an absent container is success. The workspace is never touched.
- ``list()`` returns every container labelled for this lovd instance, in any
  state. Containers without lovd's instance label are never listed, so never touched.
- ``unit_states(session_ids)`` reports the supervisor's view of many sessions in one
  query: for systemd each loaded unit's ActiveState/Result (a unit may be restarting a
  crashed container), for the direct runner nothing.
- ``unit_name(session_id)`` is the name of the unit a session's container runs in
  (``""`` for the direct runner).
- Containers outlive lovd: they are children of conmon (direct) or of the user's
  systemd manager, never of the daemon, so lovd can crash or exit when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lovd import ids, limits
from lovd.errors import LovdError
from lovd.podman import ContainerInfo, ContainerSpec, PodmanClient, communicate, run_argv
from lovd.procs import Spawner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitState:
    active: str  # active, activating, deactivating, inactive, failed
    sub: str
    result: str
    restarts: int


class Runner(Protocol):
    name: str
    client: PodmanClient

    async def start(self, spec: ContainerSpec) -> str: ...

    async def stop(self, session_id: str) -> None: ...

    async def list(self) -> list[ContainerInfo]: ...

    async def unit_states(self, session_ids: Sequence[str]) -> dict[str, UnitState]: ...

    def unit_name(self, session_id: str) -> str: ...

    async def remove_workspace(self, path: Path) -> None: ...

    def enforcement(self, userns: str) -> limits.Enforcement:
        """Which of memory/cpu/pids limits this runner's containers get (lovd/limits.py)."""
        ...


async def _exec(
    spawner: Spawner, *argv: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    try:
        proc = await spawner.exec(*argv, env=env)
    except FileNotFoundError as e:
        raise LovdError("runner-failed", f"{argv[0]} not found (lovd doctor)") from e
    out, err = await communicate(proc, None, " ".join(argv[:2]))
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


class StorageLock:
    """``podman run`` alone, or any number of other Podman commands (``rm``, ``unshare rm``
    of a workspace, ``systemctl stop`` with its ExecStopPost ``rm``, ``ps``, ``logs``,
    ``image exists``) together.

    Podman 4.3 deadlocks a ``run --replace --userns=auto`` against a command that holds
    storage.lock: the run takes userns.lock, images.lock and layers.lock and then waits
    for storage.lock, while the other (seen: ``unshare rm``, ``rm -f``, ``exec``) holds
    storage.lock and waits for layers.lock. The others take them in one order (storage,
    then layers) and are not kept from each other: the creates beside a burst of deletes
    wait for the commands under way, not for all of them in turn. A waiting run goes
    first. Release never awaits, so a cancelled holder cannot leave it taken."""

    def __init__(self) -> None:
        self._run = asyncio.Lock()  # held by a run, and briefly by a removal entering
        self._removals = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._run:
            await self._idle.wait()
            yield

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._run:
            self._removals += 1
            self._idle.clear()
        try:
            yield
        finally:
            self._removals -= 1
            if not self._removals:
                self._idle.set()


class StoragedClient:
    """The runner's Podman client: every call waits while a ``podman run`` holds the
    storage lock (any Podman command opens the store, taking storage.lock, and can meet a
    run half-way through its locks)."""

    def __init__(self, client: PodmanClient, storage: StorageLock) -> None:
        self.inner = client
        self.storage = storage

    async def list(self, instance_id: str) -> list[ContainerInfo]:
        async with self.storage.shared():
            return await self.inner.list(instance_id)

    async def remove(self, name: str) -> None:
        async with self.storage.shared():
            await self.inner.remove(name)

    async def image_exists(self, image: str) -> bool:
        async with self.storage.shared():
            return await self.inner.image_exists(image)

    async def logs(self, name: str, tail: int = 20) -> str:
        async with self.storage.shared():
            return await self.inner.logs(name, tail)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class PodmanRunner:
    """Runs ``podman run -d`` directly; the container's parent is conmon, not lovd.

    ``storage`` keeps ``podman run`` apart from lovd's other Podman commands (see
    StorageLock)."""

    name = "podman"

    def __init__(
        self,
        client: PodmanClient,
        podman: str,
        instance_id: str,
        *,
        spawner: Spawner | None = None,
        storage: StorageLock | None = None,
    ) -> None:
        self.storage = storage or StorageLock()
        self.client: PodmanClient = StoragedClient(client, self.storage)
        self.podman = podman
        self.instance_id = instance_id
        self.spawner = spawner or Spawner(instance_id)

    async def start(self, spec: ContainerSpec) -> str:
        argv = run_argv(self.podman, spec)
        async with self.storage.exclusive():
            code, out, err = await _exec(self.spawner, *argv)
        lines = out.strip().splitlines()
        if code != 0 or not lines:
            await self.client.remove(spec.name)
            # Exit 0 without an id: stopped at a safe point by SIGTERM (lovd's own death
            # signal, a shutdown of the host), before it started the container.
            why = _last_line(err) or "ended without starting the container"
            raise LovdError("runner-failed", f"podman run failed (exit {code}): {why}")
        return lines[-1]

    async def stop(self, session_id: str) -> None:
        await self.client.remove(ids.container_name(session_id))

    async def list(self) -> list[ContainerInfo]:
        return await self.client.list(self.instance_id)

    async def unit_states(self, session_ids: Sequence[str]) -> dict[str, UnitState]:
        return {}

    def unit_name(self, session_id: str) -> str:
        return ""

    async def remove_workspace(self, path: Path) -> None:
        if not path.exists():
            return
        async with self.storage.shared():
            code, _, err = await _exec(
                self.spawner, self.podman, "unshare", "rm", "-rf", "--", str(path)
            )
        # Workspaces are chowned into the container's subordinate ids (``:U``), so the
        # lovd user removes them from inside its user namespace.
        if code != 0 and path.exists():
            raise LovdError(
                "runner-failed", f"could not remove workspace {path}: {_last_line(err)}"
            )

    def enforcement(self, userns: str) -> limits.Enforcement:
        # Read at every start (a few small files): a host fixed at runtime counts.
        return limits.for_runner("podman", userns)


_SD_PRIVATE_ENV = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}
)


class SystemdRunner:
    """Each session is a transient unit ``lovd-session-<id>.service`` in the lovd user's
    systemd manager; its ExecStart is ``podman run`` (Type=notify via conmon)."""

    name = "systemd"

    def __init__(
        self,
        client: PodmanClient,
        podman: str,
        instance_id: str,
        *,
        restart_attempts: int = 3,
        ready_timeout: float = 60.0,
        spawner: Spawner | None = None,
        storage: StorageLock | None = None,
    ) -> None:
        # One storage lock, as for PodmanRunner: the unit's `podman run` (systemd-run waits
        # for it), its ExecStopPost `podman rm` (systemctl stop waits for it), removals and
        # `unshare rm` of workspaces.
        self.storage = storage or StorageLock()
        self.client: PodmanClient = StoragedClient(client, self.storage)
        self.spawner = spawner or Spawner(instance_id)
        self.podman = shutil.which(podman) or podman
        self.instance_id = instance_id
        self.restart_attempts = restart_attempts
        self.ready_timeout = ready_timeout

    @staticmethod
    def _env() -> dict[str, str]:
        # Not systemd's per-process protocol variables: children must not notify, ping or
        # claim sockets on lovd's behalf ("reception only permitted for main PID").
        env = {k: v for k, v in os.environ.items() if k not in _SD_PRIVATE_ENV}
        runtime = env.setdefault("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
        env.setdefault("DBUS_SESSION_BUS_ADDRESS", f"unix:path={runtime}/bus")
        return env

    def properties(self, spec: ContainerSpec) -> list[str]:
        """systemd.resource-control(5) / systemd.service(5) properties of the unit."""
        name = spec.name
        return [
            "Type=notify",
            "NotifyAccess=all",
            "KillMode=mixed",
            "Delegate=yes",
            # Default CollectMode=inactive: a unit that exhausted its restarts stays loaded
            # as failed, so reconcile can read its Result (start() and stop() reset-failed).
            # Enforced only where the user manager has these controllers delegated
            # (spec.cgroup_limits; lovd/limits.py refuses the start otherwise); recorded
            # always, so `systemctl --user show` says what was asked for.
            f"MemoryMax={spec.memory_max}",
            f"CPUQuota={round(spec.cpus * 100)}%",
            f"TasksMax={spec.tasks_max}",
            "Restart=on-failure",
            # `podman stop` ends the container with SIGTERM (143 through --init): a clean
            # stop, neither restarted nor a failed unit.
            "SuccessExitStatus=143",
            "RestartSec=1",
            # Restart at most restart_attempts times within the window, then fail the unit.
            f"StartLimitBurst={self.restart_attempts + 1}",
            "StartLimitIntervalSec=600",
            f"TimeoutStartSec={int(self.ready_timeout)}",
            f"TimeoutStopSec={spec.stop_timeout + 10}",
            f"ExecStopPost=-{self.podman} rm -f -i -v -t 0 {name}",
            f"Environment=PODMAN_SYSTEMD_UNIT={ids.unit_name(spec.session_id)}",
        ]

    async def start(self, spec: ContainerSpec) -> str:
        unit = ids.unit_name(spec.session_id)
        # A previous unit of this session may linger failed; reset it so the name is free.
        await _exec(self.spawner, "systemctl", "--user", "reset-failed", unit, env=self._env())
        argv = [
            "systemd-run",
            "--user",
            "--quiet",
            f"--unit={unit}",
            "--description",
            f"lovd session {spec.session_id}",
        ]
        for prop in self.properties(spec):
            argv += ["-p", prop]
        argv += ["--", *run_argv(self.podman, spec)]
        async with self.storage.exclusive():
            code, _, err = await _exec(self.spawner, *argv, env=self._env())
        if code != 0:
            await self.stop(spec.session_id)
            raise LovdError(
                "runner-failed",
                f"systemd-run for {unit} failed (exit {code}): {_last_line(err)}",
            )
        for c in await self.client.list(self.instance_id):
            if c.session_id == spec.session_id and c.state == "running":
                return c.id
        raise LovdError("runner-failed", f"{unit} started but its container is not running")

    async def stop(self, session_id: str) -> None:
        unit = ids.unit_name(session_id)
        async with self.storage.shared():
            code, _, err = await _exec(
                self.spawner, "systemctl", "--user", "stop", unit, env=self._env()
            )
        if code not in (0, 5):  # 5: unit not loaded — already gone
            log.warning("systemctl stop %s: %s", unit, _last_line(err), extra={"UNIT": unit})
        await _exec(self.spawner, "systemctl", "--user", "reset-failed", unit, env=self._env())
        await self.client.remove(ids.container_name(session_id))

    async def list(self) -> list[ContainerInfo]:
        return await self.client.list(self.instance_id)

    def unit_name(self, session_id: str) -> str:
        return ids.unit_name(session_id)

    def enforcement(self, userns: str) -> limits.Enforcement:
        return limits.for_runner("systemd", userns)

    async def unit_states(self, session_ids: Sequence[str]) -> dict[str, UnitState]:
        """One ``systemctl show`` for every unit (re-adopting 200 sessions must not cost
        200 round trips). Units that are not loaded are left out."""
        if not session_ids:
            return {}
        units = {ids.unit_name(sid): sid for sid in session_ids}
        code, out, _ = await _exec(
            self.spawner,
            "systemctl",
            "--user",
            "show",
            *units,
            "-p",
            "Id,ActiveState,SubState,Result,NRestarts,LoadState",
            env=self._env(),
        )
        if code != 0:
            return {}
        states: dict[str, UnitState] = {}
        for block in out.split("\n\n"):
            props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            sid = units.get(props.get("Id", ""))
            if sid is None or props.get("LoadState") == "not-found":
                continue
            states[sid] = UnitState(
                active=props.get("ActiveState", ""),
                sub=props.get("SubState", ""),
                result=props.get("Result", ""),
                restarts=int(props.get("NRestarts", "0") or 0),
            )
        return states

    async def remove_workspace(self, path: Path) -> None:
        if not path.exists():
            return
        # Runs inside the user manager so the hardened daemon itself never execs podman.
        async with self.storage.shared():
            code, _, err = await self._remove_tree(path)
        if code != 0 and path.exists():
            raise LovdError(
                "runner-failed", f"could not remove workspace {path}: {_last_line(err)}"
            )

    async def _remove_tree(self, path: Path) -> tuple[int, str, str]:
        return await _exec(
            self.spawner,
            "systemd-run",
            "--user",
            "--quiet",
            "--wait",
            "--collect",
            "--",
            self.podman,
            "unshare",
            "rm",
            "-rf",
            "--",
            str(path),
            env=self._env(),
        )


async def user_manager_reachable(spawner: Spawner | None = None) -> bool:
    env = SystemdRunner._env()
    if not Path(env["XDG_RUNTIME_DIR"], "systemd", "private").exists():
        return False
    code, _, _ = await _exec(
        spawner or Spawner(), "systemctl", "--user", "is-system-running", env=env
    )
    # is-system-running exits non-zero for "degraded" too; any answer means reachable.
    return code in (0, 1)
