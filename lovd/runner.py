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
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lovd import ids, limits
from lovd.errors import LovdError
from lovd.podman import ContainerInfo, ContainerSpec, PodmanClient, communicate, run_argv

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


async def _exec(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await communicate(proc, None, " ".join(argv[:2]))
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class PodmanRunner:
    """Runs ``podman run -d`` directly; the container's parent is conmon, not lovd."""

    name = "podman"

    def __init__(self, client: PodmanClient, podman: str, instance_id: str) -> None:
        self.client = client
        self.podman = podman
        self.instance_id = instance_id

    async def start(self, spec: ContainerSpec) -> str:
        argv = run_argv(self.podman, spec)
        code, out, err = await _exec(*argv)
        if code != 0:
            await self.client.remove(spec.name)
            raise LovdError("runner-failed", f"podman run failed (exit {code}): {_last_line(err)}")
        return out.strip().splitlines()[-1]

    async def stop(self, session_id: str) -> None:
        await self.client.remove(ids.container_name(session_id))

    async def list(self) -> list[ContainerInfo]:
        return await self.client.list(self.instance_id)

    async def unit_states(self, session_ids: Sequence[str]) -> dict[str, UnitState]:
        return {}

    def unit_name(self, session_id: str) -> str:
        return ""

    async def remove_workspace(self, path: Path) -> None:
        await _remove_tree(self.podman, path)

    def enforcement(self, userns: str) -> limits.Enforcement:
        # Read at every start (a few small files): a host fixed at runtime counts.
        return limits.for_runner("podman", userns)


async def _remove_tree(podman: str, path: Path) -> None:
    """Workspaces are chowned into the container's subordinate ids (``:U``), so the
    lovd user removes them from inside its user namespace."""
    if not path.exists():
        return
    code, _, err = await _exec(podman, "unshare", "rm", "-rf", "--", str(path))
    if code != 0 and path.exists():
        raise LovdError("runner-failed", f"could not remove workspace {path}: {_last_line(err)}")


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
    ) -> None:
        self.client = client
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
        await _exec("systemctl", "--user", "reset-failed", unit, env=self._env())
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
        code, _, err = await _exec(*argv, env=self._env())
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
        code, _, err = await _exec("systemctl", "--user", "stop", unit, env=self._env())
        if code not in (0, 5):  # 5: unit not loaded — already gone
            log.warning("systemctl stop %s: %s", unit, _last_line(err), extra={"UNIT": unit})
        await _exec("systemctl", "--user", "reset-failed", unit, env=self._env())
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
        code, _, err = await _exec(
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
        if code != 0 and path.exists():
            raise LovdError(
                "runner-failed", f"could not remove workspace {path}: {_last_line(err)}"
            )


async def user_manager_reachable() -> bool:
    env = SystemdRunner._env()
    if not Path(env["XDG_RUNTIME_DIR"], "systemd", "private").exists():
        return False
    code, _, _ = await _exec("systemctl", "--user", "is-system-running", env=env)
    # is-system-running exits non-zero for "degraded" too; any answer means reachable.
    return code in (0, 1)
