"""Root-run packaging never follows a path the lovd user controls (ARCHITECTURE.md,
"Trust boundary"). Each test plants, as the user, the links an attacker would -- at the
files and directories packaging/install.sh, packaging/setup-host.sh and lovd's
tmpfiles.d write below the user's home -- pointing at root-owned canaries, runs the real
script (or systemd-tmpfiles) as root in the booted machine, and checks that every canary
kept its content, owner and mode.

install.sh is tried on the machine's installed lovd user (every planted link is removed
again, whatever happens); setup-host.sh on a throw-away user with its own home, so the
lovd installation the later tests use keeps its configuration.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.e2e import canary as cn
from tests.e2e.machine import REPO, Machine

pytestmark = pytest.mark.systemd

HOME = "/var/lib/lovd"
INSTALL = str(REPO / "packaging" / "install.sh")
SETUP = str(REPO / "packaging" / "setup-host.sh")
TRAP_USER = "lovdtrap"
TRAP_HOME = "/var/lib/lovd-trap"
# setup-host.sh without what cannot or need not run in the machine: apt, pip (no network,
# read-only checkout) and image builds (nothing root-run there; they run as the user).
TRAP_ENV = (
    f"LOVD_USER={TRAP_USER}",
    f"LOVD_HOME={TRAP_HOME}",
    "LOVD_SUBID_START=3000000000",
    "LOVD_SUBID_COUNT=65536",
    "LOVD_SKIP_APT=1",
    "LOVD_SKIP_VENV=1",
    "LOVD_SKIP_IMAGES=1",
)


@pytest.fixture
def m(machine: Machine) -> Machine:
    if machine.leader is None:
        pytest.skip("not planting links in the home of this host's real lovd user")
    return machine


@pytest.fixture
def canary(m: Machine) -> Iterator[cn.Canary]:
    c = cn.make(m)
    yield c
    cn.remove(m, c)


def install(m: Machine, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = m.run(
        "env", "LOVD_SKIP_APT=1", "LOVD_IMAGE=test", "bash", INSTALL, timeout=600, check=False
    )
    if check and r.returncode != 0:
        # install.sh (re)starts lovd: its own words say why that failed.
        journal = m.out("journalctl", "-u", "lovd.service", "-n", "30", "--no-pager", "-o", "cat")
        raise AssertionError(f"install.sh exited {r.returncode}:\n{r.stderr[-2000:]}\n{journal}")
    return r


def as_user(m: Machine, user: str, script: str) -> None:
    m.run("sh", "-c", f"set -e\n{script}", user=user)


def replace_with_link(m: Machine, user: str, path: str, target: str) -> None:
    """As ``user``: move ``path`` aside (if there) and put a link to ``target`` there."""
    as_user(
        m, user, f'[ ! -e "{path}" ] || mv -T "{path}" "{path}.saved"\nln -sfn "{target}" "{path}"'
    )


def restore(m: Machine, user: str, path: str) -> None:
    as_user(
        m,
        user,
        f'[ ! -L "{path}" ] || rm -f "{path}"\n'
        f'[ ! -e "{path}.saved" ] || mv -T "{path}.saved" "{path}"',
    )


def regular_file_of(m: Machine, path: str) -> str:
    return m.out("stat", "-c", "%F %U %a", path)


# ------------------------------------------------------------------ install.sh


def test_install_replaces_planted_config_links(m: Machine, canary: cn.Canary) -> None:
    """containers.conf -> root's secret file, storage.conf -> root's public one."""
    before = cn.snapshot(m, canary)
    cfg = f"{HOME}/.config/containers"
    planted = {
        f"{cfg}/containers.conf": canary.secret,
        f"{cfg}/storage.conf": canary.public,
    }
    try:
        for path, target in planted.items():
            replace_with_link(m, "lovd", path, target)
        install(m)
        assert cn.snapshot(m, canary) == before
        # The links were replaced by lovd's own files, not written through.
        for name in ("containers.conf", "storage.conf"):
            assert regular_file_of(m, f"{cfg}/{name}") == "regular file lovd 644"
            assert "Written by lovd's packaging scripts" in m.out("cat", f"{cfg}/{name}")
    finally:
        for path in planted:
            restore(m, "lovd", path)


def test_tmpfiles_leave_a_planted_sessions_link_alone(m: Machine, canary: cn.Canary) -> None:
    """sessions/ -> a root directory, then what root runs on every boot and install:
    systemd-tmpfiles with lovd's tmpfiles.d. (Not install.sh as a whole: lovd itself then
    refuses to start on a sessions/ it cannot create.)"""
    before = cn.snapshot(m, canary)
    sessions = f"{HOME}/sessions"
    try:
        replace_with_link(m, "lovd", sessions, canary.dir)
        m.run("systemd-tmpfiles", "--create", "/etc/tmpfiles.d/lovd.conf")
        assert cn.snapshot(m, canary) == before
        # Nothing below lovd's home is root's to manage: the link is as lovd left it.
        assert m.out("readlink", sessions) == canary.dir
    finally:
        restore(m, "lovd", sessions)
    assert m.out("stat", "-c", "%F %U", sessions) == "directory lovd"


@pytest.mark.parametrize("linked", [".config", ".config/containers"])
def test_install_refuses_linked_config_dir(m: Machine, canary: cn.Canary, linked: str) -> None:
    """A config directory that is a link into root's tree: refused, nothing chowned."""
    before = cn.snapshot(m, canary)
    path = f"{HOME}/{linked}"
    try:
        replace_with_link(m, "lovd", path, canary.dir)
        r = install(m, check=False)
        assert r.returncode != 0, r.stderr[-2000:]
        assert f"refusing: {path} is a symbolic link" in r.stderr, r.stderr[-2000:]
        assert cn.snapshot(m, canary) == before
    finally:
        restore(m, "lovd", path)
    assert m.out("stat", "-c", "%F %U", f"{HOME}/.config/containers") == "directory lovd"


# ------------------------------------------------------------------ setup-host.sh


def setup_host(m: Machine, *env: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return m.run("env", *TRAP_ENV, *env, "bash", SETUP, timeout=300, check=check)


@pytest.fixture
def trap_user(m: Machine) -> Iterator[str]:
    """A user set up by setup-host.sh with its own home; removed afterwards."""
    setup_host(m)
    uid = m.out("id", "-u", TRAP_USER)
    yield TRAP_USER
    m.run("loginctl", "disable-linger", TRAP_USER, check=False)
    m.run("systemctl", "stop", f"user@{uid}.service", check=False)
    m.run("userdel", TRAP_USER, check=False)
    m.run("sed", "-i", f"/^{TRAP_USER}:/d", "/etc/subuid", "/etc/subgid", check=False)
    # Inside the machine's throw-away overlay; a fixed name, never built from output.
    assert TRAP_HOME == "/var/lib/lovd-trap"
    m.run("rm", "-rf", "--one-file-system", "--", TRAP_HOME, check=False)


def test_setup_host_replaces_planted_config_links(
    m: Machine, canary: cn.Canary, trap_user: str
) -> None:
    cfg = f"{TRAP_HOME}/.config/containers"
    assert m.out("stat", "-c", "%U %a", TRAP_HOME) == f"{trap_user} 750"
    before = cn.snapshot(m, canary)
    replace_with_link(m, trap_user, f"{cfg}/containers.conf", canary.secret)
    replace_with_link(m, trap_user, f"{cfg}/storage.conf", canary.public)
    setup_host(m)
    assert cn.snapshot(m, canary) == before
    for name in ("containers.conf", "storage.conf"):
        assert regular_file_of(m, f"{cfg}/{name}") == f"regular file {trap_user} 644"
        assert "Written by lovd's packaging scripts" in m.out("cat", f"{cfg}/{name}")


def test_setup_host_refuses_linked_config_dir(
    m: Machine, canary: cn.Canary, trap_user: str
) -> None:
    before = cn.snapshot(m, canary)
    replace_with_link(m, trap_user, f"{TRAP_HOME}/.config", canary.dir)
    r = setup_host(m, check=False)
    assert r.returncode != 0
    assert f"refusing: {TRAP_HOME}/.config is a symbolic link" in r.stderr, r.stderr[-2000:]
    assert cn.snapshot(m, canary) == before


def test_setup_host_refuses_home_below_a_user_directory(
    m: Machine, canary: cn.Canary, trap_user: str
) -> None:
    """LOVD_HOME whose parent another user owns: that user could swap it for a link, and
    root would then create, chown and chmod whatever it points at."""
    before = cn.snapshot(m, canary)
    nested = f"{TRAP_HOME}/nested"
    as_user(m, trap_user, f'ln -s "{canary.dir}" "{nested}"')
    r = setup_host(m, "LOVD_USER=lovdtrap2", f"LOVD_HOME={nested}", check=False)
    assert r.returncode != 0
    assert f"refusing: {TRAP_HOME} (above {nested})" in r.stderr, r.stderr[-2000:]
    assert cn.snapshot(m, canary) == before
    # Refused before anything was created.
    assert m.run("id", "lovdtrap2", check=False).returncode != 0
