"""A session container that dies, is removed or hangs is never a 502 in the browser.

Real Caddy, lovd's real browser path (caddy_harness.py) and real rootless containers
(the test image). While a person's open chat sends a page load and an XHR once a second,
the container is removed (`podman rm -f`) or every process in it is stopped (SIGSTOP):
not one answer may be a 502, and the session comes back running, the same session with
its workspace. What each step took is printed (kill → the first 200 again).

The paths under test: Caddy's error route hands a failed upstream to lovd
(lovd/caddy.py, BrowserGate.upstream_failed), which checks the container and wakes the
session; a hung container is found by the gate's check of a container no probe vouched
for lately (session/health.py, Health.check_now); Podman's events tell lovd of a death
before any request (lovd/runtime_events.py), here and in a real `lovd serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from lovd import ids, runtime_events
from lovd.caddy import FAILED_HEADER
from tests.integration.caddy_harness import Harness, cookie, harness
from tests.lovdproc import LovdProc, podman, remove_all
from tests.waiting import until_sync

pytestmark = [pytest.mark.caddy, pytest.mark.podman]

NAV = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate"}
XHR = {"Accept": "application/json", "Sec-Fetch-Mode": "cors"}


@dataclass
class Poll:
    """A page load and an XHR once a second, each on its own (as a browser sends them:
    a request to a hung container does not hold back the next one)."""

    h: Harness
    headers: dict[str, str]
    seen: list[tuple[float, float, str, int, str, str]] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def one(self, kind: str) -> None:
        hdrs = {**self.headers, **(NAV if kind == "page" else XHR)}
        sent = time.monotonic()
        try:
            async with self.h.http.get(
                self.h.url + "/cgi-bin/echo",
                headers=hdrs,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=90),
            ) as r:
                body = await r.text()
                status, ctype, retry = r.status, r.content_type, r.headers.get("Retry-After", "")
        except (aiohttp.ClientError, TimeoutError) as e:
            status, ctype, body, retry = 0, type(e).__name__, "", ""
        self.seen.append((sent, time.monotonic(), kind, status, ctype, retry or body[:80]))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Poll]:
        async def loop() -> None:
            while True:
                for kind in ("page", "xhr"):
                    t = asyncio.create_task(self.one(kind))
                    self._tasks.add(t)
                    t.add_done_callback(self._tasks.discard)
                await asyncio.sleep(1.0)

        ticker = asyncio.create_task(loop())
        try:
            yield self
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            await asyncio.wait_for(asyncio.gather(*self._tasks), 120)

    def back_after(self, t: float) -> float:
        """Seconds from ``t`` until a request sent after it got a 200 (-1: never)."""
        ok = [done for sent, done, _, status, _, _ in self.seen if sent > t and status == 200]
        return min(ok) - t if ok else -1.0


async def apodman(*args: str) -> str:
    """``podman`` without blocking the event loop (lovd's gate runs on it in this test)."""
    proc = await asyncio.create_subprocess_exec(
        "podman", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 150)
    assert proc.returncode == 0, f"podman {args}: {err.decode()}"
    return out.decode()


async def _session(h: Harness) -> tuple[str, dict[str, str], str]:
    s, token = await h.sessions.create(wait=True)
    name = ids.container_name(s.id)
    await apodman("exec", name, "sh", "-c", "echo kept > /work/note.txt")
    return s.id, cookie(s, token), (await apodman("inspect", "--format", "{{.Id}}", name)).strip()


def _report(what: str, poll: Poll, t_kill: float) -> dict[str, object]:
    after = [p for p in poll.seen if p[0] > t_kill - 1]
    statuses: dict[str, int] = {}
    for _, _, kind, status, _, _ in after:
        key = f"{kind} {status}"
        statuses[key] = statuses.get(key, 0) + 1
    back = poll.back_after(t_kill)
    print(f"{what}: kill → a 200 again in {back:.1f} s; answers since the kill: {statuses}")
    return {"back": back, "statuses": statuses}


async def _check(poll: Poll, h: Harness, sid: str, first_id: str) -> None:
    bad = [p for p in poll.seen if p[3] == 0 or (p[3] >= 500 and p[3] != 503)]
    assert bad == [], bad  # never a 502 (nor any other 5xx than lovd's own 503)
    for _, _, kind, status, ctype, retry in poll.seen:
        if status == 503 and kind == "xhr":
            assert ctype == "application/problem+json" and int(retry) > 0, (ctype, retry)
        if status == 503 and kind == "page":
            assert ctype == "text/html", ctype  # the waking page, which reloads itself
    s = h.sessions.get(sid)
    assert s.status == "running", s
    name = ids.container_name(sid)
    assert (await apodman("inspect", "--format", "{{.Id}}", name)).strip() != first_id
    assert (await apodman("exec", name, "cat", "/work/note.txt")).strip() == "kept"


@pytest.mark.parametrize("events", [False, True], ids=["error-route-alone", "with-events"])
async def test_removed_container_is_never_a_502(
    caddy_bin: str, test_image: str, events: bool
) -> None:
    async with harness() as h:
        watcher = runtime_events.ContainerEvents(
            h.config.podman, h.store.instance_id, runtime_events.on_death(h.sessions)
        )
        if events:
            watcher.start()
        try:
            sid, c, first = await _session(h)
            poll = Poll(h, c)
            async with poll.running():
                await asyncio.sleep(2.5)
                t_kill = time.monotonic()
                await apodman("rm", "-f", "-t", "0", ids.container_name(sid))
                deadline = time.monotonic() + 60
                while poll.back_after(t_kill) < 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                await asyncio.sleep(2.0)
            _report(f"podman rm -f ({'events on' if events else 'no events'})", poll, t_kill)
            assert poll.back_after(t_kill) > 0, poll.seen
            await _check(poll, h, sid, first)
            if events:
                assert watcher.deaths >= 1 and watcher.streams == 1
        finally:
            await watcher.close()


async def test_hung_container_is_restarted_without_a_502(caddy_bin: str, test_image: str) -> None:
    async with harness() as h:
        sid, c, first = await _session(h)
        poll = Poll(h, c)
        async with poll.running():
            await asyncio.sleep(2.5)
            t_kill = time.monotonic()
            # Every process but the container's init: the server hangs, Podman still
            # reports the container running, connections are accepted and never answered.
            await apodman("exec", ids.container_name(sid), "/bin/busybox", "kill", "-STOP", "-1")
            deadline = time.monotonic() + 60
            while poll.back_after(t_kill) < 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(2.0)
        _report("SIGSTOP", poll, t_kill)
        assert poll.back_after(t_kill) > 0, poll.seen
        await _check(poll, h, sid, first)
        assert h.sessions.get(sid).restarts == 1
        # Found by the gate's check, not by health.interval (30 s here, never reached).
        assert poll.back_after(t_kill) < h.config.health_interval, poll.seen


def test_lovd_serve_learns_of_a_death_from_podman_events(tmp_path: Path, test_image: str) -> None:
    # health.interval of 10 minutes: only the events can explain a quick change.
    p = LovdProc(tmp_path, health={"interval": 600})
    try:
        p.start()
        _, _, s = p.api("POST", "/api/sessions")
        sid = s["id"]
        time.sleep(0.5)  # the events stream is followed from lovd's start; let it open
        t0 = time.monotonic()
        podman("rm", "-f", "-t", "0", f"lovd-{sid}")
        took = until_sync(
            lambda: p.api("GET", f"/api/sessions/{sid}")[2]["status"] != "running", 10
        )
        _, _, after = p.api("GET", f"/api/sessions/{sid}")
        assert after["status"] in ("stopped", "failed") and after["reason"], after
        print(
            f"lovd serve: the row left 'running' {took:.2f} s after podman rm -f "
            f"({time.monotonic() - t0:.2f} s with the API calls)"
        )
    finally:
        remove_all(p)


async def test_a_client_cannot_ask_for_the_failure_answer(caddy_bin: str) -> None:
    # The header of Caddy's error route, sent by a browser: stripped with every X-Lovd-*
    # header, so the request goes to the container as any other.
    async with harness() as h:
        up = await h.upstream("a")
        s, token = await h.fake_session(up)
        hdrs = {**cookie(s, token), **XHR, FAILED_HEADER: "502"}
        async with h.http.get(h.url + "/x", headers=hdrs) as r:
            assert r.status == 200, await r.text()
            echoed = await r.json()
        assert echoed["upstream"] == "a" and FAILED_HEADER not in echoed["headers"]
        assert h.sessions.get(s.id).status == "running"
