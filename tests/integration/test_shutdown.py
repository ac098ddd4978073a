"""A bounded shutdown: SIGTERM while sessions are starting, lovd exits within seconds,
leaves the containers running, and the next lovd adopts them (real Podman, the real
OpenCode image, whose start takes seconds)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import image_present, need
from tests.lovdproc import LovdProc, containers

pytestmark = pytest.mark.podman

SESSION_IMAGE = "localhost/lovd-session:latest"


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stopped_during_starts_the_next_lovd_adopts_or_resumes(
    podman: str, tmp_path: Path, how: str
) -> None:
    need(image_present(SESSION_IMAGE), f"{SESSION_IMAGE} missing: run 'lovd image build'")
    p = LovdProc(
        tmp_path, image=SESSION_IMAGE, demo="on", demo_mcp_port=0, demo_llm_port=0, ready_timeout=90
    )
    p.start()
    iid = p.instance_id()
    try:
        made = []
        for _ in range(3):
            status, _, s = p.api("POST", "/api/sessions", {"wait": False})
            assert status == 201, s
            made.append(s["id"])
        time.sleep(0.5)  # podman run under way; OpenCode not ready yet
        starting = [p.api("GET", f"/api/sessions/{sid}")[2]["status"] for sid in made]
        assert "starting" in starting or "creating" in starting, starting
        assert p.proc is not None
        t0 = time.monotonic()
        p.proc.send_signal(getattr(signal, how))
        p.proc.wait(10)
        took = time.monotonic() - t0
        print(f"lovd exited {took:.2f} s after {how} with 3 starts in flight")
        assert took < 5.0
        # Nothing was stopped on the way out: whatever podman had started still runs. A
        # SIGTERM lets a `podman run` under way finish; after a SIGKILL lovd's death
        # signal asks it to stop at a safe point, which may leave a container created but
        # not started (the resume replaces it), so only running ones count there.
        before = containers(f"lovd.instance={iid}")
        if how == "SIGKILL":
            running = podman_running(iid)
            print(f"{len(before) - len(running)} podman run(s) cut by lovd's death signal")
            before = {name: cid for name, cid in before.items() if name in running}

        p.start()  # the next lovd: adopts live containers, restarts unfinished starts
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            rows = [p.api("GET", f"/api/sessions/{sid}")[2] for sid in made]
            if all(r["status"] == "running" for r in rows):
                break
            time.sleep(0.5)
        assert [r["status"] for r in rows] == ["running"] * 3, rows
        after = containers(f"lovd.instance={iid}")
        assert len(after) == 3
        for name, cid in before.items():
            if name in after:
                assert after[name] == cid  # adopted, not restarted
        print(f"{len(before)} containers adopted, {3 - len(before)} starts resumed")
    finally:
        p.stop()
        for name in containers(f"lovd.instance={iid}"):
            podman_rm(name)
        subprocess.run(["podman", "unshare", "rm", "-rf", str(tmp_path / "state")], check=False)


def podman_running(iid: str) -> set[str]:
    out = subprocess.run(
        ["podman", "ps", "--filter", f"label=lovd.instance={iid}", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def podman_rm(name: str) -> None:
    subprocess.run(["podman", "rm", "-f", "-t", "0", name], check=False, capture_output=True)
