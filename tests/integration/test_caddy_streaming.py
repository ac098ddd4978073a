"""Streaming through Caddy + forward_auth: SSE unbuffered, WebSockets, idle streams, and
streams surviving other sessions' creates/deletes (no Caddy reload).

The streaming upstream is a host-side aiohttp server registered as a session row
(tests/integration/caddy_harness.py says why): the test image's busybox httpd cannot
stream, and OpenCode's own SSE is exercised by the browser test. The sessions created
and deleted around the stream are real containers.
"""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
import pytest

from tests.integration.caddy_harness import Harness, cookie, free_port, harness

pytestmark = [pytest.mark.caddy]

IDLE_SECONDS = float(os.environ.get("LOVD_IDLE_STREAM_SECONDS", "305"))


async def _events(resp: aiohttp.ClientResponse) -> asyncio.Queue[tuple[float, str]]:
    """Feed SSE data lines into a queue as they arrive."""
    q: asyncio.Queue[tuple[float, str]] = asyncio.Queue()

    async def pump() -> None:
        async for line in resp.content:
            text = line.decode().strip()
            if text.startswith("data: "):
                await q.put((time.monotonic(), text[6:]))
        await q.put((time.monotonic(), "<eof>"))

    task = asyncio.create_task(pump())
    q.task = task  # type: ignore[attr-defined]  # keep a reference
    return q


async def test_sse_streams_unbuffered(caddy_bin: str) -> None:
    async with harness() as h:
        up = await h.upstream("s")
        s, token = await h.fake_session(up)
        t0 = time.monotonic()
        async with h.http.get(
            h.url + "/sse?interval=0.5&count=4",
            headers={**cookie(s, token), "Accept": "text/event-stream"},
        ) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            q = await _events(r)
            first_at, first = await asyncio.wait_for(q.get(), 2)
            # The first event arrives while the upstream is still producing (not at the end).
            assert first == "s 0" and first_at - t0 < 0.4
            got = [first] + [(await asyncio.wait_for(q.get(), 3))[1] for _ in range(3)]
        assert got == ["s 0", "s 1", "s 2", "s 3"]


async def test_websocket_passes_through(caddy_bin: str) -> None:
    async with harness() as h:
        up = await h.upstream("w")
        s, token = await h.fake_session(up)
        async with h.http.ws_connect(
            h.url.replace("http", "ws") + "/ws", headers=cookie(s, token)
        ) as ws:
            await ws.send_str("hello")
            assert (await ws.receive_str(timeout=3)) == "w: hello"
        # Without a valid cookie the upgrade is refused by forward_auth.
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await h.http.ws_connect(h.url.replace("http", "ws") + "/ws")
        assert e.value.status == 401


async def _open_streams(
    h: Harness,
) -> tuple[
    aiohttp.ClientResponse, aiohttp.ClientWebSocketResponse, asyncio.Queue[tuple[float, str]]
]:
    up = await h.upstream("keep")
    s, token = await h.fake_session(up)
    resp = await h.http.get(
        h.url + "/sse?interval=0.1",
        headers={**cookie(s, token), "Accept": "text/event-stream"},
        timeout=aiohttp.ClientTimeout(),
    )
    assert resp.status == 200
    ws = await h.http.ws_connect(h.url.replace("http", "ws") + "/ws", headers=cookie(s, token))
    return resp, ws, await _events(resp)


async def test_streams_survive_20_session_creates_and_deletes(
    caddy_bin: str, test_image: str
) -> None:
    async with harness() as h:
        resp, ws, q = await _open_streams(h)
        applies = h.manager.applies
        before = await h.manager.current()
        last = -1
        t0 = time.monotonic()
        for i in range(20):
            s, token = await h.sessions.create(wait=True)
            async with h.http.get(h.url + "/cgi-bin/echo", headers=cookie(s, token)) as r:
                assert r.status == 200  # the new session is routable at once
            await h.sessions.delete(s.id)
            # The stream is still the same connection and still flowing, gap-free.
            while not q.empty():
                _, data = q.get_nowait()
                assert data != "<eof>", f"SSE stream closed after {i} creates/deletes"
                n = int(data.split()[1])
                assert n == last + 1
                last = n
            await ws.send_str(f"ping {i}")
            assert (await ws.receive_str(timeout=3)) == f"keep: ping {i}"
        elapsed = time.monotonic() - t0
        await asyncio.sleep(0.3)
        _, data = await asyncio.wait_for(q.get(), 2)
        assert data != "<eof>"
        assert h.manager.applies == applies  # lovd wrote nothing to Caddy
        assert await h.manager.current() == before
        print(f"20 creates/deletes in {elapsed:.1f} s; SSE events seen: {last + 1}")

        # Control: a real Caddy config change does close the WebSocket on 2.6, so the
        # assertions above would have caught a per-session reload.
        await h.manager.admin.send(
            "PATCH", "/id/lovd/listen", [f"127.0.0.1:{h.port}", f"127.0.0.1:{free_port()}"]
        )
        msg = await ws.receive(timeout=5)
        assert msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        )
        await ws.close()
        resp.close()


async def test_idle_stream_survives_five_minutes(caddy_bin: str) -> None:
    """An SSE stream with no traffic for IDLE_SECONDS (default 305) stays open."""
    async with harness() as h:
        up = await h.upstream("idle")
        s, token = await h.fake_session(up)
        async with h.http.get(
            h.url + f"/idle?seconds={IDLE_SECONDS}",
            headers={**cookie(s, token), "Accept": "text/event-stream"},
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        ) as r:
            q = await _events(r)
            assert (await asyncio.wait_for(q.get(), 3))[1] == "hello"
            t0 = time.monotonic()
            at, data = await asyncio.wait_for(q.get(), IDLE_SECONDS + 30)
            assert data == "still here", data
            assert at - t0 >= IDLE_SECONDS - 1
