"""lovd against real rootless Podman: a real daemon process, real containers, real HTTP."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lovdproc import LovdProc, containers, podman, remove_all
from tests.waiting import until_sync

pytestmark = pytest.mark.podman


@pytest.fixture
def lovd(tmp_path: Path, test_image: str) -> Iterator[LovdProc]:
    p = LovdProc(tmp_path, limits={"max_running": 10})
    yield p.start()
    remove_all(p)


def password(session_id: str) -> str:
    env = podman("exec", f"lovd-{session_id}", "cat", "/run/secrets/lovd.env")
    return dict(line.split("=", 1) for line in env.splitlines())["OPENCODE_SERVER_PASSWORD"]


def http_get(port: int, session_id: str, path: str = "/") -> str:
    auth = base64.b64encode(f"opencode:{password(session_id)}".encode()).decode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Basic {auth}"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return str(r.read().decode())


def test_session_lifecycle_real_container(lovd: LovdProc) -> None:
    r = lovd.cli("session", "create", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["status"] == "running"
    assert "lovd test session" in http_get(s["port"], s["id"])
    with pytest.raises(urllib.error.HTTPError) as e:  # the container's own password holds
        urllib.request.urlopen(f"http://127.0.0.1:{s['port']}/", timeout=5)
    assert e.value.code == 401

    name = f"lovd-{s['id']}"
    inspect = json.loads(podman("inspect", name))[0]
    assert inspect["Id"] == s["container_id"]
    assert inspect["Config"]["Labels"]["lovd.session"] == s["id"]
    assert inspect["HostConfig"]["ReadonlyRootfs"] is True
    assert inspect["HostConfig"]["CapDrop"] and not inspect["HostConfig"]["CapAdd"]
    workspace = lovd.tmp / "state" / "sessions" / s["id"]
    assert workspace.is_dir()

    # The per-session container password exists inside, but nowhere public.
    secret = password(s["id"])
    assert len(secret) >= 32
    secret_file = lovd.tmp / "run" / f"secrets-{lovd.instance_id()}" / f"{s['id']}.env"
    assert secret in secret_file.read_text()
    assert oct(secret_file.parent.stat().st_mode & 0o777) == "0o700"
    assert secret not in json.dumps(inspect)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert secret not in ps
    assert secret not in lovd.log_path.read_text()

    listed = lovd.cli("session", "list", "--json")
    assert [x["id"] for x in json.loads(listed.stdout)["sessions"]] == [s["id"]]

    r = lovd.cli("session", "rm", s["id"])
    assert r.returncode == 0, r.stderr
    assert name not in containers(f"lovd.session={s['id']}")
    assert not secret_file.exists()
    assert not workspace.exists()
    show = lovd.cli("session", "show", s["id"])
    assert show.returncode == 1 and "no session" in show.stderr


def test_kill9_readopts_sessions_and_collects_orphans(lovd: LovdProc) -> None:
    created = []
    for _ in range(10):
        status, _, s = lovd.api("POST", "/api/sessions")
        assert status == 201, s
        created.append(s)
    before = {s["id"]: s["container_id"] for s in created}
    lovd.kill9()

    iid = lovd.instance_id()
    orphan, unlabelled = f"lovd-orphan-{iid}", f"unlabelled-{iid}"
    podman(
        "run",
        "-d",
        "--rm",
        "--name",
        orphan,
        "--label",
        "lovd.session=ffffffffffffffff",
        "--label",
        f"lovd.instance={iid}",
        "localhost/lovd-test:latest",
    )
    podman("run", "-d", "--rm", "--name", unlabelled, "localhost/lovd-test:latest")
    try:
        lovd.start()
        status, _, listed = lovd.api("GET", "/api/sessions")
        after = {s["id"]: (s["status"], s["container_id"]) for s in listed["sessions"]}
        assert after == {sid: ("running", cid) for sid, cid in before.items()}
        for s in created:
            assert "lovd test session" in http_get(s["port"], s["id"])
        assert orphan not in containers(f"lovd.instance={iid}")
        assert unlabelled in podman("ps", "--format", "{{.Names}}")
    finally:
        podman("rm", "-f", "-i", "-t", "0", unlabelled, orphan, check=False)


def test_vanished_container_is_marked_with_reason(lovd: LovdProc) -> None:
    _, _, s = lovd.api("POST", "/api/sessions")
    lovd.kill9()
    podman("rm", "-f", "-t", "0", f"lovd-{s['id']}")
    lovd.start()
    _, _, got = lovd.api("GET", f"/api/sessions/{s['id']}")
    assert got["status"] == "stopped" and "vanished" in got["reason"]


BAD = ["../x", "%2e%2e%2f", "a" * 300, "abc%0d%0aX-Evil:%201", "abc%00def"]


def test_bad_input_creates_nothing(lovd: LovdProc) -> None:
    iid = lovd.instance_id()
    for bad in BAD:
        for method in ("GET", "DELETE"):
            status, headers, body = lovd.api(method, f"/api/sessions/{bad}")
            assert status in (400, 404), (bad, status)
            assert headers["Content-Type"].startswith("application/problem+json")
            assert body["status"] == status
    status, headers, body = lovd.api("POST", "/api/sessions", raw=b'{"wait": tru')
    assert status == 400 and body["code"] == "invalid-json"
    status, _, body = lovd.api("POST", "/api/sessions", raw=b"{" + b" " * 100_000 + b"}")
    assert status == 413 and body["code"] == "body-too-large"
    _, _, listed = lovd.api("GET", "/api/sessions")
    assert listed["sessions"] == [] and containers(f"lovd.instance={iid}") == {}


def test_fourth_session_gets_429(tmp_path: Path, test_image: str) -> None:
    p = LovdProc(tmp_path).start()  # default limit: 3
    try:
        for _ in range(3):
            assert p.api("POST", "/api/sessions")[0] == 201
        status, headers, body = p.api("POST", "/api/sessions")
        assert status == 429 and int(headers["Retry-After"]) > 0
        assert headers["Content-Type"].startswith("application/problem+json")
        assert "try again" in body["detail"]
        assert len(containers(f"lovd.instance={p.instance_id()}")) == 3
        r = p.cli("session", "create")
        assert r.returncode == 1 and "in use" in r.stderr and "Traceback" not in r.stderr
    finally:
        _, _, listed = p.api("GET", "/api/sessions")
        for s in listed["sessions"]:
            p.api("DELETE", f"/api/sessions/{s['id']}")
        p.stop()


def test_parallel_creates_all_succeed(lovd: LovdProc) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: lovd.api("POST", "/api/sessions"), range(6)))
    assert [r[0] for r in results] == [201] * 6, [r[2] for r in results]
    ports = {r[2]["port"] for r in results}
    assert len(ports) == 6
    for _, _, s in results:
        assert "lovd test session" in http_get(s["port"], s["id"])


def wait_for_containers(iid: str, n: int, timeout: float = 60) -> dict[str, str]:
    found: dict[str, str] = {}

    def counted() -> bool:
        found.clear()
        found.update(containers(f"lovd.instance={iid}"))
        return len(found) == n

    until_sync(counted, timeout, f"{n} containers of instance {iid}", step=0.2)
    return found


def test_warm_pool_hands_out_a_started_container(tmp_path: Path, test_image: str) -> None:
    p = LovdProc(tmp_path, warm_pool=1, limits={"max_running": 2}).start()
    try:
        iid = p.instance_id()
        [(warm_name, warm_cid)] = wait_for_containers(iid, 1).items()
        assert p.api("GET", "/api/sessions")[2] == {"sessions": []}  # warm: not a session yet
        # Warm containers survive a lovd crash like sessions do.
        p.kill9()
        p.start()
        assert containers(f"lovd.instance={iid}") == {warm_name: warm_cid}

        status, _, s = p.api("POST", "/api/sessions")
        assert status == 201 and s["status"] == "running"
        assert f"lovd-{s['id']}" == warm_name and s["container_id"].startswith(warm_cid)
        assert "lovd test session" in http_get(s["port"], s["id"])
        assert "session created (warm pool)" in p.log_path.read_text()
        # The pool refills into the one free place, and no further.
        found = wait_for_containers(iid, 2)
        assert warm_name in found
        status, _, s2 = p.api("POST", "/api/sessions")
        assert status == 201 and s2["id"] != s["id"] and f"lovd-{s2['id']}" in found
        time.sleep(1)
        assert len(containers(f"lovd.instance={iid}")) == 2
        status, _, _ = p.api("POST", "/api/sessions")
        assert status == 429
        # Deleting a session frees a place: the pool takes it.
        assert p.api("DELETE", f"/api/sessions/{s['id']}")[0] == 204
        found = wait_for_containers(iid, 2)
        assert warm_name not in found and f"lovd-{s2['id']}" in found
    finally:
        p.stop()
        for name in containers(f"lovd.instance={p.instance_id()}"):
            podman("rm", "-f", "-t", "0", name, check=False)
        subprocess.run(["podman", "unshare", "rm", "-rf", str(tmp_path / "state")], check=False)
