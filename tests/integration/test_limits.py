"""Session limits against the real host and real rootless Podman (lovd/limits.py).

- With limits.enforce: true (the default) on a host that cannot enforce memory/CPU for
  the lovd user (cgroup v1/hybrid, or nothing delegated: this kind of machine), a new
  session is a 503 naming the missing controller, and no container starts. Where the
  host can, the container carries the limits (podman inspect).
- The process limit holds everywhere: a fork loop inside a session stops at
  limits.tasks (RLIMIT_NPROC under --userns=auto).
- A session whose container was stopped cleanly (`podman stop`: exit 143) is recorded as
  stopped, not failed.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lovd import limits
from tests.lovdproc import LovdProc, containers, podman, remove_all

pytestmark = pytest.mark.podman


@pytest.fixture
def made(tmp_path: Path) -> Iterator[list[LovdProc]]:
    procs: list[LovdProc] = []
    yield procs
    for p in procs:
        remove_all(p)


def test_a_session_is_refused_where_its_limits_would_not_hold(
    made: list[LovdProc], tmp_path: Path, test_image: str
) -> None:
    p = LovdProc(tmp_path, limits={"enforce": True, "max_running": 2})
    made.append(p.start())
    here = limits.for_runner("podman", "auto")
    status, _, body = p.api("POST", "/api/sessions", {})
    if here.missing:
        assert status == 503, body
        for name in here.missing:
            assert f"{name} ({limits.CONTROLLERS[name]})" in body["detail"], body
        assert "limits.enforce: false" in body["detail"]
        assert body["missing_limits"] == here.missing
        assert containers(f"lovd.instance={p.instance_id()}") == {}
        _, _, listed = p.api("GET", "/api/sessions")
        assert listed["sessions"] == []  # nothing was created
        log = p.log_path.read_text()
        assert "session limits cannot be enforced" in log and "limits.enforce is true" in log
    else:  # a host with delegation: the container gets every limit
        assert status == 201, body
        host = json.loads(podman("inspect", f"lovd-{body['id']}"))[0]["HostConfig"]
        assert host["Memory"] > 0 and host["NanoCpus"] > 0 and host["PidsLimit"] > 0


def test_a_fork_loop_stops_at_the_sessions_task_limit(
    made: list[LovdProc], tmp_path: Path, test_image: str
) -> None:
    tasks = 32
    p = LovdProc(tmp_path, limits={"tasks": tasks})  # limits.enforce: false (the harness)
    made.append(p.start())
    if limits.for_runner("podman", "auto").missing:
        assert "limits.enforce is false" in p.log_path.read_text()  # said at start
    status, _, s = p.api("POST", "/api/sessions", {})
    assert status == 201, s
    name = f"lovd-{s['id']}"
    host = json.loads(podman("inspect", name))[0]["HostConfig"]
    assert {"Name": "RLIMIT_NPROC", "Soft": tasks, "Hard": tasks} in host["Ulimits"]
    # Twice the limit: each `sleep &` is a new task of the session's uid.
    out = subprocess_out(
        "exec", name, "sh", "-c",
        f"n=0; while [ $n -lt {tasks * 2} ]; do sleep 120 & n=$((n+1)); echo started=$n; done",
    )  # fmt: skip
    started = max(int(n) for n in re.findall(r"started=(\d+)", out))
    print(f"limit {tasks}: {started} background processes started, then: {out.strip()[-80:]}")
    assert "can't fork" in out
    assert tasks // 2 < started < tasks  # the server, the shell and friends count too
    # The server itself still answers: the limit stops the loop, not the session.
    status, _, health = p.api("GET", f"/api/sessions/{s['id']}")
    assert status == 200 and health["status"] == "running"


def subprocess_out(*args: str) -> str:
    r = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=60, check=False)
    return r.stdout + r.stderr


def test_a_clean_podman_stop_is_recorded_as_stopped(
    made: list[LovdProc], tmp_path: Path, test_image: str
) -> None:
    """The container is stopped while lovd is down and stays listed (exited, 143): before,
    the next lovd recorded "failed: container exited with code 143"."""
    p = LovdProc(tmp_path)
    made.append(p.start())
    status, _, s = p.api("POST", "/api/sessions", {})
    assert status == 201, s
    sid, iid = s["id"], p.instance_id()
    p.stop()
    name = f"lovd-{sid}"
    # The same container, without --rm, so its exit status stays to be read.
    podman("rm", "-f", "-t", "0", name)
    podman("run", "-d", "--init", "--name", name, "--label", f"lovd.session={sid}",
           "--label", f"lovd.instance={iid}", test_image)  # fmt: skip
    time.sleep(0.5)
    podman("stop", "-t", "5", name)
    assert podman("inspect", "--format", "{{.State.ExitCode}}", name).strip() == "143"
    p.start()
    _, _, row = p.api("GET", f"/api/sessions/{sid}")
    assert row["status"] == "stopped", row
    assert "143" not in row["reason"] and "stopped" in row["reason"], row
