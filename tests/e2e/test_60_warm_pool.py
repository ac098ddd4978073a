"""The warm pool under systemd: warm containers are transient units like sessions,
invisible to the API, survive a lovd crash, and are handed out by POST /api/sessions."""

from __future__ import annotations

import pytest

from tests.e2e.machine import E2E_CONFIG, Machine

pytestmark = pytest.mark.systemd


def test_warm_pool_under_systemd(machine: Machine) -> None:
    m = machine
    assert "warm_pool: 0\n" in E2E_CONFIG
    known = set(m.running_containers())

    def new_containers() -> list[str]:
        return [n for n in m.running_containers() if n not in known]

    m.run("tee", "/etc/lovd/lovd.conf", input=E2E_CONFIG.replace("warm_pool: 0", "warm_pool: 1"))
    try:
        m.run("systemctl", "restart", "lovd.service")
        m.api("GET", "/api/health")
        found = m.wait_for("a warm container", new_containers, timeout=60)
        assert isinstance(found, list) and len(found) == 1
        name = found[0]
        sid = name.removeprefix("lovd-")
        unit = f"lovd-session-{sid}.service"
        assert m.systemctl_user("is-active", unit).stdout.strip() == "active"
        assert sid not in m.sessions()

        def ready() -> bool:
            entries = m.journal("-u", "lovd", f"SESSION_ID={sid}")
            return any("warm container ready" in str(e.get("MESSAGE")) for e in entries)

        m.wait_for("the warm container to be ready", ready, timeout=60)
        # lovd crashes; the warm unit keeps running and the restarted lovd hands it out.
        pid = m.main_pid()
        m.run("kill", "-9", str(pid))
        s = m.create_session()
        assert s["id"] == sid and s["status"] == "running", s
        assert m.main_pid() != pid
        assert m.systemctl_user("is-active", unit).stdout.strip() == "active"
        refilled = m.wait_for(
            "the pool to refill", lambda: [n for n in new_containers() if n != name], timeout=60
        )
        assert isinstance(refilled, list) and len(refilled) == 1
        assert refilled[0].removeprefix("lovd-") not in m.sessions()
    finally:
        m.run("tee", "/etc/lovd/lovd.conf", input=E2E_CONFIG)
        m.run("systemctl", "restart", "lovd.service")
        m.api("GET", "/api/health")
    # warm_pool 0 again: the pool's first pass removes the surplus warm container.
    m.wait_for(
        "the warm container to go",
        lambda: [n for n in new_containers() if n != name] == [],
        timeout=60,
    )
    assert m.api("DELETE", f"/api/sessions/{sid}")[0] == 204
