"""Session egress on a real systemd. The OCI hook is part of the session unit's own
`podman run`, so a container the unit restarts (Restart=on-failure) is fenced in again,
even while lovd itself is stopped; and lovd doctor, run as lovd, says it is in force.
Traffic goes only to the machine's own loopback (10.0.2.2 inside a session)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.e2e.machine import LOVD, PY, Machine

pytestmark = pytest.mark.systemd

GATEWAY = "10.0.2.2"
BROKER_PORT = 18780  # broker.listen's default; the e2e config leaves it
# A TCP listener on the machine's loopback that greets every connection with a token.
BANNER = """
import socket
s = socket.create_server(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"lovd-egress-probe\\n")
    c.close()
"""


@pytest.fixture
def banner(machine: Machine) -> Iterator[int]:
    proc = machine.popen(PY, "-c", BANNER)
    assert proc.stdout is not None
    try:
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def connect(m: Machine, sid: str, port: int) -> tuple[int, str]:
    """TCP from inside the session (busybox nc as the session's user). stdin stays open a
    moment after the request: on its EOF nc half-closes, and a server may then drop the
    request unanswered."""
    request = "GET / HTTP/1.0\\r\\n\\r\\n"
    script = f'{{ printf "{request}"; sleep 2; }} | busybox nc -w 3 {GATEWAY} {port}'
    r = m.run("podman", "exec", f"lovd-{sid}", "sh", "-c", script, user="lovd", check=False)
    return r.returncode, r.stdout


def live_rules(m: Machine, sid: str) -> str:
    pid = m.podman("inspect", "--format", "{{.State.Pid}}", f"lovd-{sid}").stdout.strip()
    return m.run(
        "podman", "unshare", "nsenter", "--target", pid, "--net", "nft", "list", "ruleset",
        user="lovd",
    ).stdout  # fmt: skip


def assert_fenced(m: Machine, sid: str, other_port: int, banner: int) -> None:
    code, out = connect(m, sid, banner)
    assert code != 0 and "lovd-egress-probe" not in out, (code, out)
    code, out = connect(m, sid, other_port)  # another session's published port
    assert code != 0 and "HTTP/" not in out, (code, out)
    rules = live_rules(m, sid)
    assert "policy drop;" in rules, rules
    assert f"ip daddr {GATEWAY} tcp dport {BROKER_PORT} accept" in rules, rules


def restarted(m: Machine, sid: str, old_cid: str) -> str:
    """Kill the container; its unit starts a new one. Returns the new container id."""
    name = f"lovd-{sid}"
    m.podman("kill", name)

    def new_cid() -> str:
        cid = m.running_containers().get(name, "")
        return cid if cid and not old_cid.startswith(cid) else ""

    return str(m.wait_for(f"{name} restarted by its unit", new_cid, timeout=30))


def test_unit_restarts_keep_the_rules_even_without_lovd(machine: Machine, banner: int) -> None:
    m = machine
    m.run("systemctl", "start", "lovd")
    a, b = m.create_session(), m.create_session()
    sid = str(a["id"])
    unit = f"lovd-session-{sid}.service"
    exec_start = m.unit_props(unit, "ExecStart")["ExecStart"]
    argv = exec_start.split("argv[]=", 1)[1].split(" ;", 1)[0].split()
    assert argv[1] == "--hooks-dir" and argv[3] == "run", argv  # a global flag: before run
    hooks_dir = argv[2]

    # The control: the listener answers from the machine's loopback itself.
    control = m.out("busybox", "nc", "-w", "3", "127.0.0.1", str(banner), input="")
    assert "lovd-egress-probe" in control, control
    code, out = connect(m, sid, BROKER_PORT)
    assert out.startswith("HTTP/1."), (code, out)  # the broker answers
    assert_fenced(m, sid, int(str(b["port"])), banner)

    # systemd's Restart= runs the unit's podman run again: the hook with it.
    cid = restarted(m, sid, str(a["container_id"]))
    assert_fenced(m, sid, int(str(b["port"])), banner)

    # lovd stopped: nothing of lovd runs, and a restarted container is fenced in all the same
    # (the hook and its rules stay in lovd's runtime directory).
    m.run("systemctl", "stop", "lovd.service")
    try:
        assert m.out("systemctl", "is-active", "lovd.service", check=False) != "active"
        restarted(m, sid, cid)
        assert_fenced(m, sid, int(str(b["port"])), banner)
    finally:
        m.run("systemctl", "start", "lovd")
    code, out = connect(m, sid, BROKER_PORT)
    assert out.startswith("HTTP/1."), (code, out)

    r = m.run(LOVD, "doctor", "--json", user="lovd", check=False, timeout=120)
    try:
        checks = {c["name"]: c for c in json.loads(r.stdout)}
    except ValueError as e:
        raise AssertionError(f"doctor: {r.stdout[-2000:]} {r.stderr[-2000:]}") from e
    assert checks["egress"]["status"] == "ok", checks["egress"]
    assert hooks_dir in checks["egress"]["detail"], (hooks_dir, checks["egress"])
    assert checks["egress-live"]["status"] == "ok", checks["egress-live"]
    assert checks["egress-live"]["detail"].startswith("rules present in all"), checks


def test_no_session_container_runs_without_the_hook(machine: Machine) -> None:
    """Every session container of the machine's lovd, whoever started it, has the table."""
    m = machine
    names = [n for n in m.running_containers() if n.startswith("lovd-")]
    assert names
    for name in names:
        pid = m.podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
        r = m.run(
            "podman", "unshare", "nsenter", "--target", pid, "--net", "nft", "list", "tables",
            user="lovd", check=False,
        )  # fmt: skip
        assert r.returncode == 0 and "inet lovd_egress" in r.stdout, (name, r.stdout, r.stderr)
