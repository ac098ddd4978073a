"""A booted systemd machine for end-to-end tests (and the systemd bench).

Where the host runs systemd as PID 1 the host itself is the machine. Otherwise this
boots the host's own OS with ``systemd-nspawn --volatile=overlay`` (HOST-NOTES: "a real
booted systemd for tests"): a real PID 1 with journald, D-Bus, logind, linger, user
managers and socket activation; every change inside lands in a throw-away tmpfs.
Commands run inside through ``nsenter -t <machine's PID 1> -a``.

Teardown is complete even when a test fails: the machine is powered off (then killed),
the bind mount of / is unmounted and the temporary directories are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = Path("/opt/lovd/venv")
LOVD = str(VENV / "bin" / "lovd")
PY = str(VENV / "bin" / "python")
SOCK = "/run/lovd/api.sock"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TEST_IMAGE = "localhost/lovd-test:latest"
# Host services the image would start: they would fight the host for ports, or just cost time.
MASKED = (
    "caddy.service",
    "postgresql.service",
    "postgresql@15-main.service",
    "avahi-daemon.service",
    "avahi-daemon.socket",
    "podman.service",
    "podman.socket",
)

# The config the e2e machine runs with (written before install.sh, which keeps it).
E2E_CONFIG = """\
runner: "systemd"
image: "localhost/lovd-test:latest"
port_range: "31000-31999"
demo: "off"
ready_timeout: 30.0
orphan_grace: 600.0
idle_timeout: 0.0
warm_pool: 0
limits:
  # The machine is a copy of a cgroup v1/hybrid host: memory/CPU cannot be enforced.
  enforce: false
  memory: "256M"
  cpus: 0.5
  tasks: 64
  max_running: 60
health:
  interval: 2.0
caddy:
  admin: ""
"""


def host_has_systemd() -> bool:
    try:
        comm = Path("/proc/1/comm").read_text().strip()
    except OSError:
        return False
    return comm == "systemd" and Path("/run/systemd/system").is_dir()


def unavailable_reason() -> str | None:
    """Why no systemd machine can be had here (None: it can)."""
    if os.geteuid() != 0:
        return "systemd end-to-end tests boot a machine and install lovd: run them as root"
    if host_has_systemd():
        return None
    for tool in ("systemd-nspawn", "nsenter", "mount"):
        if not shutil.which(tool):
            return f"{tool} is missing (apt-get install systemd-container util-linux)"
    if not VENV.joinpath("bin", "lovd").exists():
        return f"{VENV} has no lovd (packaging/setup-host.sh creates it)"
    return None


@dataclass
class Machine:
    """Run commands in the booted machine. ``leader`` None means the host itself."""

    leader: int | None
    workdir: Path | None = None
    log_path: Path | None = None
    _uid: int | None = field(default=None, repr=False)

    def argv(self, argv: list[str], *, user: str | None = None) -> list[str]:
        env = ["env", "-i", f"PATH={PATH}", "LANG=C.UTF-8"]
        if user:
            uid = self.uid if user == "lovd" else int(self.out("id", "-u", user))
            env += [
                f"HOME={self.home(user)}",
                f"USER={user}",
                f"XDG_RUNTIME_DIR=/run/user/{uid}",
                f"DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/{uid}/bus",
            ]
            inner = ["runuser", "-u", user, "--", *env, "sh", "-c", 'cd "$HOME" && exec "$@"', "-"]
            inner += argv
        else:
            inner = [*env, "HOME=/root", *argv]
        if self.leader is None:
            return inner
        return ["nsenter", "-t", str(self.leader), "-a", *inner]

    def home(self, user: str) -> str:
        return self.out("getent", "passwd", user).split(":")[5]

    def run(
        self,
        *argv: str,
        user: str | None = None,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            self.argv(list(argv), user=user),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {r.returncode}\nstdout: {r.stdout[-2000:]}\n"
                f"stderr: {r.stderr[-2000:]}"
            )
        return r

    def out(self, *argv: str, **kw: object) -> str:
        return self.run(*argv, **kw).stdout.strip()  # type: ignore[arg-type]

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("bash", "-c", script, **kw)  # type: ignore[arg-type]

    def popen(self, *argv: str, user: str | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(list(argv), user=user),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @property
    def uid(self) -> int:
        if self._uid is None:
            self._uid = int(self.out("id", "-u", "lovd"))
        return self._uid

    # --- lovd helpers ---

    def api(
        self,
        method: str,
        path: str,
        body: object = None,
        timeout: float = 60,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, object]:
        """One request to lovd's API socket as root (curl inside the machine)."""
        argv = ["curl", "-sS", "--max-time", str(timeout), "--unix-socket", SOCK, "-X", method]
        for k, v in (headers or {}).items():
            argv += ["-H", f"{k}: {v}"]
        argv += ["-w", "\n%{http_code}", f"http://lovd{path}"]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
        r = self.run(*argv, timeout=timeout + 10)
        text, _, code = r.stdout.rpartition("\n")
        try:
            data: object = json.loads(text) if text else None
        except ValueError:
            data = text
        return int(code), data

    def sessions(self) -> dict[str, dict[str, object]]:
        status, data = self.api("GET", "/api/sessions")
        assert status == 200, (status, data)
        assert isinstance(data, dict)
        return {s["id"]: s for s in data["sessions"]}

    def running_containers(self) -> dict[str, str]:
        """container name -> id of the lovd user's running containers."""
        out = self.podman("ps", "--format", "{{.Names}} {{.ID}}").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def journal(self, *matches: str, since_cursor: str | None = None) -> list[dict[str, str]]:
        argv = ["journalctl", "--no-pager", "-o", "json", *matches]
        if since_cursor:
            argv.append(f"--after-cursor={since_cursor}")
        out = self.run(*argv, check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def cursor(self) -> str:
        out = self.run("journalctl", "-n", "1", "--show-cursor", "-q", check=False).stdout
        return out.rsplit("-- cursor: ", 1)[-1].strip()

    def create_session(self) -> dict[str, object]:
        status, data = self.api("POST", "/api/sessions", {"wait": True})
        assert status == 201, (status, data)
        assert isinstance(data, dict)
        return data

    def systemctl_user(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--user", "--machine=lovd@", *args, check=check)

    def unit_props(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl_user("show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("podman", *args, user="lovd", check=check)

    def main_pid(self) -> int:
        return int(self.out("systemctl", "show", "-p", "MainPID", "--value", "lovd.service"))

    def wait_for(self, what: str, fn: object, timeout: float = 30, interval: float = 0.2) -> object:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            last = fn()  # type: ignore[operator]
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")

    def install(self, *, fresh_user: bool) -> float:
        """Run packaging/install.sh (test image only). Returns its wall time."""
        if fresh_user:
            # Prove the script creates everything: the host image has a lovd user.
            self.sh(
                "userdel lovd 2>/dev/null; groupdel lovd 2>/dev/null;"
                " groupdel lovd-api 2>/dev/null; groupdel lovd-web 2>/dev/null;"
                " sed -i '/^lovd:/d' /etc/subuid /etc/subgid; true"
            )
        # The machine overlays the host's /: a config left there by the host (with the
        # host lovd group's gid) must not leak in.
        self.run("rm", "-rf", "/etc/lovd")
        self.run("install", "-d", "-m", "0755", "/etc/lovd")
        self.run("tee", "/etc/lovd/lovd.conf", input=E2E_CONFIG)
        t0 = time.monotonic()
        self.run(
            "env",
            "LOVD_SKIP_APT=1",
            "LOVD_IMAGE=test",
            "bash",
            str(REPO / "packaging" / "install.sh"),
            timeout=600,
        )
        self._uid = None
        return time.monotonic() - t0


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _find_leader(nspawn: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited with {nspawn.returncode} before booting")
        todo = _children(nspawn.pid)
        while todo:
            pid = todo.pop()
            if _comm(pid) == "systemd":
                return pid
            todo += _children(pid)
        time.sleep(0.05)
    raise RuntimeError("the machine's systemd did not appear")


@contextlib.contextmanager
def booted(name: str = "lovd-e2e") -> Iterator[Machine]:
    """A booted systemd machine (the host itself when systemd is PID 1 here)."""
    if host_has_systemd():
        yield Machine(None)
        return
    tmp = Path(tempfile.mkdtemp(prefix="lovd-e2e-", dir="/var/tmp"))
    root, containers, home = tmp / "root", tmp / "containers", tmp / "home"
    for d in (root, containers, home):
        d.mkdir()
    log_path = tmp / "nspawn.log"
    mounted = False
    nspawn: subprocess.Popen[bytes] | None = None
    leader: int | None = None
    try:
        subprocess.run(["mount", "--bind", "/", str(root)], check=True)
        mounted = True
        argv = [
            "systemd-nspawn",
            f"--directory={root}",
            "--volatile=overlay",
            "--register=no",
            "--keep-unit",
            "--boot",
            f"--machine={name}-{os.getpid()}",
            "--console=passive",
            # Its own network namespace: session ports and stray services cannot clash
            # with the host's (rootless Podman needs no outside network for the test image).
            "--private-network",
            "--bind=/dev/fuse",
            "--bind=/dev/net/tun",
            # Podman storage must be a real filesystem (overlay on overlay fails).
            f"--bind={containers}:/var/lib/containers",
            f"--bind={home}:/var/lib/lovd",
            # The checkout under test, at the same path: a clone may live in /tmp, which
            # the booted machine mounts afresh.
            f"--bind-ro={REPO}",
            "--capability=all",
            "--system-call-filter=@keyring @privileged @mount bpf",
            "--property=DeviceAllow=/dev/fuse rwm",
            "--",
            *(f"systemd.mask={u}" for u in MASKED),
        ]
        with open(log_path, "wb") as log:
            nspawn = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        leader = _find_leader(nspawn, 30)
        m = Machine(leader, tmp, log_path)
        m.wait_for(
            "the machine's system bus",
            lambda: m.run("test", "-S", "/run/dbus/system_bus_socket", check=False).returncode == 0,
            timeout=60,
        )
        state = m.run("systemctl", "is-system-running", "--wait", check=False, timeout=90)
        if state.stdout.strip() not in ("running", "degraded"):
            raise RuntimeError(f"machine did not boot: {state.stdout.strip()} {state.stderr}")
        yield m
    finally:
        _teardown(nspawn, leader, root if mounted else None, tmp)


def _teardown(
    nspawn: subprocess.Popen[bytes] | None, leader: int | None, root: Path | None, tmp: Path
) -> None:
    if nspawn is not None and nspawn.poll() is None:
        if leader is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, signal.SIGRTMIN + 4)  # systemd: poweroff
        try:
            nspawn.wait(timeout=30)
        except subprocess.TimeoutExpired:
            if leader is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leader, signal.SIGKILL)  # PID 1 of the namespace: takes all with it
            nspawn.kill()
            nspawn.wait(timeout=30)
    if root is not None:
        for _ in range(20):
            if (
                subprocess.run(["umount", str(root)], check=False, capture_output=True).returncode
                == 0
            ):
                break
            time.sleep(0.25)
        else:
            subprocess.run(["umount", "-l", str(root)], check=False)
    # Never remove anything under a path that still has the host's / mounted on it.
    if root is not None and os.path.ismount(root):
        print(f"lovd e2e: {root} is still mounted; leaving {tmp} in place", file=sys.stderr)
        return
    for sub in ("containers", "home"):
        shutil.rmtree(tmp / sub, ignore_errors=True)
    with contextlib.suppress(OSError):
        (tmp / "root").rmdir()
    with contextlib.suppress(OSError):
        (tmp / "nspawn.log").unlink()
    with contextlib.suppress(OSError):
        tmp.rmdir()
