"""Session resource limits: which of them this host can enforce, and refusing to start
sessions without them (``limits.enforce``), the way egress does.

Rootless Podman applies ``--memory``/``--cpus``/``--pids-limit`` (and systemd a unit's
``MemoryMax=``/``CPUQuota=``/``TasksMax=``) only where the lovd user's systemd manager has
the cgroup v2 controllers delegated to it. Elsewhere (cgroup v1 or hybrid, no delegation)
Podman drops them silently: ``podman inspect`` shows 0 and a session can use the whole
host. The process count has a second guard that works everywhere: ``--ulimit nproc``
(RLIMIT_NPROC), counted per uid, and under ``--userns=auto`` each container has uids of
its own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lovd.config import Config
from lovd.errors import LovdError

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup controller -> the setting it enforces
CONTROLLERS = {"memory": "limits.memory", "cpu": "limits.cpus", "pids": "limits.tasks"}
DELEGATE_FIX = (
    "boot with systemd.unified_cgroup_hierarchy=1 (cgroup v2) and delegate the controllers "
    "to user managers (Delegate=cpu cpuset io memory pids in a user@.service drop-in: "
    "packaging/install.sh installs units/user@.service.d/delegate.conf), then restart "
    "lovd; or set limits.enforce: false to run sessions without them"
)


def user_controllers_file(uid: int, root: Path = CGROUP_ROOT) -> Path:
    return root / "user.slice" / f"user-{uid}.slice" / f"user@{uid}.service" / "cgroup.controllers"


def detect(userns: str, uid: int | None = None, root: Path = CGROUP_ROOT) -> Enforcement:
    """Which of memory/cpu/pids the lovd user's containers get enforced by a cgroup.

    Both runners put containers below the user's systemd manager (a transient unit, or
    Podman's systemd cgroup manager), so what is delegated to ``user@UID.service`` is what
    applies. No unified hierarchy (v1/hybrid) or no user manager: nothing."""
    source = user_controllers_file(os.getuid() if uid is None else uid, root)
    unified = (root / "cgroup.controllers").exists()
    names: list[str] = []
    if unified:
        try:
            names = source.read_text().split()
        except OSError:
            names = []
    return Enforcement(
        cgroup=frozenset(CONTROLLERS) & frozenset(names),
        userns=userns,
        unified=unified,
        source=source,
    )


@dataclass(frozen=True)
class Enforcement:
    """What a runner's containers get, for the configured limits."""

    cgroup: frozenset[str]  # controllers enforced by a cgroup
    userns: str  # --userns: RLIMIT_NPROC counts per uid, so it is per container under auto
    unified: bool = True  # cgroup v2 only (not v1 or hybrid)
    source: Path = Path("/nonexistent")  # the user manager's cgroup.controllers
    reason: str = ""  # why no cgroup holds them, when it is not the host's cgroups

    @property
    def nproc_per_container(self) -> bool:
        return self.userns == "auto"

    @property
    def missing(self) -> list[str]:
        """Controllers whose limit nothing enforces (pids is covered by RLIMIT_NPROC
        where each container has uids of its own)."""
        out = []
        for name in CONTROLLERS:
            if name in self.cgroup or (name == "pids" and self.nproc_per_container):
                continue
            out.append(name)
        return out

    def describe(self, config: Config) -> list[str]:
        """One phrase per limit: how (or whether) it is enforced."""
        values = {
            "memory": f"memory {config.memory_max}",
            "cpu": f"cpu {config.cpus:g}",
            "pids": f"tasks {config.tasks_max}",
        }
        out = []
        for name in CONTROLLERS:
            if name in self.cgroup:
                how = "enforced by cgroup"
                if name == "pids":
                    how += " and by rlimit (nproc)"
            elif name == "pids" and self.nproc_per_container:
                how = "enforced by rlimit (nproc) only, not by cgroup"
            elif name == "pids":
                how = (
                    "NOT enforced (no pids controller, and rlimit nproc is shared by "
                    f"containers under --userns={self.userns})"
                )
            else:
                how = "NOT enforced"
            out.append(f"{values[name]}: {how}")
        return out

    def why(self) -> str:
        if self.reason:
            return self.reason
        if not self.unified:
            return "this host has cgroup v1/hybrid, where rootless containers get no cgroup limits"
        return (
            f"the lovd user's systemd manager has no {', '.join(self.missing)} controller "
            f"delegated ({self.source})"
        )


def podman_cgroup_manager(home: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """The cgroup manager rootless Podman is configured with (containers.conf(5): the
    system files, then the user's; CONTAINERS_CONF replaces them all)."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME", "~")).expanduser() if home is None else home
    user = Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "containers"
    files: list[Path] = []
    if env.get("CONTAINERS_CONF"):
        files = [Path(env["CONTAINERS_CONF"])]
    else:
        for base in (Path("/usr/share/containers"), Path("/etc/containers"), user):
            files.append(base / "containers.conf")
            files += sorted((base / "containers.conf.d").glob("*.conf"))
    manager = "systemd"
    for f in files:
        try:
            engine = tomllib.loads(f.read_text()).get("engine", {})
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if isinstance(engine, dict) and isinstance(engine.get("cgroup_manager"), str):
            manager = engine["cgroup_manager"]
    return manager


def for_runner(runner: str, userns: str, *, cgroup_manager: str | None = None) -> Enforcement:
    """What containers of the ``systemd`` or ``podman`` runner get. The systemd runner's
    unit limits are the user manager's; the direct runner's containers are in the user
    manager's tree only through Podman's systemd cgroup manager (with cgroupfs a rootless
    container gets no cgroup it may limit)."""
    e = detect(userns)
    if runner == "systemd" or not e.cgroup:
        return e
    manager = cgroup_manager or podman_cgroup_manager()
    if manager == "systemd":
        return e
    return dataclasses.replace(
        e,
        cgroup=frozenset(),
        reason=f"Podman's cgroup_manager is {manager!r} (containers.conf), so rootless "
        'containers get no cgroup of the user manager; set cgroup_manager = "systemd"',
    )


def check(config: Config, enforcement: Enforcement) -> None:
    """Before every start: refuse (503) when a limit cannot be enforced and the operator
    has not opted out."""
    missing = enforcement.missing
    if not missing or not config.limits_enforce:
        return
    names = ", ".join(f"{m} ({CONTROLLERS[m]})" for m in missing)
    raise LovdError(
        "unavailable",
        f"session limits cannot be enforced here: {names} would not apply, because "
        f"{enforcement.why()}. Fix: {DELEGATE_FIX}.",
        extra={"missing_limits": missing},
    )


def announce(config: Config, enforcement: Enforcement) -> None:
    """At daemon start: say once what sessions will get."""
    missing = enforcement.missing
    summary = "; ".join(enforcement.describe(config))
    if not missing:
        log.info("session limits: %s", summary)
    elif config.limits_enforce:
        log.error(
            "session limits cannot be enforced (%s): sessions will be refused with 503; "
            "%s (limits.enforce is true). Fix: %s",
            summary,
            enforcement.why(),
            DELEGATE_FIX,
        )
    else:
        log.warning(
            "limits.enforce is false: sessions start without the limits this host cannot "
            "enforce (%s)",
            summary,
        )
