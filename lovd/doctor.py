"""``lovd doctor``: check the host for everything lovd needs, with a fix for each failure."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from lovd.config import Config
from lovd.podman import cgroup_v2, default_api_socket
from lovd.runner import user_manager_reachable


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn, fail
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


async def _run(*argv: str) -> tuple[int, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except FileNotFoundError:
        return 127, f"{argv[0]}: not found"
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


def _subids(path: str, user: str) -> int:
    total = 0
    try:
        for line in Path(path).read_text().splitlines():
            parts = line.split(":")
            if len(parts) == 3 and parts[0] in (user, str(os.getuid())):
                total += int(parts[2])
    except (OSError, ValueError):
        return 0
    return total


async def run_checks(config: Config) -> list[Check]:
    user = pwd.getpwuid(os.getuid()).pw_name
    out: list[Check] = []
    if os.geteuid() == 0:
        out.append(
            Check(
                "user",
                "fail",
                "running as root",
                "run lovd (and lovd doctor) as the lovd user: runuser -u lovd -- lovd doctor",
            )
        )
    else:
        out.append(Check("user", "ok", f"running as {user} (uid {os.getuid()})"))

    podman = shutil.which(config.podman)
    info: dict[str, object] = {}
    if not podman:
        out.append(Check("podman", "fail", f"{config.podman} not found", "apt-get install podman"))
    else:
        code, text = await _run(config.podman, "info", "--format", "json")
        if code != 0:
            out.append(
                Check(
                    "podman",
                    "fail",
                    f"podman info failed: {text.splitlines()[-1:]}",
                    "check subuid/subgid and run 'podman system migrate' as this user",
                )
            )
        else:
            info = json.loads(text)
            ver = info.get("version", {})
            out.append(
                Check(
                    "podman",
                    "ok",
                    f"podman {ver.get('Version', '?')} usable as {user}"
                    if isinstance(ver, dict)
                    else "podman usable",
                )
            )
    host = info.get("host", {}) if isinstance(info.get("host"), dict) else {}
    store = info.get("store", {}) if isinstance(info.get("store"), dict) else {}
    assert isinstance(host, dict) and isinstance(store, dict)
    if info:
        rt = host.get("ociRuntime", {}).get("name", "?")
        out.append(Check("runtime", "ok", f"OCI runtime {rt}"))
        driver = store.get("graphDriverName", "?")
        if driver == "overlay":
            out.append(Check("storage", "ok", "overlay storage driver"))
        else:
            out.append(
                Check(
                    "storage",
                    "warn",
                    f"storage driver {driver} (copies images per container)",
                    'set driver = "overlay" in ~/.config/containers/storage.conf, then '
                    "podman system reset",
                )
            )

    for kind in ("subuid", "subgid"):
        n = _subids(f"/etc/{kind}", user)
        if os.geteuid() == 0:
            continue
        if n >= 65536:
            out.append(Check(kind, "ok", f"{n} subordinate ids for {user}"))
        else:
            out.append(
                Check(
                    kind,
                    "fail",
                    f"{n} subordinate ids for {user} (need >= 65536)",
                    f"usermod --add-{kind}s 524288-1572863 {user}",
                )
            )

    if cgroup_v2():
        out.append(
            Check(
                "cgroups",
                "ok",
                "cgroup v2: memory/CPU/task limits are enforced "
                "(with delegation to the user manager)",
            )
        )
    else:
        out.append(
            Check(
                "cgroups",
                "warn",
                "cgroup v1/hybrid: rootless containers cannot have memory/CPU limits "
                "enforced; pids-limit is applied by the runtime, unit limits are recorded only",
                "boot with systemd.unified_cgroup_hierarchy=1 for enforced limits",
            )
        )

    tun = Path("/dev/net/tun")
    if tun.exists() and os.access(tun, os.R_OK | os.W_OK):
        out.append(Check("network", "ok", "/dev/net/tun usable (slirp4netns)"))
    else:
        out.append(
            Check(
                "network", "fail", "/dev/net/tun not usable by this user", "chmod 0666 /dev/net/tun"
            )
        )

    if await user_manager_reachable():
        out.append(Check("user-manager", "ok", "systemd user manager reachable (systemd runner)"))
    else:
        status = "fail" if config.runner == "systemd" else "warn"
        out.append(
            Check(
                "user-manager",
                status,
                "no systemd user manager: sessions run under the direct podman runner",
                f"loginctl enable-linger {user}",
            )
        )
    linger = Path("/var/lib/systemd/linger") / user
    if Path("/run/systemd/system").exists():
        out.append(
            Check(
                "linger",
                "ok" if linger.exists() else "warn",
                "linger enabled" if linger.exists() else "linger not enabled",
                "" if linger.exists() else f"loginctl enable-linger {user}",
            )
        )
    api = config.podman_socket or default_api_socket()
    out.append(
        Check(
            "podman-api",
            "ok" if api else "warn",
            f"Podman API socket {api}" if api else "no Podman API socket (CLI fallback)",
            "" if api else "systemctl --user enable --now podman.socket",
        )
    )

    state = config.state_path
    if state.is_dir() and os.access(state, os.W_OK):
        out.append(Check("state-dir", "ok", f"{state} writable"))
    else:
        out.append(
            Check(
                "state-dir",
                "fail",
                f"{state} missing or not writable by {user}",
                f"install -d -o {user} -m 0750 {state}",
            )
        )

    if podman and info:
        code, _ = await _run(config.podman, "image", "exists", config.image)
        out.append(
            Check(
                "image",
                "ok" if code == 0 else "fail",
                f"{config.image} {'present' if code == 0 else 'missing'}",
                "" if code == 0 else "lovd image build",
            )
        )
    return out


def render(results: list[Check]) -> str:
    mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    lines = []
    for r in results:
        lines.append(f"[{mark[r.status]}] {r.name:13} {r.detail}")
        if r.fix and r.status != "ok":
            lines.append(f"{'':20}fix: {r.fix}")
    fails = sum(r.status == "fail" for r in results)
    lines.append(f"\n{fails} problem(s) found" if fails else "\nall checks passed")
    return "\n".join(lines)
