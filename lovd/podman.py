"""Podman: turn a ContainerSpec into ``podman run`` argv, and talk to Podman.

Two ways to talk to Podman, one interface (:class:`PodmanClient`):

- :class:`PodmanCLI` execs ``podman`` (hosts without the API socket; the
  direct runner);
- :class:`PodmanAPI` uses the lovd user's libpod REST socket (``podman.socket``),
  so a hardened daemon never has to exec podman (whose rootless mode needs the
  setuid ``newuidmap``, which NoNewPrivileges= forbids).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from lovd import ids
from lovd.errors import LovdError
from lovd.procs import Spawner, kill_group

log = logging.getLogger(__name__)

LABEL_SESSION = "lovd.session"
LABEL_INSTANCE = "lovd.instance"
SECRET_TARGET = "/run/secrets/lovd.env"  # noqa: S105 - a path, not a password
API_VERSION = "v4.0.0"


@dataclass(frozen=True)
class ContainerSpec:
    session_id: str
    instance_id: str
    image: str
    host_port: int
    container_port: int
    workspace: Path
    memory_max: str = "4G"
    cpus: float = 1.0
    tasks_max: int = 512
    userns: str = "auto"
    user: str = ""
    stop_timeout: int = 5
    secret_file: Path = Path("/nonexistent")
    extra_args: list[str] = field(default_factory=list)
    cgroup_v2: bool = False
    # Which of memory/cpu/pids a cgroup enforces for this runner (lovd/limits.py); the
    # others are left out of the argv, so `podman inspect` never shows a limit that is not.
    cgroup_limits: frozenset[str] = frozenset()
    systemd_unit: str = ""
    # podman's global --hooks-dir: the session egress hook (lovd/egress.py). None: no hook.
    hooks_dir: Path | None = None

    @property
    def name(self) -> str:
        return ids.container_name(self.session_id)


def run_argv(podman: str, spec: ContainerSpec) -> list[str]:
    """argv for ``podman run`` (Quadlet conventions). No secret ever goes in here: they
    reach the container as a file bind-mounted read-only from lovd's runtime directory
    (tmpfs, 0700), over a tmpfs at /run/secrets so the read-only root needs no mountpoint.
    The file is world-readable *inside* only: with --userns=auto the host's lovd uid is
    unmapped there, and the container's only user is the session itself."""
    sid = ids.check(spec.session_id)
    # A global flag: it must come before the subcommand. It replaces Podman's default
    # hooks dirs for these containers, so only lovd's hook runs for them.
    hooks = ["--hooks-dir", str(spec.hooks_dir)] if spec.hooks_dir else []
    argv = [
        podman,
        *hooks,
        "run",
        "--name",
        spec.name,
        "--replace",
        "--rm",
        "-d",
        "--init",
        "--label",
        f"{LABEL_SESSION}={sid}",
        "--label",
        f"{LABEL_INSTANCE}={spec.instance_id}",
        "--cap-drop=all",
        "--security-opt=no-new-privileges",
        "--read-only",
        "--tmpfs",
        "/tmp:rw,nosuid,nodev,size=256m",
        "--tmpfs",
        "/run/secrets:rw,nosuid,nodev,noexec,size=1m",
        "-v",
        f"{spec.secret_file}:{SECRET_TARGET}:ro",
        # RLIMIT_NPROC counts the tasks of one uid, and under --userns=auto every container
        # has uids of its own: a process limit that holds without cgroup delegation.
        "--ulimit",
        f"nproc={spec.tasks_max}:{spec.tasks_max}",
        "--stop-timeout",
        str(spec.stop_timeout),
        "--userns",
        spec.userns,
        "-v",
        f"{spec.workspace}:/work:U",
        "-p",
        f"127.0.0.1:{spec.host_port}:{spec.container_port}",
        "--env",
        f"LOVD_SESSION_ID={sid}",
    ]
    if spec.user:
        argv += ["--user", spec.user]
    # Under systemd the unit's MemoryMax=/CPUQuota=/TasksMax= apply as well.
    if "pids" in spec.cgroup_limits:
        argv += ["--pids-limit", str(spec.tasks_max)]
    if "memory" in spec.cgroup_limits:
        argv += ["--memory", spec.memory_max]
    if "cpu" in spec.cgroup_limits:
        argv += ["--cpus", f"{spec.cpus:g}"]
    if spec.systemd_unit:
        argv += ["--sdnotify=conmon", "--env", f"PODMAN_SYSTEMD_UNIT={spec.systemd_unit}"]
        if spec.cgroup_v2:
            argv.append("--cgroups=split")
    argv += spec.extra_args
    argv.append(spec.image)
    return argv


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    session_id: str
    instance_id: str
    state: str  # podman's: created, running, exited, stopping, ...
    created: float
    exit_code: int = 0


def _created(value: Any) -> float:
    """``podman ps --format json`` gives unix seconds; the libpod REST API an RFC 3339 string."""
    if isinstance(value, str) and not value.replace(".", "", 1).isdigit():
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return 0.0
    return float(value or 0)


def _info_from_ps(c: dict[str, Any]) -> ContainerInfo:
    labels = c.get("Labels") or {}
    names = c.get("Names") or [""]
    return ContainerInfo(
        id=c.get("Id", ""),
        name=names[0],
        session_id=labels.get(LABEL_SESSION, ""),
        instance_id=labels.get(LABEL_INSTANCE, ""),
        state=c.get("State", ""),
        created=_created(c.get("Created")),
        exit_code=int(c.get("ExitCode", 0) or 0),
    )


class PodmanClient(Protocol):
    async def list(self, instance_id: str) -> list[ContainerInfo]:
        """Containers (any state) carrying lovd's labels for this instance."""

    async def remove(self, name: str) -> None:
        """Force-remove a container by name; absent is fine."""

    async def image_exists(self, image: str) -> bool: ...

    async def logs(self, name: str, tail: int = 20) -> str: ...


# Podman 4.3 can deadlock two of its own commands on its storage locks (seen here: a
# `run --replace` and an `rm -f` of another container, for ten minutes). A command that
# takes this long is killed, which releases its locks, and reported.
PODMAN_TIMEOUT = 120.0


async def communicate(
    proc: asyncio.subprocess.Process,
    stdin: bytes | None,
    what: str,
    timeout: float = PODMAN_TIMEOUT,
    *,
    cancel_kills: bool = False,
) -> tuple[bytes, bytes]:
    """``proc.communicate`` with a deadline: past it the process's whole group is killed
    (its descendants may hold the locks). Cancelled, a read-only command
    (``cancel_kills``) is ended too; a write is left to finish, so a shutdown never cuts a
    ``podman run`` half-way (lovd's death signal asks it to stop at a safe point)."""
    try:
        return await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError as e:
        kill_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise LovdError(
            "runner-failed",
            f"{what} did not finish within {timeout:g} s and was killed (Podman may be "
            "stuck on its storage locks: see 'lovd doctor')",
        ) from e
    except asyncio.CancelledError:
        if cancel_kills and proc.returncode is None:
            kill_group(proc.pid, signal.SIGTERM)
        raise


# Podman commands that only read: safe to end when their caller gives up on them.
_READ_ONLY = frozenset({"ps", "logs", "inspect", "image", "images", "info", "version"})


class PodmanCLI:
    def __init__(self, binary: str = "podman", spawner: Spawner | None = None) -> None:
        self.binary = binary
        self.spawner = spawner or Spawner()

    async def run(self, *args: str, stdin: bytes | None = None, check: bool = True) -> str:
        try:
            proc = await self.spawner.exec(
                self.binary,
                *args,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            )
        except FileNotFoundError as e:
            raise LovdError(
                "runner-failed", f"{self.binary} not found: install podman (lovd doctor)"
            ) from e
        out, err = await communicate(
            proc, stdin, f"podman {args[0]}", cancel_kills=args[0] in _READ_ONLY
        )
        if check and proc.returncode != 0:
            msg = err.decode(errors="replace").strip().splitlines()
            raise LovdError(
                "runner-failed",
                f"podman {args[0]} failed (exit {proc.returncode}): {msg[-1] if msg else ''}",
            )
        return out.decode(errors="replace")

    async def list(self, instance_id: str) -> list[ContainerInfo]:
        out = await self.run(
            "ps", "-a", "--format", "json", "--filter", f"label={LABEL_INSTANCE}={instance_id}"
        )
        return [_info_from_ps(c) for c in json.loads(out or "[]")]

    async def remove(self, name: str) -> None:
        await self.run("rm", "-f", "-i", "-v", "-t", "0", name)

    async def image_exists(self, image: str) -> bool:
        try:
            proc = await self.spawner.exec(
                self.binary,
                "image",
                "exists",
                image,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except FileNotFoundError:
            return False
        await communicate(proc, None, "podman image exists", cancel_kills=True)
        return proc.returncode == 0

    async def logs(self, name: str, tail: int = 20) -> str:
        try:
            return await self.run("logs", "--tail", str(tail), name)
        except LovdError:
            return ""


class PodmanAPI:
    """libpod REST over the lovd user's Podman API socket."""

    def __init__(self, socket_path: str, session: aiohttp.ClientSession | None = None) -> None:
        self.socket_path = socket_path
        self._own = session is None
        self._http = session or aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=socket_path),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    async def close(self) -> None:
        if self._own:
            await self._http.close()

    async def _req(
        self, method: str, path: str, *, data: bytes | None = None, ok: tuple[int, ...] = ()
    ) -> Any:
        url = f"http://podman/{API_VERSION}/libpod{path}"
        try:
            async with self._http.request(method, url, data=data) as r:
                body = await r.read()
                if r.status >= 400 and r.status not in ok:
                    try:
                        msg = json.loads(body).get("message", "")
                    except ValueError:
                        msg = body[:200].decode(errors="replace")
                    raise LovdError(
                        "runner-failed", f"podman API {method} {path}: {r.status} {msg}"
                    )
                return json.loads(body) if body and r.content_type == "application/json" else None
        except aiohttp.ClientError as e:
            raise LovdError(
                "runner-failed",
                f"podman API socket {self.socket_path} unreachable ({e}); "
                "enable it with: systemctl --user enable --now podman.socket",
            ) from e

    async def ping(self) -> None:
        """Is the service there? (``_ping`` answers without touching Podman's storage.)"""
        await self._req("GET", "/_ping")

    async def list(self, instance_id: str) -> list[ContainerInfo]:
        filters = quote(json.dumps({"label": [f"{LABEL_INSTANCE}={instance_id}"]}))
        data = await self._req("GET", f"/containers/json?all=true&filters={filters}")
        return [_info_from_ps(c) for c in data or []]

    async def remove(self, name: str) -> None:
        await self._req("DELETE", f"/containers/{quote(name)}?force=true&v=true", ok=(404,))

    async def image_exists(self, image: str) -> bool:
        url = f"http://podman/{API_VERSION}/libpod/images/{quote(image, safe='')}/exists"
        try:
            async with self._http.get(url) as r:
                return r.status == 204
        except aiohttp.ClientError:
            return False

    async def logs(self, name: str, tail: int = 20) -> str:
        url = f"http://podman/{API_VERSION}/libpod/containers/{quote(name)}/logs"
        try:
            async with self._http.get(
                url, params={"stdout": "true", "stderr": "true", "tail": str(tail)}
            ) as r:
                raw = await r.read()
        except aiohttp.ClientError:
            return ""
        return _demux(raw)


def _demux(raw: bytes) -> str:
    """Docker-style multiplexed log stream (8-byte frame headers) to text."""
    out, i = [], 0
    while i + 8 <= len(raw):
        size = int.from_bytes(raw[i + 4 : i + 8], "big")
        out.append(raw[i + 8 : i + 8 + size])
        i += 8 + size
    return b"".join(out).decode(errors="replace") if out else raw.decode(errors="replace")


def default_api_socket() -> str | None:
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    path = Path(runtime) / "podman" / "podman.sock"
    return str(path) if path.exists() else None


def cgroup_v2() -> bool:
    """True on a pure cgroup v2 host (where rootless Podman can apply limits)."""
    return Path("/sys/fs/cgroup/cgroup.controllers").exists()
