"""A start-up reconcile that fails is retried with backoff while the API answers, and lovd
serves the sessions once Podman answers again (a real lovd process and real Podman, behind
a podman wrapper that fails `podman ps` while a file exists)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.lovdproc import LovdProc, remove_all

pytestmark = pytest.mark.podman


def test_a_failing_start_up_reconcile_is_retried_while_the_api_answers(
    tmp_path: Path, test_image: str
) -> None:
    wedged = tmp_path / "wedged"
    wedged.touch()
    wrapper = tmp_path / "podman"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = ps ] && [ -e {wedged} ]; then\n'
        '  echo "Error: storage wedged (test)" >&2; exit 125\n'
        "fi\n"
        'exec podman "$@"\n'
    )
    os.chmod(wrapper, 0o755)
    p = LovdProc(tmp_path, podman={"binary": str(wrapper)})
    try:
        t0 = time.monotonic()
        p.start(reconciled=False)
        status, _, health = p.api("GET", "/api/health")
        assert time.monotonic() - t0 < 5
        assert status == 503 and health["checks"]["reconcile"]["ok"] is False
        deadline = time.monotonic() + 20
        while "attempt 2 failed" not in health["checks"]["reconcile"]["detail"]:
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
            health = p.api("GET", "/api/health")[2]
        assert "storage wedged (test)" in health["checks"]["reconcile"]["detail"]

        t1 = time.monotonic()
        status, headers, body = p.api("GET", "/api/sessions")
        assert status == 503 and body["code"] == "unavailable", body
        assert int(headers["Retry-After"]) >= 1 and 9 < time.monotonic() - t1 < 20
        assert p.proc is not None and p.proc.poll() is None  # never fatal

        wedged.unlink()
        deadline = time.monotonic() + 60
        while (status := p.api("GET", "/api/sessions")[0]) != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        health = p.api("GET", "/api/health")[2]
        assert health["checks"]["reconcile"]["ok"] is True
        assert health["checks"]["reconcile"]["detail"].startswith("done in")
        status, _, s = p.api("POST", "/api/sessions")
        assert status == 201 and s["status"] == "running"
        log = p.log_path.read_text()
        assert "start-up reconcile failed (attempt 1)" in log and "reconciled in" in log
    finally:
        remove_all(p)
