"""While the start-up reconcile runs, the API answers: requests about sessions wait for it
(bounded), then get 503 with Retry-After; the rest answers at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from lovd.session.reconcile import Readiness
from tests.unit.conftest import Api, open_api
from tests.unit.test_gate import open_gate


async def test_a_request_about_sessions_waits_then_gets_503_with_retry_after(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_api(tmp_path, free_ports, reconcile_hold=0.2) as api:
        await _waits_then_503(api)


async def _waits_then_503(api: Api) -> None:
    ready = api.host.ready
    ready.failed("podman ps did not finish within 120 s", retry_in=4)
    r = await api.client.get("/api/sessions")
    assert r.status == 503 and r.headers["Retry-After"] == "4"
    body = await r.json(content_type="application/problem+json")
    assert body["code"] == "unavailable" and "podman ps did not finish" in body["detail"]
    r = await api.client.post("/api/sessions")
    assert r.status == 503 and api.runner.servers == {}  # nothing started meanwhile
    assert (await api.client.get("/api/openapi.json")).status == 200  # at once
    assert (await api.client.get("/metrics")).status == 200

    async def finish() -> None:
        await asyncio.sleep(0.05)
        ready.finished("done in 0.05 s")

    task = asyncio.ensure_future(finish())
    r = await api.client.get("/api/sessions")  # waits, then is served
    assert r.status == 200
    await task


async def test_the_health_check_says_what_it_waits_for() -> None:
    ready = Readiness()
    ok, detail = await ready.health()
    assert not ok and detail.startswith("reconciling with Podman")
    ready.failed("podman ps failed (exit 125)", retry_in=2)
    ok, detail = await ready.health()
    assert not ok and "attempt 1 failed (podman ps failed (exit 125)); retrying" in detail
    ready.finished("done in 1.000 s: 2 adopted")
    assert await ready.health() == (True, "done in 1.000 s: 2 adopted")


async def test_the_browser_path_waits_too(tmp_path: Path, free_ports: list[int]) -> None:
    """Caddy's forward_auth and the session link wait for the start-up reconcile (a stored
    "running" may name a container that is gone), then 503 with Retry-After; the landing
    page answers at once."""
    async with open_gate(tmp_path, free_ports, reconcile_hold=0.2) as g:
        ready = g.host.ready
        ready.failed("podman ps failed (exit 125)", retry_in=2)
        r = await g.auth(None, "")
        assert r.status == 503 and r.headers["Retry-After"] == "2"
        assert (
            "still reconciling" in (await r.json(content_type="application/problem+json"))["detail"]
        )
        r = await g.client.get("/c/0123456789abcdef?token=x")
        assert r.status == 503
        assert (await g.client.get("/")).status == 200  # the landing page at once
