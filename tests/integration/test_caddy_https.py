"""The site over HTTPS on a host without a public name (``caddy.tls``), through a real
Caddy 2.6 holding the operator's own certificate (a self-signed one for 127.0.0.1,
loaded into its tls app): the landing page, the start, a gated call and an event stream
all answer over HTTP/2, and the session cookie is the ``__Host-`` Secure one.

aiohttp speaks only HTTP/1.1, so the requests go through curl (``--http2``, trusting the
harness's certificate): what a browser gets, one multiplexed connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from lovd.caddy import CaddyAdmin, CaddyManager, Site
from tests.conftest import need
from tests.integration.caddy_harness import CaddyProc, Harness, SiteCert, harness
from tests.waiting import until

pytestmark = [pytest.mark.caddy]

NAV = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate"}


@pytest.fixture(scope="module")
def curl() -> str:
    path = shutil.which("curl")
    need(path is not None, "curl is not installed (apt-get install curl)")
    assert path is not None
    return path


@dataclass
class Answer:
    version: str  # "2" for HTTP/2
    status: int
    headers: dict[str, str]  # lower-case names (HTTP/2 sends them so)
    body: str


def _curl_args(h: Harness, path: str, headers: dict[str, str], *more: str) -> list[str]:
    assert h.tls is not None
    args = ["curl", "--http2", "--cacert", str(h.tls.cert), "-sS", "-D", "-", *more]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    return [*args, h.url + path]


async def _curl(h: Harness, path: str, headers: dict[str, str] | None = None, *more: str) -> Answer:
    proc = await asyncio.create_subprocess_exec(
        *_curl_args(h, path, headers or {}, *more),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    head, _, body = out.decode().partition("\r\n\r\n")
    status_line, *lines = head.split("\r\n")
    proto, status = status_line.split()[:2]
    fields = dict(line.split(": ", 1) for line in lines)
    return Answer(proto.removeprefix("HTTP/"), int(status), fields, body)


async def test_site_over_https_and_http2(caddy_bin: str, test_image: str, curl: str) -> None:
    async with harness(https=True) as h:
        assert h.url.startswith("https://127.0.0.1:")
        admin = CaddyAdmin(h.caddy.admin_address)
        try:
            server = await admin.get("/id/lovd")
            # lovd's own server only: TLS with what Caddy has loaded, no ACME, no redirects.
            assert server["tls_connection_policies"] == [{}]
            assert server["automatic_https"] == {"disable": True}
            # The certificate stays the operator's business: lovd leaves Caddy's tls app be.
            assert h.tls is not None
            assert await admin.get("/config/apps/tls") == h.tls.caddy_config()["apps"]["tls"]
        finally:
            await admin.close()

        landing = await _curl(h, "/", NAV)
        assert (landing.version, landing.status) == ("2", 200)
        assert 'action="/_lovd/start"' in landing.body

        # The start: a Secure __Host- cookie (HTTPS as Caddy told lovd, X-Forwarded-Proto).
        start = await _curl(
            h, "/_lovd/start", {"Origin": h.url, "Sec-Fetch-Site": "same-origin"}, "-X", "POST"
        )
        assert (start.version, start.status) == ("2", 303), start
        set_cookie = start.headers["set-cookie"]
        assert set_cookie.startswith("__Host-lovd_session="), set_cookie
        assert "Secure" in set_cookie and "HttpOnly" in set_cookie and "Path=/" in set_cookie
        value = set_cookie.split(";", 1)[0]
        sid = value.split("=", 1)[1].split(".", 1)[0]

        async def ready() -> bool:
            status = await _curl(h, "/_lovd/status", {"Cookie": value})
            assert status.status == 200, status
            return bool(json.loads(status.body)["ready"])

        await until(ready, 30, "/_lovd/status ready", step=0.2)
        # A gated call reaches the container, over HTTP/2.
        echo = await _curl(h, "/cgi-bin/echo", {"Cookie": value})
        assert (echo.version, echo.status) == ("2", 200), echo
        assert json.loads(echo.body)["session_id"] == sid
        # Under an https public_url the plain cookie name is not read (cookie tossing).
        plain = value.replace("__Host-lovd_session=", "lovd_session=")
        refused = await _curl(h, "/cgi-bin/echo", {"Cookie": plain, "Accept": "application/json"})
        assert refused.status == 401, refused


async def test_gated_call_and_event_stream_over_http2(caddy_bin: str, curl: str) -> None:
    # public_url left at http://: the Secure cookie can only come from the scheme Caddy
    # reports to lovd (X-Forwarded-Proto), whatever the client claims.
    async with harness(https=True, settings={"public_url": "http://localhost"}) as h:
        up = await h.upstream("s")
        s, _ = await h.fake_session(up)
        link = await h.sessions.new_link(s.id)
        entry = await _curl(h, f"/c/{s.id}?token={link}", {**NAV, "X-Forwarded-Proto": "http"})
        assert (entry.version, entry.status) == ("2", 303), entry
        set_cookie = entry.headers["set-cookie"]
        assert set_cookie.startswith(f"__Host-lovd_session={s.id}."), set_cookie
        assert "Secure" in set_cookie
        jar = {"Cookie": set_cookie.split(";", 1)[0]}
        # What reaches the session: the scheme Caddy saw, not what the client claims.
        echo = await _curl(h, "/x", {**jar, "X-Forwarded-Proto": "http"})
        assert (echo.version, echo.status) == ("2", 200), echo
        assert json.loads(echo.body)["headers"]["X-Forwarded-Proto"] == "https"

        # An event stream arrives event by event over HTTP/2: the first event is read
        # while the upstream still sleeps before the second (a buffered stream would
        # arrive whole, twice the interval later).
        interval = 5.0
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *_curl_args(
                h,
                f"/sse?interval={interval}&count=2",
                {**jar, "Accept": "text/event-stream"},
                "-N",
            ),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            lines: list[str] = []
            while "data: s 0" not in lines:
                line = await asyncio.wait_for(proc.stdout.readline(), 15)
                assert line, (lines, await proc.stderr.read() if proc.stderr else b"")
                lines.append(line.decode().strip())
            assert lines[0] == "HTTP/2 200", lines
            assert "content-type: text/event-stream" in lines, lines
            assert time.monotonic() - t0 < interval, lines
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def test_caddy_tls_without_a_certificate_is_reported(caddy_bin: str, tmp_path: Path) -> None:
    """caddy.tls on a Caddy that holds no certificate would fail every browser's
    handshake: lovd's Caddy health says so, and what to do; with one loaded it is fine."""
    site = Site("lovd", ("127.0.0.1:0",), str(tmp_path / "auth.sock"), tls=True)
    for extra, ok in ((None, False), (SiteCert.make(tmp_path).caddy_config(), True)):
        workdir = Path(tempfile.mkdtemp(prefix="lovd-caddy-", dir="/tmp"))
        caddy = CaddyProc(workdir, extra)
        await caddy.start()
        manager = CaddyManager(CaddyAdmin(caddy.admin_address), site, interval=1.0)
        try:
            await manager.check()
            healthy, detail = await manager.health()
            assert healthy is ok, detail
            if not ok:
                assert "caddy.tls is on but Caddy has no certificate" in detail
                assert "load_files" in detail
        finally:
            await manager.close()
            await caddy.stop()
            shutil.rmtree(workdir, ignore_errors=True)
