"""The first minute in Chromium, through lovd vs the same UI straight from a container.

    (as lovd) python -m tests.bench.bench_browser [--profiles 10] [--returning 3] [--trace]

Real Caddy, lovd's browser path, real OpenCode session containers
(localhost/lovd-session:latest) with a warm pool of one, Debian's Chromium driven by
tests/browser/click.mjs (playwright-core; run tests/browser/setup.sh first). For each
network row (none; 40 ms / 20 Mbit/s; 150 ms / 4 Mbit/s, CDP throttling), interleaved:

- lovd: a fresh profile opens the landing page, reads for 2 s (the page's prefetch runs),
  clicks "start" with a prepared warm container ready → the chat's prompt is visible;
- direct: a fresh profile opens a new chat of a running container on its own port
  (HTTP Basic) → the prompt is visible. The floor: no lovd, no Caddy, no gate.

Per row: click → prompt p50/p95, bytes on the wire after the click (and before it: the
prefetch), requests after the click, how many lovd's gate answered (forward_auth
subrequests plus the start) — and lovd/direct ratios. Then returning visitors: the same
profile (HTTP cache kept, cookies cleared) clicks again on a new warm container.
Issue 17's targets: lovd/direct ≤ 0.6 at p50; first visit ≤ 1.5 MB; returning visitor
≤ 100 KB of UI files.

``--trace``: instead, PROFILES clicks each way with no throttling, and where the time
went: every request after the click (start, first byte, end in ms from the click) and
the main thread's busy time by kind (Chromium's trace).

The lovd side is served over HTTPS (caddy.tls, a self-signed certificate Chromium trusts
by its key, HTTP/2) as a deployment is reached; ``--scheme http`` measures it over plain
HTTP/1.1 (six connections per host, one of them held by the UI's event stream). The
direct side is always the container's own plain HTTP port.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import aiohttp

from lovd.web.allowlist import Allowlist
from tests.browser.test_first_minute import SESSION_IMAGE, click, warm_ready
from tests.integration.caddy_harness import Harness, harness

ROWS: list[tuple[str, dict[str, float] | None]] = [
    ("none", None),
    ("40 ms, 20 Mbit/s", {"latency_ms": 40, "mbit": 20}),
    ("150 ms, 4 Mbit/s", {"latency_ms": 150, "mbit": 4}),
]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def progress(what: str) -> None:
    print(what, file=sys.stderr, flush=True)


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


async def lovd_click(
    h: Harness,
    counter: Counter,
    throttle: dict[str, float] | None,
    profile: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    await warm_ready(h)
    before = {s.id for s in h.sessions.all()}
    n0 = counter.n
    spec: dict[str, Any] = {"mode": "lovd", "base": h.url, "read_ms": 2000, "throttle": throttle}
    if h.tls is not None:
        spec["spki"] = h.tls.spki  # trusted by its key: the HTTP cache stays on
    if profile is not None:
        spec.update(profile=profile, clear_cookies=True)
    spec.update(extra)
    r = await click(**spec)
    # Every answer of lovd's public socket during the visit: the landing page, the start,
    # and each forward_auth subrequest (the UI's HTML shell and API calls).
    r["gate_answers"] = counter.n - n0
    new = [s for s in h.sessions.all() if s.id not in before]
    r["sid"] = new[0].id if new else ""
    return r


async def direct_click(
    h: Harness,
    http: aiohttp.ClientSession,
    sid: str,
    throttle: dict[str, float] | None,
    **extra: Any,
) -> dict[str, Any]:
    # The same quiet machine as the lovd click had: the warm pool's refill (which lovd
    # starts warm_refill_delay after a claim) done, not booting a container meanwhile.
    await warm_ready(h)
    s = h.sessions.get(sid)
    auth = h.sessions.container_auth(sid)
    base = f"http://127.0.0.1:{s.port}"
    async with http.post(base + "/session", json={}, headers={"Authorization": auth}) as resp:
        chat = (await resp.json())["id"]
    folder = base64.urlsafe_b64encode(b"/work").decode().rstrip("=")
    user, _, password = base64.b64decode(auth.split(" ", 1)[1]).decode().partition(":")
    return await click(
        mode="direct",
        url=f"{base}/{folder}/session/{chat}",
        user=user,
        password=password,
        throttle=throttle,
        **extra,
    )


def protocols(results: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]) -> str:
    """The protocols the lovd side's responses came over, as Chromium reported them."""
    seen: dict[str, int] = {}
    for lovd, _ in results.values():
        for r in lovd:
            for proto, n in r.get("protocols", {}).items():
                seen[proto] = seen.get(proto, 0) + n
    return ", ".join(f"{p} {n}" for p, n in sorted(seen.items())) or "none seen"


def row_line(name: str, lovd: list[dict[str, Any]], direct: list[dict[str, Any]]) -> str:
    lt = [r["click_to_prompt_ms"] / 1000 for r in lovd if r["ok"]]
    dt = [r["click_to_prompt_ms"] / 1000 for r in direct if r["ok"]]

    def med(rs: list[dict[str, Any]], k: str) -> float:
        vals = [float(r[k]) for r in rs if r["ok"]]
        return statistics.median(vals) if vals else float("nan")

    return (
        f"| {name} | {pct(lt, 50):.2f} s / {pct(lt, 95):.2f} s | {pct(dt, 50):.2f} s / "
        f"{pct(dt, 95):.2f} s | {pct(lt, 50) / pct(dt, 50):.2f} | "
        f"{med(lovd, 'api_ttfb_ms'):.0f} / {med(direct, 'api_ttfb_ms'):.0f} ms "
        f"({med(lovd, 'api_ttfb_ms') / med(direct, 'api_ttfb_ms'):.2f}) | "
        f"{med(lovd, 'bytes') / 1e6:.2f} MB (+{med(lovd, 'bytes_before_click') / 1e6:.2f} MB "
        f"before) | {med(direct, 'bytes') / 1e6:.2f} MB | {med(lovd, 'requests'):.0f} / "
        f"{med(direct, 'requests'):.0f} | {med(lovd, 'gate_answers'):.0f} | "
        f"{len(lt)}/{len(lovd)} ok, {len(dt)}/{len(direct)} ok |"
    )


class LoopLag:
    """How late this process's event loop (lovd's, in the harness) woke up a 10 ms
    sleep during a click: a long stall there holds every gated request."""

    def __init__(self) -> None:
        self.late: list[tuple[int, int]] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while True:
            t = loop.time()
            await asyncio.sleep(0.01)
            over = (loop.time() - t - 0.01) * 1000
            if over > 50:
                self.late.append((round((t - t0) * 1000), round(over)))


def show_trace(name: str, r: dict[str, Any]) -> None:
    print(f"\n{name}: click → prompt {r.get('click_to_prompt_ms')} ms {r.get('error', '')}")
    print("main thread:", r.get("main_thread"))
    print("  start  head   end method status bytes cached path")
    for start, head, end, method, status, size, cached, path in r.get("timeline", []):
        print(f"{start:7} {head:5} {end:5} {method:6} {status:3} {size:8} {cached!s:5} {path}")


async def main(profiles: int, returning: int, trace: bool = False, scheme: str = "https") -> None:
    counter = Counter()
    results: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    back: list[dict[str, Any]] = []
    load = os.getloadavg()
    async with (
        harness(
            image=SESSION_IMAGE,
            settings={
                "warm_pool": 1,
                "ready_timeout": 90,
                "limits": {"max_running": 6},
                # Every click comes from 127.0.0.1: no per-client start or place limit here
                # (the last row's session still runs when the returning visitors come).
                "browser": {"start_limit": 10000, "max_running_per_client": 0},
            },
            allowlist=Allowlist(),
            https=scheme == "https",
        ) as h,
        aiohttp.ClientSession() as http,
    ):
        h.gate.on_request = counter
        pool = asyncio.create_task(h.sessions.pool(max_age=3600).run())
        last = ""
        try:
            if trace:
                for _ in range(profiles):
                    lag = LoopLag()
                    watch = asyncio.create_task(lag.run())
                    r = await lovd_click(h, counter, None, trace=True)
                    watch.cancel()
                    show_trace("lovd", r)
                    print("lovd's event loop, late wake-ups over 50 ms:", lag.late)
                    if r["sid"]:
                        if last:
                            await h.sessions.delete(last, "bench")
                        last = r["sid"]
                        show_trace("direct", await direct_click(h, http, last, None, trace=True))
                return
            for name, throttle in ROWS:
                lovd: list[dict[str, Any]] = []
                direct: list[dict[str, Any]] = []
                for i in range(profiles):
                    r = await lovd_click(h, counter, throttle)
                    lovd.append(r)
                    progress(
                        f"{name} lovd {i}: {r.get('click_to_prompt_ms')} ms {r.get('error', '')}"
                    )
                    if r["sid"]:
                        if last:
                            await h.sessions.delete(last, "bench")
                        last = r["sid"]
                    if last:
                        d = await direct_click(h, http, last, throttle)
                        direct.append(d)
                        progress(f"{name} direct {i}: {d.get('click_to_prompt_ms')} ms")
                results[name] = (lovd, direct)
                progress(row_line(name, lovd, direct))
            for i in range(returning):
                profile = tempfile.mkdtemp(prefix="lovd-bench-")
                try:
                    first = await lovd_click(h, counter, None, profile)
                    again = await lovd_click(h, counter, None, profile)
                finally:
                    shutil.rmtree(profile, ignore_errors=True)
                for r in (first, again):
                    if r["sid"]:
                        await h.sessions.delete(r["sid"], "bench")
                back.append(again)
                progress(
                    f"returning {i}: {again.get('click_to_prompt_ms')} ms, "
                    f"{again.get('asset_bytes')} B of UI files {first.get('error', '')} "
                    f"{again.get('error', '')}"
                )
        finally:
            pool.cancel()
    print(
        f"\nbench_browser: {profiles} fresh profiles per row, load average at start "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; lovd over {scheme} "
        f"({protocols(results)}), direct over http\n"
    )
    print(
        "| network | lovd p50 / p95 | direct p50 / p95 | lovd/direct p50 | API call TTFB "
        "p50 lovd / direct | lovd bytes after "
        "click | direct bytes | requests lovd / direct | lovd answers per visit | runs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (lovd, direct) in results.items():
        print(row_line(name, lovd, direct))
    ok = [r for r in back if r["ok"]]
    if ok:
        t = [r["click_to_prompt_ms"] / 1000 for r in ok]
        ab = [r["asset_bytes"] for r in ok]
        wire = statistics.median([r["bytes"] for r in ok]) / 1e6
        print(
            f"| returning (none) | p50 {pct(t, 50):.2f} s | | | | {wire:.2f} MB, UI files "
            f"{statistics.median(ab) / 1e3:.0f} KB | | | | {len(ok)}/{len(back)} ok |"
        )
    first = [r for r in results.get("none", ([], []))[0] if r["ok"]]
    if first:
        total = statistics.median([r["bytes"] + r["bytes_before_click"] for r in first])
        print(f"\nfirst visit on the wire (landing + prefetch + click): {total / 1e6:.2f} MB")
        print("biggest after the click:", first[0]["biggest"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", type=int, default=10)
    ap.add_argument("--returning", type=int, default=3)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument(
        "--scheme",
        choices=("https", "http"),
        default="https",
        help="the lovd side over HTTPS/HTTP/2 (caddy.tls, as deployed) or plain HTTP/1.1",
    )
    a = ap.parse_args()
    asyncio.run(main(a.profiles, a.returning, a.trace, a.scheme))
