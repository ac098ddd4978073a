"""idle_exit: with no API requests lovd exits (sending STOPPING=1) and leaves every
session running; the sockets stay, and the next connection to any of them -- the browser
path's, the credential broker's, the API's -- starts lovd again, which re-adopts the
sessions."""

from __future__ import annotations

import time

import pytest

from tests.e2e.machine import E2E_CONFIG, Machine
from tests.e2e.test_30_restart import ensure_sessions, unit_pids

pytestmark = pytest.mark.systemd
IDLE = 3.0
BROKER = "127.0.0.1:18780"  # lovd-broker.socket's ListenStream= and broker.listen's default


def test_idle_exit_and_reactivation(machine: Machine) -> None:
    m = machine
    before = ensure_sessions(m, 2)
    pids = unit_pids(m, list(before))
    m.run("tee", "/etc/lovd/lovd.conf", input=E2E_CONFIG + f"idle_exit: {IDLE}\n")
    try:
        # PID 1 logs every sd_notify message it receives at debug level.
        m.run("systemd-analyze", "log-level", "debug")
        m.run("systemctl", "restart", "lovd.service")
        started = time.monotonic()
        cursor = m.cursor()
        pid = m.main_pid()

        def exited() -> bool:
            return (
                m.out("systemctl", "show", "lovd.service", "-p", "ActiveState", "--value")
                == "inactive"
            )

        m.wait_for("lovd to exit when idle", exited, timeout=IDLE + 15, interval=0.2)
        idle_for = time.monotonic() - started
        m.run("systemd-analyze", "log-level", "info")
        assert idle_for >= IDLE - 0.5
        assert m.out("systemctl", "show", "lovd.service", "-p", "Result", "--value") == "success"
        assert m.out("systemctl", "is-active", "lovd.socket") == "active"
        journal = m.journal("--no-hostname", since_cursor=cursor)
        notify = [
            str(e.get("MESSAGE"))
            for e in journal
            if f"notification message from PID {pid}" in str(e.get("MESSAGE"))
        ]
        assert any("STOPPING=1" in x for x in notify), notify
        lovd_says = [str(e.get("MESSAGE")) for e in journal if e.get("SYSLOG_IDENTIFIER") == "lovd"]
        assert any("idle_exit" in x for x in lovd_says), lovd_says

        # Sessions untouched while lovd is gone.
        containers = m.running_containers()
        assert all(f"lovd-{sid}" in containers for sid in before)
        assert unit_pids(m, list(before)) == pids

        # A browser request through the auth socket (what Caddy's forward_auth sends)
        # activates lovd too: held, not refused, while lovd is down.
        assert m.out("systemctl", "is-active", "lovd-auth.socket") == "active"
        landing = m.run(
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
            "/run/lovd/auth.sock",
            "http://lovd/",
        )
        assert landing.stdout == "200", landing.stdout
        assert m.out("systemctl", "is-active", "lovd.service") == "active"
        # systemd's socket keeps its owner and mode (lovd must not widen it): Caddy's
        # group, not the operators'.
        mode = m.out("stat", "-c", "%F %U:%G %a", "/run/lovd/auth.sock")
        assert mode == "socket lovd:lovd-web 660", mode
        m.wait_for("lovd to exit when idle again", exited, timeout=IDLE + 15, interval=0.2)

        # A session's LLM call to the broker activates lovd as well: held by
        # lovd-broker.socket, then answered by lovd's broker itself (no credential: 401,
        # or 404 for a path it does not offer) -- never a refused connection (curl: 000).
        assert m.out("systemctl", "is-active", "lovd-broker.socket") == "active"
        llm = m.run(
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "30",
            f"http://{BROKER}/llm/lovd/x",
            check=False,
        )
        assert llm.stdout in ("401", "404"), (llm.returncode, llm.stdout, llm.stderr)
        assert m.out("systemctl", "is-active", "lovd.service") == "active"
        m.wait_for("lovd to exit when idle a third time", exited, timeout=IDLE + 15, interval=0.2)

        # The next API connection activates lovd, which re-adopts them.
        cursor = m.cursor()
        now = m.sessions()
        assert m.out("systemctl", "is-active", "lovd.service") == "active"
        for sid, cid in before.items():
            assert now[sid]["status"] == "running" and now[sid]["container_id"] == cid
        msgs = [str(e.get("MESSAGE")) for e in m.journal("-u", "lovd", since_cursor=cursor)]
        assert any(f"{len(before)} adopted" in x for x in msgs), msgs
    finally:
        m.run("systemd-analyze", "log-level", "info", check=False)
        m.run("tee", "/etc/lovd/lovd.conf", input=E2E_CONFIG)
        m.run("systemctl", "restart", "lovd.service")
