"""Benchmark of the browser path, measured in one run; prints a table.

    /tmp/as_lovd python -m tests.bench.bench_proxy [--requests 2000] [--seconds 5]

1. Added latency: GET /global/health of a real session container (the test image),
   directly (with the container's Basic auth) vs through Caddy + forward_auth + lovd
   (with the session cookie); sequential requests, p50/p99, and the difference.
2. Requests/s through the proxy for one session (concurrency 32), and direct.
3. Route publish/retire with 200 live sessions. With forward_auth nothing is pushed to
   Caddy: a session is routable once its row is committed. Measured honestly end to end:
   from the start of the store write to the first request through Caddy that reaches the
   upstream (publish) or is refused with 401 (retire).
   Baseline: per-session "@id" routes in Caddy (cookie-matched reverse_proxy), 200 of them,
   added/removed through the admin API: from the start of the admin call to the first
   request that is routed (publish) or no longer routed (retire).

Upstreams for (3) are a host-side aiohttp server, so that container start time (measured
elsewhere) does not hide the routing cost.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

import aiohttp

from lovd import ids
from lovd.caddy import CaddyAdmin
from tests.integration.caddy_harness import Harness, HostUpstream, cookie, free_port, harness
from tests.waiting import until

LIVE = 200
DISCONNECTS = [0]
ROUNDS = 50


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def sequential(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], n: int
) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with http.get(url, headers=headers) as r:
            await r.read()
            assert r.status == 200, r.status
        out.append(time.perf_counter() - t0)
    return out


async def throughput(url: str, headers: dict[str, str], seconds: float, conc: int = 32) -> float:
    done = 0
    stop = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=conn, cookie_jar=aiohttp.DummyCookieJar()) as http:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                async with http.get(url, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(conc)])
        return done / (time.perf_counter() - t0)


async def status_of(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with http.get(url, headers=headers) as r:
        await r.read()
        return r.status


async def forward_auth_publish(h: Harness, up: HostUpstream) -> tuple[list[float], list[float]]:
    for i in range(LIVE):
        await h.fake_session(up, port=40000 + i)  # live rows; only their count matters
    pub, ret = [], []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        s, token = await h.fake_session(up)
        hdr = cookie(s, token)
        await until(lambda hdr=hdr: _is(h, hdr, 200))  # type: ignore[misc]
        pub.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await h.store.delete(s.id, "bench")
        await until(lambda hdr=hdr: _is(h, hdr, 401))  # type: ignore[misc]
        ret.append(time.perf_counter() - t0)
    return pub, ret


async def _is(h: Harness, hdr: dict[str, str], want: int) -> bool:
    got = await status_of(h.http, h.url + "/x", hdr)
    if got not in (200, 401):
        raise RuntimeError(f"unexpected HTTP {got}")
    return got == want


async def id_routes_baseline(h: Harness, up: HostUpstream) -> tuple[list[float], list[float]]:
    """Per-session @id routes in a second server of the same Caddy."""
    admin = CaddyAdmin(h.caddy.admin_address, timeout=30)
    port = free_port()
    url = f"http://127.0.0.1:{port}/x"
    fallback = {"handle": [{"handler": "static_response", "status_code": 401}]}
    await admin.send(
        "POST",
        "/config/apps/http/servers/baseline",
        {
            "listen": [f"127.0.0.1:{port}"],
            "routes": [fallback],
            "automatic_https": {"disable": True},
        },
    )

    def route(rid: str) -> dict[str, Any]:
        return {
            "@id": f"sess-{rid}",
            "match": [{"header": {"Cookie": [f"*lovd_session={rid}.*"]}}],
            "handle": [
                {
                    "handler": "reverse_proxy",
                    "flush_interval": -1,
                    "upstreams": [{"dial": f"127.0.0.1:{up.port}"}],
                }
            ],
        }

    routes_path = "/config/apps/http/servers/baseline/routes"
    for _ in range(LIVE):
        await admin.send("PUT", routes_path + "/0", route(ids.new_session_id()))
    pub, ret = [], []
    try:
        for _ in range(ROUNDS):
            rid = ids.new_session_id()
            hdr = {"Cookie": f"lovd_session={rid}.t"}
            t0 = time.perf_counter()
            await admin.send("PUT", routes_path + "/0", route(rid))
            await until(lambda hdr=hdr: _url_is(h, url, hdr, 200))  # type: ignore[misc]
            pub.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            status, body = await admin.request("DELETE", f"/id/sess-{rid}")
            assert status == 200, body
            await until(lambda hdr=hdr: _url_is(h, url, hdr, 401))  # type: ignore[misc]
            ret.append(time.perf_counter() - t0)
    finally:
        await admin.request("DELETE", "/config/apps/http/servers/baseline")
        await admin.close()
    return pub, ret


async def _url_is(h: Harness, url: str, hdr: dict[str, str], want: int) -> bool:
    try:
        return await status_of(h.http, url, hdr) == want
    except aiohttp.ServerDisconnectedError:
        # A reload closes keep-alive connections held by the old config; try again.
        DISCONNECTS[0] += 1
        return False


def progress(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def ms(x: float) -> str:
    return f"{x * 1000:8.3f}"


async def main(requests: int, seconds: float) -> None:
    # Retire checks are 401s with a cookie, which the per-client failure limit counts.
    async with harness(settings={"browser": {"auth_failures": 10**9}}) as h:
        s, token = await h.sessions.create(wait=True)
        direct = f"http://127.0.0.1:{s.port}/global/health"
        proxied = h.url + "/global/health"
        basic = {"Authorization": h.env.basic_auth(s.id)}
        hdr = cookie(s, token)
        # Warm up both paths (connections, caches), then measure interleaved blocks.
        await sequential(h.http, direct, basic, 100)
        await sequential(h.http, proxied, hdr, 100)
        d: list[float] = []
        p: list[float] = []
        for _ in range(10):
            d += await sequential(h.http, direct, basic, requests // 10)
            p += await sequential(h.http, proxied, hdr, requests // 10)
        progress("latency done")
        rps_proxy = await throughput(proxied, hdr, seconds)
        rps_direct = await throughput(direct, basic, seconds)

        progress("throughput done")
        up = await h.upstream("bench")
        fa_pub, fa_ret = await forward_auth_publish(h, up)
        progress("forward_auth publish/retire done")
        id_pub, id_ret = await id_routes_baseline(h, up)
        progress("baseline done")
        applies = h.manager.applies

    print()
    print(
        f"lovd browser path benchmark (Caddy 2.6, {requests} sequential requests per path,"
        f" {seconds:g} s throughput runs, {LIVE} live sessions, {ROUNDS} publish rounds)"
    )
    print()
    print(f"{'measurement':58} {'p50 ms':>8} {'p99 ms':>8}")
    print("-" * 76)
    print(f"{'GET /global/health direct to the container':58} {ms(pct(d, 50))} {ms(pct(d, 99))}")
    print(
        f"{'GET /global/health via Caddy + forward_auth + lovd':58} "
        f"{ms(pct(p, 50))} {ms(pct(p, 99))}"
    )
    print(
        f"{'  added by the proxy path':58} {ms(pct(p, 50) - pct(d, 50))} "
        f"{ms(pct(p, 99) - pct(d, 99))}"
    )
    print(
        f"{'publish: forward_auth (row committed -> routed)':58} "
        f"{ms(pct(fa_pub, 50))} {ms(pct(fa_pub, 99))}"
    )
    print(
        f"{'retire:  forward_auth (row deleted -> 401)':58} "
        f"{ms(pct(fa_ret, 50))} {ms(pct(fa_ret, 99))}"
    )
    print(
        f"{'publish: baseline @id route via admin API (200 routes)':58} "
        f"{ms(pct(id_pub, 50))} {ms(pct(id_pub, 99))}"
    )
    print(
        f"{'retire:  baseline @id route via admin API (200 routes)':58} "
        f"{ms(pct(id_ret, 50))} {ms(pct(id_ret, 99))}"
    )
    print("-" * 76)
    print(f"{'requests/s, one session, 32 concurrent, via proxy':58} {rps_proxy:17.0f}")
    print(f"{'requests/s, one session, 32 concurrent, direct':58} {rps_direct:17.0f}")
    print(f"{'Caddy config writes by lovd during the run':58} {applies:17d}")
    print(f"{'keep-alive connections dropped by baseline reloads':58} {DISCONNECTS[0]:17d}")
    print(f"(mean added latency {1000 * (statistics.mean(p) - statistics.mean(d)):.3f} ms)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    asyncio.run(main(a.requests, a.seconds))
