"""packaging/install.sh in a booted machine: it created the user, ids, linger, Podman
config and image, installed and enabled the units; a second run changes nothing that
matters; the API socket admits root, lovd and lovd-api members only."""

from __future__ import annotations

import pytest

from tests.e2e.machine import REPO, SOCK, Machine

pytestmark = pytest.mark.systemd


def test_install_created_everything(machine: Machine, install_seconds: float) -> None:
    m = machine
    assert install_seconds < 300
    uid = m.uid
    assert m.out("getent", "passwd", "lovd").split(":")[5] == "/var/lib/lovd"
    assert "lovd-api" in m.out("getent", "group", "lovd-api")
    for f in ("/etc/subuid", "/etc/subgid"):
        line = next(ln for ln in m.out("cat", f).splitlines() if ln.startswith("lovd:"))
        assert int(line.split(":")[2]) >= 65536 * 16, line
    assert m.out("loginctl", "show-user", "lovd", "-p", "Linger", "--value") == "yes"
    assert m.out("systemctl", "is-active", f"user@{uid}.service") == "active"
    assert m.out("systemctl", "is-enabled", "lovd.socket") == "enabled"
    assert m.out("systemctl", "is-active", "lovd.socket") == "active"
    assert m.systemctl_user("is-active", "podman.socket").stdout.strip() == "active"
    info = m.podman("info", "--format", "{{.Store.GraphDriverName}} {{.Host.OCIRuntime.Name}}")
    assert info.stdout.split()[0] == "overlay"
    assert m.podman("image", "exists", "localhost/lovd-test:latest", check=False).returncode == 0
    dropin = m.out("cat", "/etc/systemd/system/lovd.service.d/10-user-manager.conf")
    assert f"BindPaths=/run/user/{uid}" in dropin
    assert (
        m.run("test", "-f", "/etc/systemd/system/user@.service.d/lovd-delegate.conf").returncode
        == 0
    )
    # The state dir belongs to lovd and is closed to others.
    assert m.out("stat", "-c", "%U:%G %a", "/var/lib/lovd") == "lovd:lovd 750"


def test_install_is_idempotent(machine: Machine) -> None:
    m = machine
    conf = m.out("cat", "/etc/lovd/lovd.conf")
    subuid = m.out("cat", "/etc/subuid")
    m.run("env", "LOVD_SKIP_APT=1", "LOVD_IMAGE=test", "bash", str(REPO / "packaging/install.sh"))
    assert m.out("cat", "/etc/lovd/lovd.conf") == conf  # an operator's config is kept
    assert m.out("cat", "/etc/subuid") == subuid  # no second range
    assert m.out("systemctl", "is-active", "lovd.socket") == "active"


def test_socket_permissions(machine: Machine) -> None:
    m = machine
    assert m.out("stat", "-c", "%F %U:%G %a", SOCK) == "socket lovd:lovd-api 660"


CONNECT = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_UNIX)\n"
    "try:\n s.connect(sys.argv[1]); print('connected')\n"
    "except OSError as e:\n print(e.errno)\n"
)


def test_outsider_gets_eacces_member_connects(machine: Machine) -> None:
    m = machine
    m.sh("id outsider >/dev/null 2>&1 || useradd -M -s /usr/sbin/nologin outsider")
    m.sh("id insider >/dev/null 2>&1 || useradd -M -s /usr/sbin/nologin -G lovd-api insider")
    assert (
        m.out("runuser", "-u", "outsider", "--", "python3", "-c", CONNECT, SOCK) == "13"
    )  # EACCES
    assert m.out("runuser", "-u", "insider", "--", "python3", "-c", CONNECT, SOCK) == "connected"
    assert m.out("runuser", "-u", "lovd", "--", "python3", "-c", CONNECT, SOCK) == "connected"
