"""A session container that keeps crashing is restarted by its unit (3 times), then the
unit fails and lovd reports the session failed with the reason."""

from __future__ import annotations

import pytest

from tests.e2e.machine import Machine

pytestmark = pytest.mark.systemd


def test_crash_restarts_then_failed(machine: Machine) -> None:
    m = machine
    sid = str(m.create_session()["id"])
    unit = f"lovd-session-{sid}.service"
    name = f"lovd-{sid}"
    kills = 0
    for _ in range(10):
        m.wait_for(f"{name} running", lambda: name in m.running_containers(), timeout=20)
        m.podman("kill", name)
        kills += 1

        def settled() -> str:
            p = m.unit_props(unit, "ActiveState", "SubState")
            if p.get("ActiveState") == "failed":
                return "failed"
            return "up" if name in m.running_containers() else ""

        if m.wait_for("the unit to restart or fail", settled, timeout=20) == "failed":
            break
    assert kills == 4, kills  # the first run + 3 restarts were each killed; no 4th restart

    def lovd_failed() -> dict[str, object] | None:
        s = m.sessions()[sid]
        return s if s["status"] == "failed" else None

    s = m.wait_for("lovd to mark the session failed", lovd_failed, timeout=20)
    assert isinstance(s, dict)
    assert "unit failed" in str(s["reason"]), s
    assert name not in m.running_containers()
