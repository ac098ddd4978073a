#!/usr/bin/env python3
"""Core benchmarks, measured in one run with their baselines (run as the lovd user).

1. session create→ready (POST /api/sessions, waits for the health probe) vs a bare
   ``podman run -d`` of the same image until its first HTTP byte: p50/p95 and ratio.
2. ``GET /api/sessions/{id}`` requests/s over the unix socket with 100 sessions in
   the store, lovd pinned to one core, vs a bare aiohttp app answering the same JSON
   on the same kind of socket (the framework's floor).
3. lovd's RSS with 0 and with 100 sessions.

    python tests/bench/bench_core.py [--runs 15] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.lovdproc import LovdProc, podman

IMAGE = "localhost/lovd-test:latest"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def first_byte(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.3) as s:
                s.settimeout(0.3)
                s.sendall(b"GET /global/health HTTP/1.0\r\n\r\n")
                if s.recv(1):
                    return
        except OSError:
            pass
        time.sleep(0.01)
    raise TimeoutError("no first byte")


def bare_podman(runs: int) -> list[float]:
    out = []
    for i in range(runs):
        port = free_port()
        t0 = time.monotonic()
        podman(
            "run",
            "-d",
            "--rm",
            "--init",
            "--name",
            f"bench-bare-{i}",
            "-p",
            f"127.0.0.1:{port}:4096",
            IMAGE,
        )
        first_byte(port, t0 + 30)
        out.append(time.monotonic() - t0)
        podman("rm", "-f", "-t", "0", f"bench-bare-{i}")
    return out


def lovd_create(tmp: Path, runs: int) -> tuple[list[float], float]:
    p = LovdProc(tmp, limits={"max_running": 3}).start()
    try:
        out = []
        for _ in range(runs):
            t0 = time.monotonic()
            status, _, s = p.api("POST", "/api/sessions")
            out.append(time.monotonic() - t0)
            assert status == 201 and s["status"] == "running", s
            p.api("DELETE", f"/api/sessions/{s['id']}")
        return out, 0.0
    finally:
        p.stop()


REQ = "GET /api/sessions/{sid} HTTP/1.1\r\nHost: lovd\r\n\r\n"


async def _load(sock: str, paths: list[str], seconds: float, conns: int) -> int:
    done = 0
    stop = time.monotonic() + seconds

    async def worker(k: int) -> None:
        nonlocal done
        r, w = await asyncio.open_unix_connection(sock)
        i = k
        while time.monotonic() < stop:
            w.write(REQ.format(sid=paths[i % len(paths)]).encode())
            i += 1
            head = await r.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await r.readexactly(length)
            assert head.startswith(b"HTTP/1.1 200"), head[:40]
            done += 1
        w.close()

    await asyncio.gather(*(worker(k) for k in range(conns)))
    return done


def load(sock: str, ids: list[str], seconds: float, conns: int = 32) -> float:
    """Run the client pinned to the *other* core, in this process."""
    os.sched_setaffinity(0, {1})
    try:
        n = asyncio.run(_load(sock, ids, seconds, conns))
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return n / seconds


BARE_APP = """
import json, sys
from aiohttp import web
body = json.dumps({"id": "0" * 16, "status": "running", "reason": "", "url": "x" * 40,
    "container_id": "c" * 64, "port": 20000, "host_id": "h", "created_at": "t" * 20,
    "updated_at": "t" * 20, "expires_at": "t" * 20, "last_activity": "t" * 20, "restarts": 0})
async def get(request):
    return web.Response(text=body, content_type="application/json")
app = web.Application()
app.router.add_get("/api/sessions/{id}", get)
web.run_app(app, path=sys.argv[1], print=None, access_log=None)
"""


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _seed(db: Path, n: int) -> list[str]:
    from lovd import ids
    from lovd.store import Session, Store

    store = await Store.open(db)
    out = []
    now = time.time()
    for i in range(n):
        sid = ids.new_session_id()
        await store.insert(
            Session(
                sid,
                "stopped",
                "",
                ids.hash_token("t"),
                45000 + i,
                "",
                "h",
                now,
                now,
                now + 86400,
                now,
            )
        )
        out.append(sid)
    await store.close()
    return out


def api_bench(tmp: Path, seconds: float) -> dict[str, float]:
    res: dict[str, float] = {}
    # bare aiohttp baseline, pinned to core 0
    tmp.mkdir(parents=True, exist_ok=True)
    bsock = str(tmp / "bare.sock")
    bare = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", BARE_APP, bsock])
    try:
        while not os.path.exists(bsock):
            if bare.poll() is not None:
                raise RuntimeError("the baseline aiohttp app exited")
            time.sleep(0.05)
        time.sleep(0.3)
        res["bare_rps"] = load(bsock, ["0" * 16], seconds)
    finally:
        bare.terminate()
        bare.wait()

    p = LovdProc(tmp / "lovd")
    (tmp / "lovd" / "state").mkdir(parents=True)
    p.start()
    assert p.proc is not None
    time.sleep(1.0)
    res["rss0_kb"] = rss_kb(p.proc.pid)
    p.stop()
    sids = asyncio.run(_seed(tmp / "lovd" / "state" / "lovd.db", 100))
    p.start()
    assert p.proc is not None
    subprocess.run(["taskset", "-pc", "0", str(p.proc.pid)], check=True, capture_output=True)
    time.sleep(0.5)
    load(p.sock, sids, 1.0)  # warm up
    res["lovd_rps"] = load(p.sock, sids, seconds)
    res["rss100_kb"] = rss_kb(p.proc.pid)
    p.stop()
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    if os.geteuid() == 0:
        print("run as the lovd user (rootless Podman)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="lovd-bench-"))
    try:
        bare = bare_podman(args.runs)
        created, _ = lovd_create(tmp / "create", args.runs)
        api = api_bench(tmp / "api", args.seconds)
    except BaseException:
        print(f"bench failed; logs kept in {tmp}", file=sys.stderr)
        raise
    subprocess.run(["podman", "unshare", "rm", "-rf", str(tmp)], check=False)
    shutil.rmtree(tmp, ignore_errors=True)
    b50, l50 = statistics.median(bare), statistics.median(created)
    rows = [
        ("create→ready p50 (s)", f"{l50:.3f}", f"{b50:.3f}", f"{l50 / b50:.2f}x", "<= 1.3x"),
        (
            "create→ready p95 (s)",
            f"{pct(created, 95):.3f}",
            f"{pct(bare, 95):.3f}",
            f"{pct(created, 95) / pct(bare, 95):.2f}x",
            "",
        ),
        (
            "GET /api/sessions/{id} req/s, 1 core",
            f"{api['lovd_rps']:.0f}",
            f"{api['bare_rps']:.0f}",
            f"{api['lovd_rps'] / api['bare_rps']:.2f}x",
            ">= 3000",
        ),
        ("lovd RSS, 0 sessions (MiB)", f"{api['rss0_kb'] / 1024:.1f}", "", "", ""),
        ("lovd RSS, 100 sessions (MiB)", f"{api['rss100_kb'] / 1024:.1f}", "", "", ""),
    ]
    print(f"\n{'measure':40} {'lovd':>10} {'baseline':>10} {'ratio':>8}  target")
    print(f"{'':40} {'':>10} {'(bare)':>10}")
    for r in rows:
        print(f"{r[0]:40} {r[1]:>10} {r[2]:>10} {r[3]:>8}  {r[4]}")
    print(
        f"\nbaseline for create: podman run -d --rm --init -p … {IMAGE} → first HTTP byte;"
        f" for the API: a bare aiohttp app on a unix socket. {args.runs} runs each."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
