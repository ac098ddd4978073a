"""packaging/lib.sh's helpers for root and the paths an unprivileged user controls, tried
directly (fast, on this host, as root) with the attacks they exist for: links and hard
links planted by the user, a path flipped between a file and a link while root works,
and directories placed below the user's own. The user is ``nobody``; every file lives in
a temporary directory that is removed afterwards.

Each attack is first shown to work against the naive way (root writing or chowning the
path itself), so an unchanged canary means the helper stopped it, not that the attack
missed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, need

LIB = ROOT / "packaging" / "lib.sh"
USER = "nobody"
SECRET = b"root:$y$j9T$canary:19000:0:99999:7:::\n"


def sh(script: str, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in bash as root with lib.sh sourced."""
    return subprocess.run(
        ["bash", "-c", f'set -u; . "{LIB}"; {script}', "lib-test", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )


def as_user(script: str, *args: str) -> None:
    subprocess.run(
        ["runuser", "-u", USER, "--", "sh", "-c", f"set -e; {script}", "as-user", *args],
        check=True,
        timeout=30,
    )


def state(path: Path) -> tuple[int, int, int, bytes | list[str]]:
    st = path.lstat()
    body: bytes | list[str] = (
        sorted(os.listdir(path)) if path.is_dir() and not path.is_symlink() else path.read_bytes()
    )
    return st.st_uid, st.st_gid, st.st_mode, body


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory only root may change, in a chain of such directories (/var/lib is one
    on every Debian host), holding root's canaries and the user's home."""
    need(os.geteuid() == 0, "these tests act as root on behalf of another user: run as root")
    need(shutil.which("runuser") is not None, "runuser is missing (util-linux)")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        need(False, f"no {USER} user here")
    d = Path(tempfile.mkdtemp(prefix="lovd-libtest-", dir="/var/lib"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def canary(base: Path) -> Path:
    """root's: a 0600 file and a 0755 directory (like /etc/shadow and /etc)."""
    (base / "etc").mkdir(mode=0o755)
    (base / "etc" / "shadow").write_bytes(SECRET)
    (base / "etc" / "shadow").chmod(0o600)
    return base / "etc"


@pytest.fixture
def home(base: Path) -> Path:
    h = base / "home"
    h.mkdir(mode=0o750)
    pw = pwd.getpwnam(USER)
    os.chown(h, pw.pw_uid, pw.pw_gid)
    return h


def test_owner_write_replaces_a_planted_link(home: Path, canary: Path) -> None:
    shadow = canary / "shadow"
    as_user('ln -s "$1" "$2"', str(shadow), str(home / "naive.conf"))
    # The attack works on the naive way: root's redirect writes through the link.
    victim = canary / "naive-victim"
    victim.write_bytes(SECRET)
    (home / "naive.conf").unlink()
    as_user('ln -s "$1" "$2"', str(victim), str(home / "naive.conf"))
    sh('echo owned > "$1"', str(home / "naive.conf"), check=True)
    assert victim.read_bytes() == b"owned\n"

    as_user('ln -s "$1" "$2"', str(shadow), str(home / "containers.conf"))
    before = state(shadow)
    r = sh(f'echo "[engine]" | owner_write {USER} 0644 "$1"', str(home / "containers.conf"))
    assert r.returncode == 0, r.stderr
    assert state(shadow) == before
    conf = home / "containers.conf"
    assert not conf.is_symlink() and conf.read_text() == "[engine]\n"
    assert conf.stat().st_uid == pwd.getpwnam(USER).pw_uid
    assert oct(conf.stat().st_mode & 0o777) == "0o644"


def test_owner_write_through_a_linked_directory_fails(home: Path, canary: Path) -> None:
    as_user('ln -s "$1" "$2"', str(canary), str(home / "cfg"))
    before = state(canary)
    r = sh(f'echo x | owner_write {USER} 0644 "$1"', str(home / "cfg" / "containers.conf"))
    assert r.returncode != 0
    assert state(canary) == before
    assert state(canary / "shadow")[3] == SECRET


def test_owner_write_replaces_a_hard_link(home: Path, canary: Path) -> None:
    """Where fs.protected_hardlinks=0 the user may hard-link root's file into its home."""
    shadow = canary / "shadow"
    os.link(shadow, home / "storage.conf")  # root makes it, standing in for that host
    before = state(shadow)
    r = sh(f'echo "[storage]" | owner_write {USER} 0644 "$1"', str(home / "storage.conf"))
    assert r.returncode == 0, r.stderr
    assert state(shadow) == before
    assert shadow.stat().st_nlink == 1  # the user's name for it was replaced, not written


FLIP = 'while :; do ln -sfn "$1" "$2.l" && mv -fT "$2.l" "$2"; rm -f "$2"; : > "$2"; done'


def test_owner_write_wins_a_race(home: Path, canary: Path) -> None:
    """The user flips the path between a file and a link to root's file as fast as it
    can while root writes it again and again: no check-then-act window to hit."""
    shadow = canary / "shadow"
    before = state(shadow)
    target = home / "containers.conf"
    flipper = subprocess.Popen(
        [
            "runuser",
            "-u",
            USER,
            "--",
            "sh",
            "-c",
            FLIP,
            "flip",
            str(shadow),
            str(target),
        ]
    )
    try:
        deadline = time.monotonic() + 4
        writes = 0
        while time.monotonic() < deadline:
            sh(f'echo "[engine]" | owner_write {USER} 0644 "$1"', str(target))
            writes += 1
    finally:
        flipper.kill()
        flipper.wait()
    assert writes > 10
    assert state(shadow) == before


def test_owner_mkdir_refuses_linked_directories(home: Path, canary: Path) -> None:
    # The attack works on the naive way: install -d chowns and chmods the link's target.
    naive = canary.parent / "naive-dir"
    naive.mkdir(mode=0o755)
    as_user('ln -s "$1" "$2"', str(naive), str(home / "naive"))
    sh(f'install -d -o {USER} -m 0700 "$1"', str(home / "naive"), check=True)
    assert naive.stat().st_uid != 0

    as_user('ln -s "$1" "$2"', str(canary), str(home / ".config"))
    before = state(canary)
    r = sh(f'owner_mkdir {USER} 0700 "$1" "$1/containers"', str(home / ".config"))
    assert r.returncode != 0 and "is a symbolic link" in r.stderr, r.stderr
    assert state(canary) == before
    # A link further up: the user's own mkdir and chmod cannot touch root's directory.
    (home / ".config").unlink()
    as_user('mkdir "$1"; ln -s "$2" "$1/containers"', str(home / ".config"), str(canary))
    r = sh(f'owner_mkdir {USER} 0700 "$1/sub"', str(home / ".config" / "containers"))
    assert r.returncode != 0
    assert state(canary) == before


def test_owned_dir_creates_and_fixes_a_directory(base: Path) -> None:
    r = sh(f'owned_dir {USER} nogroup 0750 "$1"', str(base / "state"))
    assert r.returncode == 0, r.stderr
    st = (base / "state").stat()
    assert (st.st_uid, oct(st.st_mode & 0o7777)) == (pwd.getpwnam(USER).pw_uid, "0o750")
    (base / "state").chmod(0o777)
    assert sh(f'owned_dir {USER} nogroup 0750 "$1"', str(base / "state")).returncode == 0
    assert oct((base / "state").stat().st_mode & 0o7777) == "0o750"


def test_owned_dir_refuses_a_directory_below_the_users(home: Path, canary: Path) -> None:
    """The user owns home/, so it decides what home/x is: a link to root's directory."""
    as_user('ln -s "$1" "$2"', str(canary), str(home / "x"))
    before = state(canary)
    for path in (home / "x", home / "x" / "y"):
        r = sh(f'owned_dir {USER} nogroup 0750 "$1"', str(path))
        assert r.returncode != 0 and f"refusing: {home} (above {path})" in r.stderr, r.stderr
    assert state(canary) == before
    assert sorted(os.listdir(canary.parent)) == ["etc", "home"]


def test_owned_dir_follows_only_links_root_made(base: Path, home: Path) -> None:
    (base / "real").mkdir(mode=0o755)
    (base / "alias").symlink_to("real")  # root's link in root's directory: followed
    r = sh('root_only_parents "$1"', str(base / "alias" / "state"))
    assert r.returncode == 0 and r.stdout.strip() == str(base / "real" / "state"), r.stderr
    # root's link that leads into the user's directory: refused there.
    (base / "tohome").symlink_to("home")
    r = sh('root_only_parents "$1"', str(base / "tohome" / "state"))
    assert r.returncode != 0 and f"refusing: {home} (above" in r.stderr, r.stderr
    (base / "loop").symlink_to("loop")
    assert "too many links" in sh('root_only_parents "$1"', str(base / "loop" / "x")).stderr


def test_owned_dir_refuses_world_writable_parents(base: Path) -> None:
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone may create the name first
    r = sh(f'owned_dir {USER} nogroup 0750 "$1"', str(shared / "state"))
    assert r.returncode != 0 and "mode 1777" in r.stderr, r.stderr
    assert not (shared / "state").exists()
    for bad in ("relative/dir", f"{base}/..", f"{base}/."):
        assert sh(f'owned_dir {USER} nogroup 0750 "$1"', bad).returncode != 0, bad
