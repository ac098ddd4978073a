"""Static checks of units/: systemd-analyze verify is clean for every unit, and the
daemon's hardening keeps `systemd-analyze security` exposure at or below 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import need
from tests.e2e.machine import REPO

UNITS = REPO / "units"
pytestmark = pytest.mark.systemd


@pytest.fixture(scope="module")
def analyze() -> str:
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    return "systemd-analyze"


def test_security_exposure_at_most_2(analyze: str) -> None:
    r = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNITS / "lovd.service")],
        capture_output=True,
        text=True,
        check=False,
    )
    m = re.search(r"Overall exposure level for lovd\.service: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout


UNIT_FILES = ("lovd.socket", "lovd-auth.socket", "lovd-broker.socket", "lovd.service")


@pytest.mark.parametrize("unit", UNIT_FILES)
def test_verify_clean(analyze: str, unit: str, tmp_path: Path) -> None:
    # Verify them together (the service names every socket in Sockets=), from a copy so
    # the installed units of this host cannot interfere.
    for u in UNIT_FILES:
        shutil.copy(UNITS / u, tmp_path / u)
    r = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr


def test_verify_user_manager_dropin(analyze: str, tmp_path: Path) -> None:
    # A drop-in is verified as part of a unit: user@.service with it applied.
    d = tmp_path / "user@.service.d"
    d.mkdir()
    shutil.copy(UNITS / "user@.service.d" / "delegate.conf", d / "delegate.conf")
    stock = Path("/usr/lib/systemd/system/user@.service")
    if not stock.exists():
        stock = Path("/lib/systemd/system/user@.service")
    need(stock.exists(), "user@.service is not installed (systemd)")
    shutil.copy(stock, tmp_path / "user@.service")
    # user@.service's instance lives in user-UID.slice; give verify a complete unit path.
    env = {"SYSTEMD_UNIT_PATH": f"{tmp_path}:", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    r = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / "user@1000.service")],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    text = (d / "delegate.conf").read_text()
    assert "Delegate=cpu cpuset io memory pids" in text


def test_sysusers_and_tmpfiles_parse(tmp_path: Path) -> None:
    need(shutil.which("systemd-sysusers") is not None, "systemd-sysusers is not installed")
    # --root with an empty etc: shows what would be created, touches nothing here.
    (tmp_path / "etc").mkdir()
    r = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", "--dry-run", str(UNITS / "lovd.sysusers")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    for name in ("lovd", "lovd-api", "lovd-web"):
        assert name in r.stderr + r.stdout, (name, r.stderr + r.stdout)
    r = subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(UNITS / "lovd.tmpfiles")],
        capture_output=True,
        text=True,
        check=False,
    )
    # Unknown users under an empty --root are the only acceptable complaint.
    bad = [ln for ln in r.stderr.splitlines() if ln and "Failed to resolve" not in ln]
    assert not bad, r.stderr
