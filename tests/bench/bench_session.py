#!/usr/bin/env python3
"""The legal-research session image, measured in one run (as the lovd user).

1. OpenCode session create→ready through lovd (demo mode; POST /api/sessions waits for
   ``/global/health``) vs a bare ``podman run`` of the same image with the same secret
   file until ``/global/health`` answers 200: p50/p95 and ratio (target p50 < 2.5 s).
   Three ways: a cold start (warm_pool 0), a claim from the warm pool after it refilled,
   and creates back to back (the pool may still be booting the next container).
2. Stop time of a running session (DELETE) — target < 2 s (no SIGKILL after timeout).
3. Image size, and build time of ``lovd image build`` (with ``--build``; the build cache
   of npm packages applies as it would for an operator).

    python tests/bench/bench_session.py [--runs 7] [--build]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.lovdproc import LovdProc, podman

IMAGE = "localhost/lovd-session:latest"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(port: int, password: str, deadline: float) -> None:
    auth = base64.b64encode(f"opencode:{password}".encode()).decode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/global/health", headers={"Authorization": f"Basic {auth}"}
    )
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(req, timeout=0.3) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.02)
    raise TimeoutError("OpenCode did not become healthy")


def bare(runs: int, tmp: Path) -> list[float]:
    secret = tmp / "bare.env"
    password = "b" * 64
    secret.write_text(f"OPENCODE_SERVER_PASSWORD={password}\nLOVD_MODEL=lovd/legal-stub\n")
    secret.chmod(0o444)
    out = []
    for i in range(runs):
        port = free_port()
        name = f"bench-oc-{os.getpid()}-{i}"
        t0 = time.monotonic()
        podman(
            "run",
            "-d",
            "--rm",
            "--init",
            "--name",
            name,
            "--user",
            "1000",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--tmpfs",
            "/run/secrets",
            "-v",
            f"{secret}:/run/secrets/lovd.env:ro",
            "-p",
            f"127.0.0.1:{port}:4096",
            IMAGE,
        )
        try:
            healthy(port, password, t0 + 60)
            out.append(time.monotonic() - t0)
        finally:
            podman("rm", "-f", "-t", "0", name, check=False)
    return out


def via_lovd(
    runs: int, tmp: Path, warm_pool: int = 0, wait_for_pool: bool = False
) -> tuple[list[float], list[float]]:
    """create→ready and DELETE times through lovd. With a warm pool, ``wait_for_pool``
    gives the pool time to refill between creates (a user arriving after the previous
    one); without it creates come back to back and may claim a container still booting."""
    p = LovdProc(tmp, image=IMAGE, demo="on", demo_mcp_port=0, demo_llm_port=0, warm_pool=warm_pool)
    p.start()
    created, stopped = [], []
    try:
        for i in range(runs):
            if wait_for_pool:
                deadline = time.monotonic() + 60
                while p.log_path.read_text().count("warm container ready") < i + 1:
                    assert time.monotonic() < deadline, "the warm pool did not refill"
                    time.sleep(0.05)
            t0 = time.monotonic()
            status, _, s = p.api("POST", "/api/sessions")
            created.append(time.monotonic() - t0)
            assert status == 201 and s["status"] == "running", s
            t0 = time.monotonic()
            assert p.api("DELETE", f"/api/sessions/{s['id']}")[0] == 204
            stopped.append(time.monotonic() - t0)
        hits = p.log_path.read_text().count("session created (warm pool)")
        assert warm_pool == 0 or hits == runs, f"only {hits} of {runs} creates hit the pool"
    finally:
        p.stop()
        iid = p.instance_id()
        for name in podman("ps", "-aq", "--filter", f"label=lovd.instance={iid}").split():
            podman("rm", "-f", "-t", "0", name, check=False)
    return created, stopped


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--build", action="store_true", help="also time lovd image build")
    args = ap.parse_args()
    if os.geteuid() == 0:
        print("run as the lovd user (rootless Podman)", file=sys.stderr)
        return 2
    build_s = None
    if args.build:
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "lovd", "image", "build"], check=True, capture_output=True
        )
        build_s = time.monotonic() - t0
    reported = json.loads(podman("image", "inspect", IMAGE))[0]["Size"]
    # What the root filesystem really holds (Podman 4.3 may report an imported layer twice).
    du = podman(
        "run",
        "--rm",
        "--user",
        "0",
        "--entrypoint",
        "/bin/sh",
        IMAGE,
        "-c",
        "du -sk -x / 2>/dev/null",
    )
    size = int(du.split()[0]) * 1024
    tmp = Path(tempfile.mkdtemp(prefix="lovd-bench-session-"))
    try:
        b = bare(args.runs, tmp)
        created, stopped = via_lovd(args.runs, tmp / "cold")
        warm, _ = via_lovd(args.runs, tmp / "warm", warm_pool=1, wait_for_pool=True)
        burst, _ = via_lovd(args.runs, tmp / "burst", warm_pool=1)
    finally:
        subprocess.run(["podman", "unshare", "rm", "-rf", str(tmp)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    b50 = statistics.median(b)
    print(f"\n{'measure':44} {'lovd':>9} {'bare':>9} {'ratio':>7}  target")
    for name, xs in (
        ("cold (warm_pool 0)", created),
        ("warm pool, refilled", warm),
        ("warm pool, back to back", burst),
    ):
        x50 = statistics.median(xs)
        print(
            f"{'create→ready p50 (s), ' + name:44} {x50:9.3f} {b50:9.3f} {x50 / b50:6.2f}x  < 2.5 s"
        )
        print(
            f"{'create→ready p95 (s), ' + name:44} {pct(xs, 95):9.3f} {pct(b, 95):9.3f}"
            f" {pct(xs, 95) / pct(b, 95):6.2f}x"
        )
    print(
        f"{'stop (DELETE) p50 / max (s)':44} {statistics.median(stopped):9.3f}"
        f" {max(stopped):9.3f}          < 2 s"
    )
    print(
        f"{'image content size (MB)':44} {size / 1e6:9.0f}"
        f"   (podman image inspect reports {reported / 1e6:.0f} MB)"
    )
    if build_s is not None:
        print(f"{'lovd image build (s)':44} {build_s:9.1f}")
    print(
        f"\n{args.runs} runs each; bare = podman run of {IMAGE} with the same secret file "
        "until /global/health answers 200. Warm pool: lovd keeps one container booted "
        "ahead of demand (warm_pool: 1, the default); 'refilled' waits for the pool "
        "between creates, 'back to back' does not."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
