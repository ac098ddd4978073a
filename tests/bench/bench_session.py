#!/usr/bin/env python3
"""The legal-research session image, measured in one run (as the lovd user).

1. OpenCode session create→ready through lovd (demo mode; POST /api/sessions waits for
   ``/global/health``) vs a bare ``podman run`` of the same image with the same secret
   file until ``/global/health`` answers 200: p50/p95 and ratio (target p50 < 2.5 s).
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
    req = urllib.request.Request(f"http://127.0.0.1:{port}/global/health",
                                 headers={"Authorization": f"Basic {auth}"})
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
        podman("run", "-d", "--rm", "--init", "--name", name, "--user", "1000",
               "--read-only", "--tmpfs", "/tmp", "--tmpfs", "/run/secrets",
               "-v", f"{secret}:/run/secrets/lovd.env:ro", "-p", f"127.0.0.1:{port}:4096", IMAGE)
        try:
            healthy(port, password, t0 + 60)
            out.append(time.monotonic() - t0)
        finally:
            podman("rm", "-f", "-t", "0", name, check=False)
    return out


def via_lovd(runs: int, tmp: Path) -> tuple[list[float], list[float]]:
    p = LovdProc(tmp / "lovd", image=IMAGE, demo="on", demo_mcp_port=0, demo_llm_port=0)
    p.start()
    created, stopped = [], []
    try:
        for _ in range(runs):
            t0 = time.monotonic()
            status, _, s = p.api("POST", "/api/sessions")
            created.append(time.monotonic() - t0)
            assert status == 201 and s["status"] == "running", s
            t0 = time.monotonic()
            assert p.api("DELETE", f"/api/sessions/{s['id']}")[0] == 204
            stopped.append(time.monotonic() - t0)
    finally:
        p.stop()
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
        subprocess.run([sys.executable, "-m", "lovd", "image", "build"], check=True,
                       capture_output=True)
        build_s = time.monotonic() - t0
    reported = json.loads(podman("image", "inspect", IMAGE))[0]["Size"]
    # What the root filesystem really holds (Podman 4.3 may report an imported layer twice).
    du = podman("run", "--rm", "--user", "0", "--entrypoint", "/bin/sh", IMAGE, "-c",
                "du -sk -x / 2>/dev/null")
    size = int(du.split()[0]) * 1024
    tmp = Path(tempfile.mkdtemp(prefix="lovd-bench-session-"))
    try:
        b = bare(args.runs, tmp)
        created, stopped = via_lovd(args.runs, tmp)
    finally:
        subprocess.run(["podman", "unshare", "rm", "-rf", str(tmp)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    b50, l50 = statistics.median(b), statistics.median(created)
    print(f"\n{'measure':34} {'lovd':>9} {'bare':>9} {'ratio':>7}  target")
    print(f"{'OpenCode create→ready p50 (s)':34} {l50:9.3f} {b50:9.3f} {l50 / b50:6.2f}x  < 2.5 s")
    print(f"{'OpenCode create→ready p95 (s)':34} {pct(created, 95):9.3f} {pct(b, 95):9.3f}"
          f" {pct(created, 95) / pct(b, 95):6.2f}x")
    print(f"{'stop (DELETE) p50 / max (s)':34} {statistics.median(stopped):9.3f}"
          f" {max(stopped):9.3f}          < 2 s")
    print(f"{'image content size (MB)':34} {size / 1e6:9.0f}"
          f"   (podman image inspect reports {reported / 1e6:.0f} MB)")
    if build_s is not None:
        print(f"{'lovd image build (s)':34} {build_s:9.1f}")
    print(f"\n{args.runs} runs each; bare = podman run of {IMAGE} with the same secret file "
          "until /global/health answers 200.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
