"""A throwaway PostgreSQL cluster owned by the tests.

``initdb`` into a fresh temp dir, the server listening only on a unix socket in that
dir (no TCP, no dependency on the machine's own clusters), stopped and removed at the
end. Tests stop and start it to simulate an outage. Runs as the invoking (non-root)
user; the binaries come from ``$LOVD_PG_BINDIR`` or Debian's
``/usr/lib/postgresql/<newest>/bin``.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need

_PREFIX = "lovd-pg-"


def bindir() -> Path | None:
    env = os.environ.get("LOVD_PG_BINDIR")
    if env:
        return Path(env)
    base = Path("/usr/lib/postgresql")
    found = sorted(
        (p for p in base.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


class PgCluster:
    """One cluster: ``dsn`` for libpq, ``stop()``/``start()`` for outages."""

    def __init__(self, bin_dir: Path, fsync: bool = False) -> None:
        self.bin = bin_dir
        # Short path: a unix socket path must fit in 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix=_PREFIX, dir="/tmp"))
        self.data = self.dir / "data"
        self.port = 5432
        self.user = getpass.getuser()
        self.log = self.dir / "server.log"
        self.fsync = fsync

    @property
    def dsn(self) -> str:
        return f"host={self.dir} port={self.port} dbname=postgres user={self.user}"

    def _run(self, *argv: str) -> None:
        r = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {r.stdout[-500:]} {r.stderr[-1500:]}")

    def init(self) -> PgCluster:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
        )
        return self

    def start(self) -> None:
        opts = (
            f"-k {self.dir} -c listen_addresses='' -p {self.port} "
            f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=50"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self) -> None:
        # immediate: an outage, not a polite shutdown (in-flight transactions abort).
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def _pids(self) -> list[int]:
        """The postmaster and its children (backends, walwriter, …): this cluster's only."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        kids: list[int] = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(k) for k in (task / "children").read_text().split()]
        return [pid, *kids]

    def freeze(self) -> None:
        """A hung server (SIGSTOP): connections open, nothing answers."""
        self._frozen = self._pids()
        for p in self._frozen:
            os.kill(p, signal.SIGSTOP)

    def thaw(self) -> None:
        for p in getattr(self, "_frozen", []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
        self._frozen = []

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def psql(self, sql: str) -> str:
        r = subprocess.run(
            [
                str(self.bin / "psql"),
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.dir),
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                "postgres",
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if r.returncode != 0:
            raise RuntimeError(f"psql: {r.stderr}")
        return r.stdout.strip()

    def destroy(self) -> None:
        self.thaw()
        if self.running():
            with contextlib.suppress(RuntimeError):
                self.stop()
        # Only the directory this object created (never a path from elsewhere).
        assert self.dir.name.startswith(_PREFIX) and self.dir.parent == Path("/tmp"), self.dir
        shutil.rmtree(self.dir, ignore_errors=True)


def pg_usable() -> tuple[Path | None, str]:
    if os.geteuid() == 0:
        return None, "PostgreSQL refuses to run as root; run the tests as the lovd user"
    b = bindir()
    if b is None:
        return None, "PostgreSQL server binaries missing: apt-get install postgresql"
    return b, ""


@contextlib.contextmanager
def cluster(fsync: bool = False) -> Iterator[PgCluster]:
    b, reason = pg_usable()
    need(b is not None, reason)
    assert b is not None
    pg = PgCluster(b, fsync=fsync).init()
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()


@pytest.fixture
def pg() -> Iterator[PgCluster]:
    """A fresh cluster per test (initdb ~1 s): tests stop and start it freely."""
    with cluster() as c:
        yield c
