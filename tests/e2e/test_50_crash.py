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
        killed = m.running_containers()[name]
        m.podman("kill", name)
        kills += 1

        def settled(killed: str = killed) -> str:
            p = m.unit_props(unit, "ActiveState", "SubState")
            if p.get("ActiveState") == "failed":
                return "failed"
            # A restart is a new container (ExecStopPost removed the killed one); the
            # killed one may still be listed as running for a moment.
            return "up" if m.running_containers().get(name, killed) != killed else ""

        try:
            # A restart is RestartSec=1 plus a container start; on a loaded 2-core
            # machine that once took more than 20 s.
            outcome = m.wait_for("the unit to restart or fail", settled, timeout=60)
        except AssertionError as e:
            status = m.systemctl_user("status", "--no-pager", "-n", "30", unit).stdout
            ps = m.podman("ps", "-a", "--format", "{{.Names}} {{.Status}}", check=False).stdout
            raise AssertionError(f"{e}\nafter kill {kills}:\n{status}\n{ps}") from e
        if outcome == "failed":
            break
    assert kills == 4, kills  # the first run + 3 restarts were each killed; no 4th restart

    def lovd_failed() -> dict[str, object] | None:
        s = m.sessions()[sid]
        return s if s["status"] == "failed" else None

    s = m.wait_for("lovd to mark the session failed", lovd_failed, timeout=20)
    assert isinstance(s, dict)
    assert "unit failed" in str(s["reason"]), s
    assert name not in m.running_containers()
