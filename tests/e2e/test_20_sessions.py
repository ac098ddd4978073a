"""The acceptance path on a real systemd: `systemctl start lovd`, health over the
socket, a session as a transient unit of user@UID with its cgroup limits, a rootless
container answering HTTP; journald fields and the unit's output found by session id."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.e2e.machine import LOVD, PY, SOCK, Machine

pytestmark = pytest.mark.systemd


def test_start_health_session_unit(machine: Machine) -> None:
    m = machine
    m.run("systemctl", "stop", "lovd.service")
    m.run("systemctl", "start", "lovd")
    assert m.out("systemctl", "is-active", "lovd.service") == "active"
    code = m.out(
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--unix-socket",
        SOCK,
        "http://lovd/api/health",
    )
    assert code == "200"

    created = json.loads(m.out(LOVD, "session", "create", "--json"))
    sid = created["id"]
    assert created["status"] == "running"
    unit = f"lovd-session-{sid}.service"
    props = m.unit_props(
        unit, "ActiveState", "MemoryMax", "CPUQuotaPerSecUSec", "TasksMax", "ControlGroup"
    )
    assert props["ActiveState"] == "active", props
    assert props["MemoryMax"] == str(256 * 1024 * 1024)
    assert props["CPUQuotaPerSecUSec"] == "500ms"
    assert props["TasksMax"] == "64"
    assert f"/user@{m.uid}.service/" in props["ControlGroup"], props

    # Rootless: listed by the lovd user's podman, running as a subordinate id on the host.
    assert f"lovd-{sid}" in m.running_containers()
    husers = m.podman("top", f"lovd-{sid}", "huser").stdout.split()[1:]
    assert husers and all(h.isdigit() and int(h) >= 65536 for h in husers), husers

    # The container answers HTTP (with the per-session password lovd derives).
    password = m.out(
        PY,
        "-c",
        "import sys; from lovd import ids; print(ids.derive_password("
        "open('/var/lib/lovd/host.key','rb').read(), sys.argv[1]))",
        sid,
    )
    body = m.out(
        "curl",
        "-s",
        "-u",
        f"opencode:{password}",
        f"http://127.0.0.1:{created['port']}/global/health",
    )
    assert json.loads(body)["healthy"] is True


def test_journald_fields_and_unit_output(machine: Machine) -> None:
    m = machine
    rid = uuid.uuid4().hex[:16]
    status, data = m.api("POST", "/api/sessions", {"wait": True}, headers={"X-Request-Id": rid})
    assert status == 201, data
    assert isinstance(data, dict)
    sid = data["id"]
    assert isinstance(sid, str)

    def by_session() -> list[dict[str, str]]:
        return m.journal("-u", "lovd", f"SESSION_ID={sid}")

    entries = m.wait_for("lovd's journal entries for the session", by_session, timeout=10)
    assert isinstance(entries, list)
    messages = [e["MESSAGE"] for e in entries]
    assert any("session created" in msg for msg in messages), messages
    assert any(e.get("REQUEST_ID") == rid for e in entries), entries[0]
    assert m.journal("-u", "lovd", f"REQUEST_ID={rid}")

    # The session unit's own output (podman's stdout, e.g. the container id, and the
    # user manager's messages about the unit) is found from the session id alone.
    unit = f"lovd-session-{sid}.service"
    cid = str(data["container_id"])
    unit_entries = m.journal(f"_SYSTEMD_USER_UNIT={unit}", "+", f"USER_UNIT={unit}")
    text = "\n".join(str(e.get("MESSAGE", "")) for e in unit_entries)
    assert cid in text, text[-2000:]
    assert f"Started {unit}" in text or "Started lovd session" in text, text[-2000:]
    # Container stdout/stderr go to the journal too (Podman's journald log driver): the
    # test image's start-up line, found by the container's name (lovd-<session id>).
    assert (
        m.podman(
            "inspect", "--format", "{{.HostConfig.LogConfig.Type}}", f"lovd-{sid}"
        ).stdout.strip()
        == "journald"
    )

    def container_output() -> list[str]:
        return [str(e.get("MESSAGE")).strip() for e in m.journal(f"CONTAINER_NAME=lovd-{sid}")]

    out = m.wait_for("the container's stdout in the journal", container_output, timeout=10)
    assert f"lovd-test: session {sid} starting as uid 1000" in out, out
