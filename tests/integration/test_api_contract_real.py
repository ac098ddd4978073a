"""The API's contract on a real lovd (``lovd serve``, real rootless Podman, the real floors
check of this machine's disk): liveness apart from readiness, 405 with Allow, documented
400s, a refused query parameter that changes nothing, and a no-wait start that answers
a state the description names."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lovd.web.app import load_openapi
from tests.lovdproc import LovdProc, containers, remove_all

pytestmark = pytest.mark.podman


@pytest.fixture
def lovd(tmp_path: Path, test_image: str) -> Iterator[LovdProc]:
    # A disk floor no machine meets: readiness fails for real, liveness must not.
    p = LovdProc(tmp_path, limits={"max_running": 2}, floors={"disk_free": "1000T"})
    yield p.start()
    remove_all(p)


def test_liveness_holds_while_readiness_fails(lovd: LovdProc) -> None:
    for path in ("/api/health", "/api/readyz"):
        status, _, body = lovd.api("GET", path)
        assert status == 503 and body["checks"]["floors"]["ok"] is False, (path, body)
    status, headers, body = lovd.api("GET", "/api/livez")
    assert status == 200 and body["status"] == "alive"
    # The floor refuses new sessions with the reason, and only them.
    status, headers, body = lovd.api("POST", "/api/sessions", {})
    assert status == 503 and "floors.disk_free" in body["detail"] and "Retry-After" in headers


def test_contract_on_the_socket(tmp_path: Path, test_image: str) -> None:
    p = LovdProc(tmp_path, limits={"max_running": 2}).start()
    try:
        status, headers, body = p.api("TRACE", "/api/sessions")
        assert status == 405 and set(headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}
        status, _, body = p.api("GET", "/api/sessions/0/health")
        assert status == 400 and body["code"] == "invalid-session-id"
        status, _, body = p.api("POST", "/api/sessions?wait=AAA", {})
        assert status == 400 and "wait" in body["detail"]
        assert containers(f"lovd.instance={p.instance_id()}") == {}  # nothing started
        status, _, body = p.api("GET", "/api/sessions?scope=all")
        assert status == 200 and body["sync"] == "off"

        status, _, s = p.api("POST", "/api/sessions", {"wait": False})
        assert (
            status == 201
            and f"`{s['status']}`"
            in (load_openapi()["paths"]["/api/sessions"]["post"]["description"])
        )
        deadline = time.monotonic() + 60
        while p.api("GET", f"/api/sessions/{s['id']}")[2]["status"] != "running":
            assert time.monotonic() < deadline, "the session never ran"
            time.sleep(0.2)
    finally:
        remove_all(p)
