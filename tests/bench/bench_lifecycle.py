"""Benchmark of the session lifecycle, measured in one run; prints a table.

    runuser -u lovd -- python -m tests.bench.bench_lifecycle [--sizes 50,100,200]

1. Re-adoption after ``kill -9`` of lovd with N live sessions (the tiny test image, the
   podman runner): lovd's own "reconciled in X s" line and the time from exec to the
   first answered API request, for each N (the sessions are added between rounds).
2. Health-loop CPU with the largest N: lovd's CPU time (utime + stime from /proc) over
   several passes at a short health.interval, per pass, and as a share of one core at
   the default health.interval (30 s).
3. Wake vs cold create with the real OpenCode image: create→ready of a cold session,
   then the same session idle-stopped and woken by its browser's next request (Caddy's
   forward_auth subrequest on lovd's public socket, held until ready) → first byte.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from tests.lovdproc import LovdProc, cookie_of, forward_auth, remove_all

TEST_IMAGE = "localhost/lovd-test:latest"
SESSION_IMAGE = "localhost/lovd-session:latest"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def readoption(sizes: list[int], health_seconds: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lovd-bench-life-"))
    top = max(sizes)
    p = LovdProc(
        tmp,
        image=TEST_IMAGE,
        port_range=f"31000-{31000 + top + 50}",
        limits={"max_running": top + 10, "memory": "64M"},
        health={"interval": 5.0},
        idle_timeout=0,
        unused_timeout=0,
        egress={"enforce": False},  # the hook's cost is per start, not per adoption
    )
    p.start()
    try:
        made = 0
        print(f"{'live sessions':>14} {'reconcile':>11} {'exec→API':>10}")
        for n in sizes:
            while made < n:
                status, _, s = p.api("POST", "/api/sessions")
                assert status == 201, s
                made += 1
            p.kill9()
            mark = p.log_path.stat().st_size
            t0 = time.monotonic()
            p.start(timeout=120)
            ready = time.monotonic() - t0
            text = p.log_path.read_text()[mark:]
            found = re.search(r"reconciled in ([0-9.]+) s: (\d+) adopted", text)
            assert found and int(found.group(2)) == n, text[-2000:]
            print(f"{n:>14} {float(found.group(1)) * 1000:>9.0f} ms {ready * 1000:>7.0f} ms")
        # 2. health-loop CPU with `top` sessions: passes every 5 s.
        assert p.proc is not None
        time.sleep(6)  # past start-up
        c0, t0 = cpu_seconds(p.proc.pid), time.monotonic()
        time.sleep(health_seconds)
        used, wall = cpu_seconds(p.proc.pid) - c0, time.monotonic() - t0
        passes = wall / 5.0
        per_pass = used / passes
        print(
            f"\nhealth loop with {top} sessions: {used:.2f} s CPU in {wall:.0f} s "
            f"({passes:.0f} passes): {per_pass * 1000:.0f} ms per pass = "
            f"{per_pass / 30 * 100:.2f} % of one core at health.interval 30 s "
            f"({used / wall * 100:.1f} % at 5 s)"
        )
    finally:
        remove_all(p)


def wake_vs_cold(runs: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lovd-bench-wake-"))
    # A short idle_timeout: lovd's own housekeeping idle-stops each session in seconds.
    p = LovdProc(
        tmp,
        image=SESSION_IMAGE,
        demo="on",
        demo_mcp_port=0,
        demo_llm_port=0,
        ready_timeout=90,
        idle_timeout=3,
        unused_timeout=0,
    )
    p.start()
    cold: list[float] = []
    wake: list[float] = []
    try:
        for _ in range(runs):
            t0 = time.monotonic()
            status, _, s = p.api("POST", "/api/sessions")
            assert status == 201 and s["status"] == "running", s
            cold.append(time.monotonic() - t0)
            sid = s["id"]
            deadline = time.monotonic() + 30
            while p.api("GET", f"/api/sessions/{sid}")[2]["status"] != "idle-stopped":
                assert time.monotonic() < deadline, "not idle-stopped"
                time.sleep(0.2)
            t0 = time.monotonic()
            status, headers, _ = forward_auth(p, sid, cookie_of(p, s))
            assert status == 204, (status, headers)
            wake.append(time.monotonic() - t0)
            p.api("DELETE", f"/api/sessions/{sid}")
        c, w = statistics.median(cold), statistics.median(wake)
        print(
            f"\nOpenCode image, {runs} runs: cold create→ready p50 {c:.3f} s; "
            f"wake of an idle-stopped session → request allowed p50 {w:.3f} s "
            f"({w / c:.2f}x cold)"
        )
    finally:
        remove_all(p)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="50,100,200")
    ap.add_argument("--health-seconds", type=float, default=30.0)
    ap.add_argument("--wake-runs", type=int, default=5)
    args = ap.parse_args()
    if args.sizes:
        readoption([int(x) for x in args.sizes.split(",")], args.health_seconds)
    wake_vs_cold(args.wake_runs)
