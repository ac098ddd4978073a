"""Floors: free disk under state_dir below floors.disk_free refuses new sessions (503 with
the reason and Retry-After) while running ones keep answering; once space is freed,
creates succeed again without a restart.

The floor is set just under what is free now, and the test consumes the difference with
a file in the state dir (128 MiB; the margin is 64 MiB). A small filesystem of its own
(tmpfs) cannot be used here: rootless Podman keeps one mount namespace for its whole
life, created before any test, and would not see a mount made later."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_podman_daemon import http_get
from tests.lovdproc import LovdProc, containers, podman

pytestmark = pytest.mark.podman

MIB = 1024 * 1024


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_full_disk_refuses_new_sessions_and_recovers(test_image: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    floor = free(state) - 64 * MIB
    p = LovdProc(
        tmp_path, limits={"max_running": 4}, floors={"disk_free": str(floor), "memory_free": "0"}
    )
    p.start()
    iid = p.instance_id()
    filler = state / "filler"
    try:
        status, _, a = p.api("POST", "/api/sessions")
        assert status == 201 and a["status"] == "running", a
        _, _, health = p.api("GET", "/api/health")
        assert health["checks"]["floors"]["ok"] is True, health["checks"]["floors"]
        with filler.open("wb") as f:  # the disk "fills up": 128 MiB, twice the margin
            for _ in range(128):
                f.write(b"\0" * MIB)
            f.flush()
            os.fsync(f.fileno())
        status, headers, body = p.api("POST", "/api/sessions")
        assert status == 503 and body["code"] == "unavailable", body
        assert "floors.disk_free" in body["detail"] and "free some space" in body["detail"]
        assert int(headers["Retry-After"]) > 0
        assert "lovd test session" in http_get(a["port"], a["id"])  # A still answers
        _, _, health = p.api("GET", "/api/health")
        assert health["checks"]["floors"]["ok"] is False
        filler.unlink()  # space freed: no restart needed
        status, _, b = p.api("POST", "/api/sessions")
        assert status == 201 and b["status"] == "running", b
    finally:
        filler.unlink(missing_ok=True)
        p.stop()
        for name in containers(f"lovd.instance={iid}"):
            podman("rm", "-f", "-t", "0", name, check=False)
        subprocess.run(["podman", "unshare", "rm", "-rf", str(state)], check=False)
