"""install.sh --uninstall removes lovd but keeps data; --purge removes the rest -- and
only that: links lovd planted in its home are removed, never followed."""

from __future__ import annotations

import pytest

from tests.e2e import canary as cn
from tests.e2e.machine import REPO, Machine

pytestmark = pytest.mark.systemd


def test_uninstall_then_purge(machine: Machine) -> None:
    m = machine
    if m.leader is None:
        pytest.skip("not uninstalling lovd from the real host this suite runs on")
    script = str(REPO / "packaging" / "install.sh")
    m.run("bash", script, "--uninstall")
    for path in (
        "/etc/systemd/system/lovd.socket",
        "/etc/systemd/system/lovd-auth.socket",
        "/etc/systemd/system/lovd-broker.socket",
        "/etc/systemd/system/lovd.service",
        "/etc/systemd/system/lovd.service.d",
        "/opt/lovd/venv",
        "/run/lovd/api.sock",
        "/run/lovd/auth.sock",
    ):
        assert m.run("test", "-e", path, check=False).returncode != 0, path
    for unit in ("lovd.socket", "lovd-auth.socket", "lovd-broker.socket"):
        assert m.run("systemctl", "is-active", unit, check=False).stdout.strip() != "active", unit
    # Nothing listens on the broker's port any more (curl: connection refused).
    r = m.run("curl", "-s", "--max-time", "10", "http://127.0.0.1:18780/", check=False)
    assert r.returncode == 7, (r.returncode, r.stdout)
    # Kept: data, config, the user.
    assert m.run("test", "-f", "/var/lib/lovd/lovd.db").returncode == 0
    assert m.run("test", "-f", "/etc/lovd/lovd.conf").returncode == 0
    assert m.run("id", "lovd", check=False).returncode == 0
    # Root empties lovd's home on --purge: lovd plants links to root's files and
    # directories there, and a directory of its own that leads out again.
    c = cn.make(m)
    try:
        before = cn.snapshot(m, c)
        m.run(
            "sh",
            "-c",
            f'ln -s "{c.secret}" escape-file && ln -s "{c.dir}" escape-dir'
            f' && ln -s "{c.root}" escape-root && mkdir -p deep/er && ln -s "{c.dir}" deep/er/up',
            user="lovd",
        )
        m.run("bash", script, "--uninstall", "--purge")
        assert cn.snapshot(m, c) == before
    finally:
        cn.remove(m, c)
    assert m.run("id", "lovd", check=False).returncode != 0
    for group in ("lovd-api", "lovd-web"):
        assert m.run("getent", "group", group, check=False).returncode != 0, group
    assert m.run("test", "-e", "/etc/lovd", check=False).returncode != 0
    assert "lovd:" not in m.out("cat", "/etc/subuid")
