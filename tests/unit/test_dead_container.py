"""A dead or hung container, in-process (fault injection with the fake runner; the same
paths through real Caddy and real containers are in tests/integration/test_dead_container.py):
the immediate container check (session/health.py, Health.check_now), the gate's answer to
a request Caddy could not deliver (web/gate.py, BrowserGate.upstream_failed) and the
Podman events follower (lovd/runtime_events.py)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import time
from pathlib import Path

from lovd import runtime_events
from lovd.caddy import FAILED_HEADER
from lovd.session.model import SessionState
from tests.unit.conftest import open_api
from tests.unit.test_gate import NAV, XHR, open_gate
from tests.waiting import until

FAST = {"health": {"failures": 2, "probe_timeout": 0.3}}


async def test_a_removed_container_is_reconciled_at_once(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_api(tmp_path, free_ports, warm_pool=0, **FAST) as a:
        s, _ = await a.sessions.create(wait=True)
        assert await a.sessions.check_container(s.id, "test") == "ok"
        assert a.sessions.health.vouched(s.id)
        await a.runner.stop(s.id)  # behind lovd's back, like `podman rm -f`
        assert await a.sessions.check_container(s.id, "test") == "gone"
        row = a.store.get(s.id)
        assert row is not None and row.status == SessionState.STOPPED, row
        assert row.reason == "container stopped unexpectedly"
        # Not running any more: nothing to judge, and no second reconcile.
        assert await a.sessions.check_container(s.id, "test") == "skipped"


async def test_a_hung_container_is_restarted_within_seconds(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_api(tmp_path, free_ports, warm_pool=0, **FAST) as a:
        s, _ = await a.sessions.create(wait=True)
        await a.runner.hang(s.id)  # still "running" for Podman, answers nothing
        t0 = time.monotonic()
        # However many requests ask, one check runs.
        first = a.sessions.check_container(s.id, "a request")
        assert a.sessions.check_container(s.id, "another request") is first
        assert await first == "restarted"
        took = time.monotonic() - t0
        # failures (2) probes of probe_timeout (0.3 s), CONFIRM_GAP (1 s) apart: not
        # health.interval (30 s) apart.
        assert took < 5, took
        row = a.store.get(s.id)
        assert row is not None and row.status == SessionState.RUNNING and row.restarts == 1
        assert s.id in a.runner.servers  # answering again
        history = (await a.store.history(s.id, 10))["health"]
        assert any("after a request" in h["detail"] for h in history), history


async def test_caddys_failed_upstream_gets_lovds_answer_never_an_upstream(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_gate(tmp_path, free_ports) as g:
        # A running row whose container is gone (nothing listens on its port).
        s, token = await g.session()
        r = await g.auth(s, token, headers={**XHR, FAILED_HEADER: "502"})
        assert r.status == 503 and int(r.headers["Retry-After"]) > 0
        assert r.headers["Content-Type"].startswith("application/problem+json")
        assert "Authorization" not in r.headers and "X-Lovd-Upstream" not in r.headers
        body = json.loads(await r.text())
        assert body["code"] == "unavailable" and "started again" in body["detail"]
        assert g.store.get(s.id).status != SessionState.RUNNING  # type: ignore[union-attr]
        # The wake started; the next request is held until the container is ready.
        r = await g.auth(s, token, headers=XHR)
        assert r.status == 204 and r.headers["X-Lovd-Upstream"] == f"127.0.0.1:{s.port}"
        assert g.store.get(s.id).status == SessionState.RUNNING  # type: ignore[union-attr]

        # A navigation gets the waking page, which reloads itself into the chat.
        s2, token2 = await g.session()
        r = await g.auth(s2, token2, headers={**NAV, FAILED_HEADER: "502"})
        assert r.status == 503 and r.headers["Content-Type"].startswith("text/html")
        assert "progress.js" in await r.text()
        assert "X-Lovd-Upstream" not in r.headers

        # The header is worth nothing without the gate key, and a bad cookie is refused.
        r = await g.auth(s, token, headers={**XHR, FAILED_HEADER: "502"}, key="0" * 64)
        assert r.status == 404
        r = await g.auth(s, "wrong", headers={**XHR, FAILED_HEADER: "502"})
        assert r.status == 401 and "X-Lovd-Upstream" not in r.headers


def test_parse_keeps_deaths_of_session_containers_only() -> None:
    sid = "0123456789abcdef"

    def ev(status: str, **attrs: str) -> bytes:
        return json.dumps(
            {"Type": "container", "Status": status, "Attributes": {"lovd.session": sid, **attrs}}
        ).encode()

    assert runtime_events.parse(ev("died")) == (sid, "died")
    assert runtime_events.parse(ev("remove")) == (sid, "remove")
    for other in ("start", "create", "exec", "health_status", "kill"):
        assert runtime_events.parse(ev(other)) is None
    assert runtime_events.parse(ev("died", **{"lovd.session": "../etc"})) is None
    assert runtime_events.parse(b"not json") is None
    assert runtime_events.parse(b"[]") is None


async def test_the_events_stream_is_followed_again_when_it_ends(tmp_path: Path) -> None:
    # A stand-in `podman` whose stream ends after two events (as when Podman restarts).
    sid = "0123456789abcdef"
    fake = tmp_path / "podman"
    died = {"Type": "container", "Status": "died", "Attributes": {"lovd.session": sid}}
    fake.write_text(
        "#!/bin/sh\n"
        f"echo '{json.dumps(died)}'\n"
        'echo \'{"Type": "container", "Status": "start"}\'\n'
        "exit 3\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    seen: list[tuple[str, str]] = []
    w = runtime_events.ContainerEvents(
        str(fake), "inst", lambda *e: seen.append(e), min_delay=0.01, max_delay=0.05
    )
    w.start()
    try:
        await until(lambda: w.streams >= 3, 4, "3 event streams")
    finally:
        await w.close()
    assert w.streams >= 3 and seen[:2] == [(sid, "died"), (sid, "died")]
    assert w.argv[-1] == "label=lovd.instance=inst"


async def test_closing_the_follower_ends_its_podman_child(tmp_path: Path) -> None:
    fake = tmp_path / "podman"
    pidfile = tmp_path / "pid"
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    w = runtime_events.ContainerEvents(str(fake), "inst", lambda *e: None)
    w.start()
    await until(lambda: pidfile.exists() and pidfile.read_text().strip(), 4, "podman events")
    pid = int(pidfile.read_text())
    await w.close()
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive  # killed and reaped: no orphaned `podman events`


async def test_the_podman_events_child_dies_with_lovd(tmp_path: Path) -> None:
    # A stand-in lovd that follows the events, killed with SIGKILL: its child follows it.
    fake = tmp_path / "podman"
    pidfile = tmp_path / "pid"
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    script = (
        "import asyncio\n"
        "from lovd import runtime_events\n"
        "async def main():\n"
        f"    w = runtime_events.ContainerEvents({str(fake)!r}, 'inst', lambda *e: None)\n"
        "    await w.run()\n"
        "asyncio.run(main())\n"
    )
    lovd = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, cwd=Path(__file__).resolve().parents[2]
    )
    try:
        await until(lambda: pidfile.exists() and pidfile.read_text().strip(), 6, "podman events")
        pid = int(pidfile.read_text())
    finally:
        lovd.kill()
        await lovd.wait()
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.02)
    else:
        os.kill(pid, 9)
        raise AssertionError("podman events outlived lovd")
