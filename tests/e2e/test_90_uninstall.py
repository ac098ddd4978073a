"""install.sh --uninstall removes lovd but keeps data; --purge removes the rest."""

from __future__ import annotations

import pytest

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
        "/etc/systemd/system/lovd.service",
        "/etc/systemd/system/lovd.service.d",
        "/opt/lovd/venv",
        "/run/lovd/api.sock",
    ):
        assert m.run("test", "-e", path, check=False).returncode != 0, path
    assert m.run("systemctl", "is-active", "lovd.socket", check=False).stdout.strip() != "active"
    # Kept: data, config, the user.
    assert m.run("test", "-f", "/var/lib/lovd/lovd.db").returncode == 0
    assert m.run("test", "-f", "/etc/lovd/lovd.conf").returncode == 0
    assert m.run("id", "lovd", check=False).returncode == 0
    m.run("bash", script, "--uninstall", "--purge")
    assert m.run("id", "lovd", check=False).returncode != 0
    assert m.run("test", "-e", "/etc/lovd", check=False).returncode != 0
    assert "lovd:" not in m.out("cat", "/etc/subuid")
