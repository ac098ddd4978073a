"""The gate's cost under the UI's burst: lovd's forward_auth answer vs a bare aiohttp one.

    (as lovd) python -m tests.bench.bench_gate [--bursts 30] [--path /global/health]

Real Caddy, three servers rendered by lovd/caddy.py: one whose forward_auth asks lovd's
gate (web/gate.py: cookie, allowlist, activity), one whose forward_auth asks a bare
aiohttp handler on its own unix socket that answers 204 with the same upstream (the
floor: what any forward_auth costs), and one whose bare handler also hands Caddy the
container's Authorization header, with the browser's session cookie (what carrying
lovd's credential costs, whatever checks it: the gate's own logic is the rest). All
proxy to the same host-side upstream; the last row is that upstream directly. A burst
is what the chat UI sends when it opens: 44 GETs, 6 at a time (a browser's connections
per host over HTTP/1.1). Reports time to first byte p50/p95 per request and each
burst's wall time. Issue 17's target: lovd's gate at most 1.2 times the bare handler.
Everything but Caddy runs in this one process, so load from elsewhere on the machine
moves the ratios: compare runs made at the same time (the paths are interleaved).

The requests ask the stand-in's ``/global/health``, a small answer of the same size on
every path, as OpenCode's API answers are. ``--path /cgi-bin/echo`` (what this bench
asked before) answers with the request's headers, so on lovd's path alone (the session
cookie, the container's Authorization header) the upstream's answer is larger: the
"bare + credential" row shows how much of that path's time this costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import time

import aiohttp
from aiohttp import web

from lovd.caddy import UPSTREAM_HEADER, CaddyManager, Site
from tests.integration.caddy_harness import cookie, free_port, harness

BURST = 44
CONCURRENCY = 6


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def bare_gate(path: str, upstream: str, auth_header: str = "") -> web.AppRunner:
    answer = {UPSTREAM_HEADER: upstream}
    if auth_header:
        answer |= {"Authorization": auth_header, "Cache-Control": "no-store"}

    async def auth(request: web.Request) -> web.Response:
        return web.Response(status=204, headers=answer)

    app = web.Application()
    app.router.add_get("/_lovd/auth", auth)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(256)
    await web.SockSite(runner, sock).start()
    return runner


async def routable(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
    """Wait until Caddy serves a server it was just given."""
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{url}/cgi-bin/echo", headers=headers) as r:
                if r.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"Caddy does not serve {url}")
        await asyncio.sleep(0.05)


async def burst(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], path: str
) -> tuple[list[float], float]:
    sem = asyncio.Semaphore(CONCURRENCY)
    ttfb: list[float] = []

    async def one(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            async with http.get(f"{url}{path}?n={i}", headers=headers) as r:
                await r.content.read(1)
                ttfb.append(time.perf_counter() - t0)
                assert r.status == 200, r.status
                await r.read()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(BURST)))
    return ttfb, time.perf_counter() - t0


async def main(bursts: int, path: str) -> None:
    async with harness() as h:
        up = await h.upstream("bench")
        s, token = await h.fake_session(up)
        bare_sock = str(h.dir / "bare.sock")
        runner = await bare_gate(bare_sock, f"127.0.0.1:{up.port}")
        port = free_port()
        bare = CaddyManager(
            h.manager.admin,
            Site(name="lovd-bare", listen=(f"127.0.0.1:{port}",), auth_socket=bare_sock),
        )
        await bare.apply()
        cred_sock = str(h.dir / "cred.sock")
        cred_runner = await bare_gate(
            cred_sock, f"127.0.0.1:{up.port}", h.sessions.container_auth(s.id)
        )
        cred_port = free_port()
        cred = CaddyManager(
            h.manager.admin,
            Site(name="lovd-cred", listen=(f"127.0.0.1:{cred_port}",), auth_socket=cred_sock),
        )
        await cred.apply()
        paths = {
            "lovd gate": (h.url, cookie(s, token)),
            "bare forward_auth": (f"http://127.0.0.1:{port}", {"Cookie": "x=1"}),
            "bare + credential": (f"http://127.0.0.1:{cred_port}", cookie(s, token)),
            "direct": (f"http://127.0.0.1:{up.port}", {}),
        }
        results: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in paths}
        conn = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=conn) as http:
            for url, hdr in paths.values():  # warm-up
                await routable(http, url, hdr)
                await burst(http, url, hdr, path)
            for _ in range(bursts):
                for name, (url, hdr) in paths.items():  # interleaved
                    ttfb, wall = await burst(http, url, hdr, path)
                    results[name][0].extend(ttfb)
                    results[name][1].append(wall)
        await bare.remove()
        await cred.remove()
        await runner.cleanup()
        await cred_runner.cleanup()
    load = os.getloadavg()
    print(
        f"\nbench_gate: {bursts} bursts of {BURST} GETs of {path} ({CONCURRENCY} at a time) "
        "per path, "
        f"load average {load[0]:.1f} on {os.cpu_count()} cores\n"
    )
    print("| path | TTFB p50 | TTFB p95 | burst p50 | vs bare |")
    print("|---|---|---|---|---|")
    bare_p50 = pct(results["bare forward_auth"][0], 50)
    for name, (ttfb, walls) in results.items():
        print(
            f"| {name} | {pct(ttfb, 50) * 1000:.1f} ms | {pct(ttfb, 95) * 1000:.1f} ms | "
            f"{statistics.median(walls) * 1000:.0f} ms | {pct(ttfb, 50) / bare_p50:.2f} |"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--bursts", type=int, default=30)
    ap.add_argument("--path", default="/global/health")
    args = ap.parse_args()
    asyncio.run(main(args.bursts, args.path))
