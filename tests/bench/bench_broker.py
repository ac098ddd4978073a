"""Benchmark of the credential broker, measured in one run; prints a table.

    runuser -u lovd -- python -m tests.bench.bench_broker [--requests 200] [--seconds 5]

Three processes: the stub LLM (``python -m lovd.demo.llm_stub``, an OpenAI-compatible
streaming endpoint), a real ``lovd serve`` whose broker fronts it with an API key, and
this client. One real session (the test image) gives the per-session credential.

1. First streamed token: a streamed chat completion, timed from sending the request to
   the first ``data:`` chunk with content, directly from the stub vs through the broker;
   ``--requests`` sequential requests each, interleaved; p50/p99 and the difference.
2. Throughput: 32 concurrent clients streaming whole completions for ``--seconds``,
   directly vs through the broker: completed streams per second, and lovd's CPU time
   per brokered stream (steady on a busy host, where the rates are not).

Through the broker every request is checked as in production: allowlisted route and
headers, the model against llm.model, an output bound and include_usage added, the
reservation against the caps. The one bench session's own concurrency limits are raised
to 32 (they would otherwise queue its streams two at a time, by design).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.lovdproc import LovdProc

# As OpenCode sends it: the model's own name (llm.model is "lovd/legal-stub").
CHAT = {
    "model": "legal-stub",
    "stream": True,
    "messages": [{"role": "user", "content": "Si hei"}],
}


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def streams_counted(p: LovdProc, sid: str) -> int:
    _, _, shown = p.api("GET", f"/api/sessions/{sid}")
    return int(shown["usage"]["llm_requests"])


async def first_token(http: aiohttp.ClientSession, url: str, key: str) -> float:
    t0 = time.perf_counter()
    async with http.post(url, json=CHAT, headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200, (r.status, await r.text())
        async for line in r.content:
            if line.startswith(b"data:") and b'"content"' in line:
                took = time.perf_counter() - t0
                await r.read()
                return took
    raise AssertionError("no content chunk in the stream")


async def throughput(url: str, key: str, seconds: float, conc: int = 32) -> float:
    done = 0
    end = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                headers = {"Authorization": f"Bearer {key}"}
                async with http.post(url, json=CHAT, headers=headers) as r:
                    body = await r.read()
                    assert r.status == 200 and body.endswith(b"[DONE]\n\n"), r.status
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return done / (time.perf_counter() - t0)


async def main(requests: int, seconds: float) -> int:
    api_key = "bench-operator-key"
    stub_port = free_port()
    stub = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lovd.demo.llm_stub",
            "--port",
            str(stub_port),
            "--log-level",
            "warning",
        ],
    )
    tmp = Path(tempfile.mkdtemp(prefix="lovd-bench-broker-"))
    p = LovdProc(
        tmp,
        llm={
            "model": "lovd/legal-stub",
            "base_url": f"http://127.0.0.1:{stub_port}/v1",
            "api_key": api_key,
        },
        egress={"enforce": False},  # the client is on the host, not in a session
        # One session carries all 32 streams here, so its own limits (2 LLM calls at a
        # time, 16 requests in flight) are raised; every check still runs on each call.
        broker={
            "listen": f"127.0.0.1:{free_port()}",
            "session_concurrency": 32,
            "session_requests": 64,
        },
    )
    try:
        p.start()
        status, _, s = p.api("POST", "/api/sessions")
        assert status == 201, s
        env_file = next((tmp / "run").glob(f"secrets-*/{s['id']}.env"))
        env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        credential = env["LOVD_LLM_API_KEY"]
        assert credential.startswith(s["id"] + ".") and api_key not in env_file.read_text()
        broker_port = int(env["LOVD_LLM_BASE_URL"].split(":")[2].split("/")[0])
        direct = f"http://127.0.0.1:{stub_port}/v1/chat/completions"
        brokered = f"http://127.0.0.1:{broker_port}/llm/lovd/chat/completions"
        # The stub needs no key; sending the operator's directly is what the broker adds.
        async with aiohttp.ClientSession() as http:
            for _ in range(20):  # warm up both paths (connections, caches)
                await first_token(http, direct, api_key)
                await first_token(http, brokered, credential)
            d: list[float] = []
            b: list[float] = []
            for _ in range(requests):
                d.append(await first_token(http, direct, api_key))
                b.append(await first_token(http, brokered, credential))
        tput_direct = await throughput(direct, api_key, seconds)
        assert p.proc is not None
        cpu0, n0 = cpu_seconds(p.proc.pid), streams_counted(p, s["id"])
        tput_broker = await throughput(brokered, credential, seconds)
        cpu1, n1 = cpu_seconds(p.proc.pid), streams_counted(p, s["id"])
        _, _, shown = p.api("GET", f"/api/sessions/{s['id']}")

        def ms(x: float) -> str:
            return f"{x * 1000:.3f} ms"

        print(f"first streamed token, {requests} sequential requests each (interleaved)")
        print(f"{'':18}{'p50':>12}{'p99':>12}")
        print(f"{'direct (stub)':18}{ms(pct(d, 50)):>12}{ms(pct(d, 99)):>12}")
        print(f"{'through broker':18}{ms(pct(b, 50)):>12}{ms(pct(b, 99)):>12}")
        print(
            f"{'added by broker':18}{ms(pct(b, 50) - pct(d, 50)):>12}"
            f"{ms(pct(b, 99) - pct(d, 99)):>12}"
        )
        print(f"\nthroughput, 32 concurrent streams for {seconds:g} s")
        print(f"direct          {tput_direct:8.1f} streams/s")
        print(
            f"through broker  {tput_broker:8.1f} streams/s  "
            f"({tput_broker / tput_direct:.2f}x direct)"
        )
        # CPU time barely depends on what else the host runs, unlike the rates above.
        print(
            f"lovd CPU per brokered stream: {(cpu1 - cpu0) / max(n1 - n0, 1) * 1e6:.0f} us "
            f"({n1 - n0} streams)"
        )
        print(f"\nthe broker counted for the session: {json.dumps(shown['usage'])}")
        return 0
    finally:
        p.stop()
        stub.terminate()
        stub.wait()
        subprocess.run(["podman", "unshare", "rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    raise SystemExit(asyncio.run(main(args.requests, args.seconds)))
