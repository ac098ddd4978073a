"""The README's two commands, typed as written, on a fresh copy of this machine.

A throw-away ``systemd-nspawn --volatile=overlay`` of the host's own OS (not booted:
systemd is not PID 1 there, as on the CI machines, so the quick start runs lovd in the
foreground with its Caddy on :8080). Inside, on a pseudo-terminal like a person's:

- a user who may use sudo (installed in the machine first when the host has none, as on
  a fresh Debian) types ``packaging/quickstart.sh`` (it runs itself again with
  sudo), gets the landing page, types Ctrl-C: lovd and Caddy are gone;
- root, on a machine with no sudo at all, does the same;
- root with the clone in /root (0700) is told what to do before anything is installed;
- root without sudo runs ``packaging/run-tests.sh`` (with a few tests as its pytest
  arguments, and without this e2e suite inside itself).

The machine shares the host's network (pip in setup-host.sh needs the package index), so
:8080 and lovd's loopback ports must be free on the host.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import machine as mm
from tests.e2e.conftest import need

REPO = Path(__file__).resolve().parents[2]
PORTS = (8080, 18765, 18766, 18780)  # Caddy, the demo stand-ins, the broker

# Runs a command on a pseudo-terminal, types Ctrl-C once lovd serves, reports one JSON line.
DRIVER = r"""
import json, os, pty, select, subprocess, sys, time, urllib.request
def count(*argv):
    out = subprocess.run(["pgrep", "-c", *argv], capture_output=True, text=True).stdout
    return int(out.strip() or 0)
def get(path, lang):
    req = urllib.request.Request("http://127.0.0.1:8080" + path, headers={"Accept-Language": lang})
    with urllib.request.urlopen(req, timeout=2) as r:
        return r.read().decode()
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
report, out, deadline, started = {}, b"", time.time() + 400, time.time()
while time.time() < deadline:
    if select.select([fd], [], [], 0.5)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        out += data
    if "served_after" not in report:
        try:
            page = get("/", os.environ.get("LANG_WANTED", "nb"))
        except OSError:
            continue
        report["served_after"] = round(time.time() - started, 1)
        report["h1"] = page.split("<h1>", 1)[1].split("</h1>", 1)[0]
        report["caddy_before"] = count("-x", "caddy")
        os.write(fd, b"\x03")  # Ctrl-C: the terminal signals its foreground group
        deadline = time.time() + 30
_, status = os.waitpid(pid, 0)
time.sleep(1)
report["exit"] = os.waitstatus_to_exitcode(status)
report["caddy_after"] = count("-x", "caddy")
report["lovd_after"] = count("-f", "lovd serve")
report["tail"] = out.decode(errors="replace")[-800:]
print("REPORT " + json.dumps(report), flush=True)
"""

INNER = r"""#!/bin/bash
set -u
echo "127.0.1.1 $(hostname)" >> /etc/hosts  # sudo resolves its own host name
# The "user with sudo" case needs sudo, which a fresh machine may not have (this copy of
# the host's OS is thrown away, so installing it changes nothing outside).
if ! command -v sudo >/dev/null; then
  echo "=== installing sudo"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends sudo >/dev/null
  echo "SUDO $?"
fi
useradd -m alice && echo 'alice ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/alice
cp -a /src /srv/lovd && cd /srv/lovd
echo "=== alice, with sudo"
runuser -u alice -- env LANG_WANTED=en python3 /driver.py packaging/quickstart.sh
rm -f /usr/bin/sudo
echo "=== root, no sudo"
python3 /driver.py packaging/quickstart.sh
echo "=== root, clone in /root"
cp -a /src /root/lovd && (cd /root/lovd && packaging/quickstart.sh; echo "REFUSED $?")
echo "=== root, no sudo, the test command"
LOVD_SKIP_E2E=1 packaging/run-tests.sh tests/unit/test_pages_i18n.py > /tmp/rt.log 2>&1
echo "TESTS $?"
grep -E "passed|failed|error" /tmp/rt.log | tail -5
"""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))  # only probing whether it is taken
        except OSError:
            return False
    return True


@pytest.fixture
def copy_of_this_machine() -> Iterator[tuple[Path, Path, Path]]:
    need(mm.unavailable_reason() is None, mm.unavailable_reason() or "")
    need(not mm.host_has_systemd(), "the quick start's foreground path: a host without systemd")
    busy = [p for p in PORTS if not _port_free(p)]
    need(not busy, f"ports {busy} are in use on the host (the machine shares its network)")
    tmp = Path(tempfile.mkdtemp(prefix="lovd-readme-", dir="/var/tmp"))
    root, store = tmp / "root", tmp / "containers"
    root.mkdir()
    store.mkdir()
    shutil.chown(store, "lovd", "lovd")  # the lovd user's rootless Podman storage
    (tmp / "driver.py").write_text(DRIVER)
    (tmp / "inner.sh").write_text(INNER)
    (tmp / "inner.sh").chmod(0o755)
    subprocess.run(["mount", "--bind", "/", str(root)], check=True)
    try:
        yield tmp, root, store
    finally:
        for _ in range(20):
            umount = subprocess.run(["umount", str(root)], check=False, capture_output=True)
            if umount.returncode == 0:
                break
            time.sleep(0.25)
        # Never remove anything under a path that still has the host's / mounted on it.
        if os.path.ismount(root):
            print(f"{root} is still mounted; leaving {tmp} in place")
        else:
            root.rmdir()
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)


def test_the_readme_commands_as_written(copy_of_this_machine: tuple[Path, Path, Path]) -> None:
    tmp, root, store = copy_of_this_machine
    argv = [
        "systemd-nspawn", "--quiet", f"--directory={root}", "--volatile=overlay",
        "--register=no", "--keep-unit",
        "--bind=/dev/fuse", "--bind=/dev/net/tun",
        # Podman storage must be a real filesystem (overlay on overlay fails).
        f"--bind={store}:/var/lib/lovd/.local/share/containers",
        f"--bind-ro={REPO}:/src",
        f"--bind-ro={tmp / 'driver.py'}:/driver.py", f"--bind-ro={tmp / 'inner.sh'}:/inner.sh",
        "--capability=all", "--system-call-filter=@keyring @privileged @mount bpf",
        "--property=DeviceAllow=/dev/fuse rwm",
        "/inner.sh",
    ]  # fmt: skip
    started = time.monotonic()
    run = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=1200)
    out = run.stdout + run.stderr
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "readme-commands.log").write_text(out)
    reports = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("REPORT ")]
    print(f"{time.monotonic() - started:.0f} s", json.dumps(reports, indent=1)[:3000])
    assert len(reports) == 2, out[-3000:]
    alice, root_shell = reports
    for report, h1 in (
        (alice, "Research Norwegian law with an AI assistant"),
        (root_shell, "Finn fram i norsk lov med en KI-assistent"),
    ):
        assert report["h1"] == h1, report
        assert report["caddy_before"] == 1, report
        # Ctrl-C: the script ends as interrupted, and neither lovd nor Caddy is left.
        assert report["exit"] == 130, report
        assert report["caddy_after"] == 0 and report["lovd_after"] == 0, report
    assert "the lovd user cannot reach /root/lovd" in out and "REFUSED 2" in out, out[-3000:]
    assert "TESTS 0" in out, out[-3000:]
    if "=== installing sudo" in out:  # the fresh-machine case: the test got its own sudo
        assert "SUDO 0" in out, out[-3000:]
