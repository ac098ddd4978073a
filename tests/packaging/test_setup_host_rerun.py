"""Re-running packaging/setup-host.sh (after a pull, as its header says is safe) leaves
running sessions alone: Podman is migrated -- which restarts its pause process and stops
every container of the lovd user -- only when the Podman configuration changed, like
install.sh (both write it through lib.sh's podman_user_config).

As root, on this host: a container of the lovd user streaming events to an open
connection, then setup-host.sh again (no apt, no venv, no images); the stream keeps
flowing and the container is the same one.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, need

LIB = ROOT / "packaging" / "lib.sh"
LOVD = "lovd"
IMAGE = "localhost/lovd-test:latest"


def sh(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f'set -eu; . "{LIB}"; {script}', "lib-test", *args],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    need(os.geteuid() == 0, "writes files as another user: run as root")
    d = Path(tempfile.mkdtemp(prefix="lovd-podmancfg-", dir="/var/lib"))
    d.chmod(0o755)
    pw = pwd.getpwnam("nobody")
    os.chown(d, pw.pw_uid, pw.pw_gid)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_podman_user_config_reports_a_change_only_when_it_writes(nobody_dir: Path) -> None:
    call = 'PODMAN_CONFIG_CHANGED=; podman_user_config nobody "$1"; echo "[$PODMAN_CONFIG_CHANGED]"'
    first = sh(call, str(nobody_dir))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "[1]"
    conf = nobody_dir / "containers.conf"
    assert "[engine]" in conf.read_text()
    assert 'driver = "overlay"' in (nobody_dir / "storage.conf").read_text()
    assert conf.stat().st_uid == pwd.getpwnam("nobody").pw_uid
    again = sh(call, str(nobody_dir))
    assert again.stdout.strip() == "[]", "unchanged files: no migrate"
    conf.write_text(conf.read_text().replace("overlay", "vfs") + "# edited\n")
    assert sh(call, str(nobody_dir)).stdout.strip() == "[1]"
    assert "# edited" not in conf.read_text()


def as_lovd(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    pw = pwd.getpwnam(LOVD)
    return subprocess.run(
        ["runuser", "-u", LOVD, "--", "env", "-C", pw.pw_dir, f"HOME={pw.pw_dir}",
         f"XDG_RUNTIME_DIR=/run/user/{pw.pw_uid}", *argv],
        capture_output=True, text=True, check=check, timeout=120,
    )  # fmt: skip


def would_migrate() -> str:
    """Why setup-host.sh would migrate here ("" if it would not), found without writing:
    a migrate would stop every container of the lovd user, other tests' too."""
    home = pwd.getpwnam(LOVD).pw_dir
    dry = sh(
        'owner_write() { echo "would write $3"; cat > /dev/null; }; PODMAN_CONFIG_CHANGED=; '
        'podman_user_config "$1" "$2"',
        LOVD, f"{home}/.config/containers",
    )  # fmt: skip
    if dry.returncode != 0 or dry.stdout.strip():
        return dry.stdout.strip() or dry.stderr.strip()
    for f in ("/etc/subuid", "/etc/subgid"):
        if not any(line.startswith(f"{LOVD}:") for line in Path(f).read_text().splitlines()):
            return f"no {LOVD} line in {f}"
    return ""


class Stream:
    """An open event stream from the container, read on a thread."""

    def __init__(self, port: int) -> None:
        deadline = time.monotonic() + 30
        while True:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            head = self.sock.recv(64)
            if head.startswith(b"HTTP/1.0 200"):
                break
            self.sock.close()  # the port forward answered before the server listened
            assert time.monotonic() < deadline, "the container's stream never opened"
            time.sleep(0.2)
        self.events: list[float] = []
        self.closed_at: float | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            while data := self.sock.recv(4096):
                self.events.extend(time.monotonic() for _ in range(data.count(b"data:")))
        except OSError:
            pass
        self.closed_at = time.monotonic()


def test_rerunning_setup_host_keeps_a_running_container_and_its_stream() -> None:
    need(os.geteuid() == 0, "runs packaging/setup-host.sh: run as root")
    try:
        pwd.getpwnam(LOVD)
    except KeyError:
        need(False, f"no {LOVD} user: run packaging/setup-host.sh first")
    need(shutil.which("podman") is not None, "podman is not installed")
    need(as_lovd("podman", "image", "exists", IMAGE, check=False).returncode == 0,
         f"{IMAGE} missing: lovd image build --test")  # fmt: skip
    why = would_migrate()
    need(not why, f"setup-host.sh would migrate Podman here ({why}): run it once first")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"lovd-rerun-test-{secrets.token_hex(4)}"
    serve = (
        "{ printf 'HTTP/1.0 200 OK\\r\\nContent-Type: text/event-stream\\r\\n\\r\\n'; "
        "i=0; while :; do i=$((i+1)); printf 'data: %d\\n\\n' $i; sleep 0.2; done; } "
        "| nc -l -p 4096"
    )
    cid = as_lovd(
        "podman", "run", "-d", "--rm", "--init", "--name", name,
        "--label", f"lovd.instance=rerun-test-{name}",
        "-p", f"127.0.0.1:{port}:4096", IMAGE, "sh", "-c", serve,
    ).stdout.strip()  # fmt: skip
    try:
        stream = Stream(port)
        t0 = time.monotonic()
        run = subprocess.run(
            ["bash", str(ROOT / "packaging" / "setup-host.sh")],
            env={**os.environ, "LOVD_SKIP_APT": "1", "LOVD_SKIP_IMAGES": "1",
                 "LOVD_SKIP_VENV": "1"},
            capture_output=True, text=True, check=False, timeout=600,
        )  # fmt: skip
        t1 = time.monotonic()
        assert run.returncode == 0, run.stderr[-2000:]
        assert "migrate" not in run.stderr + run.stdout
        time.sleep(1.5)
        assert stream.closed_at is None, "the stream was cut"
        assert any(t > t1 for t in stream.events), "no events after setup-host.sh"
        gaps = [b - a for a, b in zip(stream.events, stream.events[1:], strict=False)]
        assert max(gaps, default=0) < 2.0, f"the stream stalled for {max(gaps):.1f} s"
        state = as_lovd("podman", "inspect", "--format", "{{.Id}} {{.State.Status}}", name)
        assert state.stdout.split() == [cid, "running"]
        print(f"setup-host.sh took {t1 - t0:.1f} s; {len(stream.events)} events, none lost")
    finally:
        as_lovd("podman", "rm", "-f", "-t", "0", name, check=False)
