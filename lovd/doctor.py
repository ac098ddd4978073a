"""``lovd doctor``: check the host for everything lovd needs, with a fix for each failure."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import sqlite3
from pathlib import Path

from lovd import egress, limits
from lovd.config import Config
from lovd.podman import LABEL_INSTANCE, LABEL_SESSION, default_api_socket
from lovd.report import Check
from lovd.runner import user_manager_reachable
from lovd.sync.doctor import checks as postgres_checks


async def _run(*argv: str, stdin: bytes | None = None) -> tuple[int, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except FileNotFoundError:
        return 127, f"{argv[0]}: not found"
    out, _ = await proc.communicate(stdin)
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

    out.append(limits_check(config, host, runner=await _runner_kind(config)))

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
    out += await egress_checks(config, podman_ok=bool(podman and info))
    out.append(floors_check(config))
    out.append(disk_quota_check(config))
    out += await postgres_checks(config)
    return out


async def _runner_kind(config: Config) -> str:
    if config.runner != "auto":
        return config.runner
    return "systemd" if await user_manager_reachable() else "podman"


def limits_check(
    config: Config,
    podman_host: dict[str, object],
    enforcement: limits.Enforcement | None = None,
    *,
    runner: str = "podman",
) -> Check:
    """How each session limit is enforced (by cgroup, by rlimit, or not at all) for this
    user's containers under ``runner``, and whether sessions start without the missing
    ones."""
    e = enforcement or limits.for_runner(runner, config.userns)
    detail = "; ".join(e.describe(config))
    seen = podman_host.get("cgroupVersion"), podman_host.get("cgroupManager")
    if all(seen):
        detail += f" (podman: cgroup {seen[0]}, {seen[1]} manager)"
    missing = e.missing
    if not missing:
        return Check("limits", "ok", detail)
    names = ", ".join(missing)
    if config.limits_enforce:
        return Check(
            "limits",
            "fail",
            f"{detail}. Sessions are refused (503, limits.enforce: true): {e.why()}",
            limits.DELEGATE_FIX,
        )
    return Check(
        "limits",
        "warn",
        f"{detail}. limits.enforce: false: sessions start without {names} limits",
        limits.DELEGATE_FIX.split("; or ")[0],
    )


def floors_check(config: Config) -> Check:
    """The disk and memory floors below which new sessions are refused, and where the host
    stands against them now."""
    from lovd.session.admission import Floors

    try:
        ok, detail = Floors(config).summary()
    except OSError as e:
        return Check("floors", "warn", f"not checked: {e}", "create state_dir first")
    fix = "" if ok else "free disk under state_dir or memory, or lower floors.* in lovd.conf"
    return Check("floors", "ok" if ok else "fail", detail, fix)


def disk_quota_check(config: Config) -> Check:
    """Which per-session disk quota is in force (lovd/session/quota.py)."""
    from lovd.session.quota import KIND

    limit = config.disk_quota
    if not limit:
        return Check(
            "disk-quota",
            "warn",
            "no per-session disk quota (limits.disk: 0): one chat can fill the disk",
            "set limits.disk in lovd.conf (e.g. 1G)",
        )
    return Check("disk-quota", "ok", f"limits.disk {config.disk_max} per session: {KIND}")


async def egress_checks(config: Config, *, podman_ok: bool) -> list[Check]:
    """Is session egress in force: configured, loadable here, and live in every running
    session's network namespace (read back with nft, as the hook's own user namespace)."""
    fix_off = "set egress.enforce: true in lovd.conf (and apt-get install nftables)"
    if not config.egress_enforce:
        return [
            Check(
                "egress",
                "warn",
                "NOT in force (egress.enforce: false): sessions can reach the host's loopback "
                "services, other sessions' ports and the network",
                fix_off,
            )
        ]
    try:
        rules = egress.render_rules(config)
    except egress.EgressError as e:
        return [Check("egress", "fail", f"NOT in force: {e}", "fix the setting in lovd.conf")]
    nft = egress.nft_path()
    if nft is None:
        return [
            Check(
                "egress",
                "fail",
                "NOT in force: nft not found, so every session start fails (egress.enforce)",
                "apt-get install nftables",
            )
        ]
    if os.geteuid() == 0 or not podman_ok:
        why = "running as root" if os.geteuid() == 0 else "podman unusable"
        return [Check("egress", "warn", f"not checked ({why})", "run lovd doctor as lovd")]
    # The hook's situation without a container: root of the rootless user namespace,
    # a fresh network namespace, the rules lovd would load.
    code, text = await _run(
        config.podman, "unshare", "unshare", "--net", nft, "-f", "/dev/stdin", stdin=rules.encode()
    )
    if code != 0:
        last = text.splitlines()[-1] if text else f"exit {code}"
        return [
            Check(
                "egress",
                "fail",
                f"NOT in force: the rules do not load in a rootless network namespace ({last}), "
                "so every session start fails",
                "the kernel needs nf_tables with nft_ct and nft_reject, and unprivileged user "
                "namespaces; or set egress.enforce: false (no egress rules at all)",
            )
        ]
    written = egress.directory(config) / "rules.nft"
    try:
        stale = written.read_text() != rules
    except FileNotFoundError:
        stale = False  # lovd writes the hook when it starts
    if stale:
        first = Check(
            "egress",
            "warn",
            f"in force, but {written} (what sessions get) differs from lovd.conf",
            "restart lovd to apply the configured egress rules to new sessions",
        )
    else:
        first = Check(
            "egress",
            "ok",
            f"in force for every session lovd starts: {egress.summary(config)} "
            f"(OCI hook in {egress.hooks_dir(config)})",
        )
    return [first, await _egress_live(config, nft)]


def _instance_id(config: Config) -> str | None:
    """This lovd's instance id (its containers' lovd.instance label), read-only."""
    if not config.db_path.exists():
        return None
    try:
        with contextlib.closing(
            sqlite3.connect(f"{config.db_path.as_uri()}?mode=ro", uri=True, timeout=2)
        ) as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None


async def _egress_live(config: Config, nft: str) -> Check:
    iid = _instance_id(config)
    label = f"{LABEL_INSTANCE}={iid}" if iid else LABEL_SESSION
    code, text = await _run(
        config.podman,
        "ps",
        "--filter",
        f"label={label}",
        "--filter",
        "status=running",
        "--format",
        "{{.Names}} {{.Pid}}",
    )
    if code != 0:
        return Check("egress-live", "warn", f"cannot list session containers: {text[-200:]}")
    running = [line.split() for line in text.splitlines() if line.strip()]
    missing = []
    for name, pid in running:
        code, listing = await _run(
            config.podman, "unshare", "nsenter", "--target", pid, "--net",
            nft, "list", "table", "inet", egress.TABLE,
        )  # fmt: skip
        if code != 0 or "policy drop" not in listing:
            missing.append(name)
    if missing:
        return Check(
            "egress-live",
            "fail",
            f"NOT in force in {len(missing)} of {len(running)} running session containers: "
            + ", ".join(missing),
            "restart them (lovd session stop ID, then open it again) and check that their "
            "podman run carries --hooks-dir",
        )
    if not running:
        return Check("egress-live", "ok", "no running session containers to check")
    return Check(
        "egress-live", "ok", f"rules present in all {len(running)} running session containers"
    )


def config_report(path: Path, named: bool, problems: list[str]) -> list[Check]:
    """The settings' validation, as lovd itself applies it at load (config.problems)."""
    where = str(path) if named or path.exists() else f"{path} absent: every default"
    if not problems:
        return [Check("config", "ok", f"{where}: every setting valid")]
    fix = f"edit {path}: lovd.conf.example lists every key with its default and range"
    return [Check("config", "fail", p, fix) for p in problems]


def render(results: list[Check]) -> str:
    mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    lines = []
    for r in results:
        lines.append(f"[{mark[r.status]}] {r.name:13} {r.detail}")
        if r.fix and r.status != "ok":
            lines.append(f"{'':20}fix: {r.fix}")
    fails = sum(r.status == "fail" for r in results)
    warns = sum(r.status == "warn" for r in results)
    if fails:
        lines.append(f"\n{fails} problem(s) found")
    elif warns:
        # "all checks passed" above a list of WARN lines reads as if they were ignored.
        lines.append(f"\nall checks passed with {warns} warning{'s' if warns != 1 else ''}")
    else:
        lines.append("\nall checks passed")
    return "\n".join(lines)
