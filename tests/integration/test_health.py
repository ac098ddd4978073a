"""Health and recovery against real rootless Podman: a hung server (SIGSTOP) is noticed
by the probes and restarted under the same session; a removed container leaves a
session that still exists after many cleanup passes and wakes with its workspace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lovd.caddy import UPSTREAM_HEADER
from tests.integration.test_podman_daemon import http_get
from tests.lovdproc import LovdProc, cookie_of, forward_auth, podman, remove_all
from tests.waiting import until_sync

pytestmark = pytest.mark.podman

INTERVAL, FAILURES = 1.0, 2


@pytest.fixture
def lovd(tmp_path: Path, test_image: str) -> Iterator[LovdProc]:
    p = LovdProc(
        tmp_path,
        limits={"max_running": 4},
        health={"interval": INTERVAL, "failures": FAILURES, "probe_timeout": 0.5},
    )
    yield p.start()
    remove_all(p)


def test_a_hung_server_is_restarted_as_the_same_session(lovd: LovdProc) -> None:
    _, _, s = lovd.api("POST", "/api/sessions")
    sid, port = s["id"], s["port"]
    first = podman("inspect", "--format", "{{.Id}}", f"lovd-{sid}").strip()
    # Stop every process of the session but its init: the server hangs, the container
    # still runs (what Podman reports does not change).
    podman("exec", f"lovd-{sid}", "/bin/busybox", "kill", "-STOP", "-1")
    took = until_sync(
        lambda: (
            lovd.api("GET", f"/api/sessions/{sid}")[2]["restarts"] == 1
            and lovd.api("GET", f"/api/sessions/{sid}")[2]["status"] == "running"
        ),
        INTERVAL * FAILURES + 15,
    )
    _, _, after = lovd.api("GET", f"/api/sessions/{sid}")
    assert (after["id"], after["port"]) == (sid, port)
    assert after["container_id"] != first  # a new container, the same session
    assert "lovd test session" in http_get(port, sid)  # it answers again
    _, _, health = lovd.api("GET", f"/api/sessions/{sid}/health")
    details = [h["detail"] for h in health["history"]]
    assert sum(d.startswith("probe failed") for d in details) >= FAILURES, details
    assert any(d.startswith("restart 1:") for d in details), details
    print(
        f"hung server noticed and restarted in {took:.1f} s "
        f"(health.interval {INTERVAL:g} s x health.failures {FAILURES})"
    )


def test_a_removed_container_leaves_a_session_that_wakes(lovd: LovdProc, tmp_path: Path) -> None:
    _, _, s = lovd.api("POST", "/api/sessions")
    sid, port = s["id"], s["port"]
    podman("exec", f"lovd-{sid}", "sh", "-c", "echo kept > /work/note.txt")
    podman("rm", "-f", "-t", "0", f"lovd-{sid}")  # what an OOM kill or a reboot does
    until_sync(lambda: lovd.api("GET", f"/api/sessions/{sid}")[2]["status"] != "running", 15)
    _, _, gone = lovd.api("GET", f"/api/sessions/{sid}")
    assert gone["status"] in ("stopped", "failed") and gone["reason"], gone
    for _ in range(5):
        status, _, body = lovd.api("POST", "/api/cleanup")
        assert status == 200 and sid not in body["removed"]
    assert lovd.api("GET", f"/api/sessions/{sid}")[0] == 200
    # The user comes back: the next request of their browser (Caddy's forward_auth
    # subrequest on lovd's public socket) is held while the session wakes, then allowed.
    status, headers, _ = forward_auth(lovd, sid, cookie_of(lovd, s))
    assert status == 204 and headers[UPSTREAM_HEADER] == f"127.0.0.1:{port}", (status, headers)
    _, _, woken = lovd.api("GET", f"/api/sessions/{sid}")
    assert woken["status"] == "running" and woken["id"] == sid
    assert "lovd test session" in http_get(port, sid)
    out = podman("exec", f"lovd-{sid}", "cat", "/work/note.txt")
    assert out.strip() == "kept"  # the workspace came back with it


def test_session_show_prints_the_probe_history(lovd: LovdProc) -> None:
    _, _, s = lovd.api("POST", "/api/sessions")
    until_sync(lambda: lovd.api("GET", f"/api/sessions/{s['id']}/health")[2]["history"], 10)
    out = lovd.cli("session", "show", s["id"])
    assert out.returncode == 0, out.stderr
    assert "0 failed probes in a row, 0/3 restarts in 600 s" in out.stdout
    assert "probes:" in out.stdout and " ok   HTTP 200" in out.stdout, out.stdout
