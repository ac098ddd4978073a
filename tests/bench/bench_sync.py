#!/usr/bin/env python3
"""PostgreSQL sync benchmarks against a throwaway cluster (fsync on), as the lovd user.

1. Sync lag under a steady 50 changes/s: the time from a change's SQLite commit to
   PostgreSQL's COMMIT of it (the relay's own measure), p50/p99.
2. API latency with PostgreSQL down vs up: the real API app (fake runner: this measures
   lovd, not Podman) doing create → get → list → delete cycles, phases alternated
   up/down/up/down; the ratio of the medians and of the p99s (target <= 1.1x).
3. Relay throughput: rows/s applying a backlog of N outbox rows (e.g. after an outage).

    python tests/bench/bench_sync.py [--seconds 20] [--cycles 150] [--rows 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lovd import config, ids
from lovd.session.model import Session
from lovd.store import Store
from lovd.sync.postgres import Relay
from tests.pg import PgCluster, cluster

if TYPE_CHECKING:
    from aiohttp.test_utils import TestClient

BASE = random.randrange(20000, 55000, 5000)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def cfg_for(tmp: Path, dsn: str) -> config.Config:
    return config.from_mapping(settings_for(tmp, dsn))


def settings_for(tmp: Path, dsn: str) -> dict[str, object]:
    return {
        "state_dir": str(tmp),
        "runtime_dir": str(tmp / "run"),
        # The fake runner binds these; every create/delete cycle leaves its port in
        # TIME_WAIT for a minute, so the range must outnumber the cycles of a run.
        "port_range": f"{BASE}-{BASE + 4999}",
        "warm_pool": 0,
        "limits": {"max_running": 50},
        "postgres": {"dsn": dsn, "max_backoff": 1.0},
        "caddy": {"admin": ""},
    }


def row(port: int) -> Session:
    now = time.time()
    return Session(ids.new_session_id(), "running", "", "", port, "", "bench",
                   now, now, now + 3600, now)  # fmt: skip


async def lag(dsn: str, tmp: Path, seconds: float, rate: float) -> None:
    cfg = cfg_for(tmp, dsn)
    store = await Store.open(cfg.db_path)
    relay = Relay.from_config(cfg, store, "bench-lag", "bench")
    relay.start()
    sessions = [await store.insert(row(20000 + i)) for i in range(20)]
    await asyncio.sleep(1.0)
    relay.status.lags.clear()
    n = int(seconds * rate)
    t0 = time.monotonic()
    for i in range(n):
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        await store.update(sessions[i % len(sessions)].id, reason=f"change {i}")
    while relay.status.backlog or (await store.outbox_stats())[0]:
        await asyncio.sleep(0.01)
    lags = list(relay.status.lags)[-n:]
    print(f"1. sync lag at {rate:g} changes/s for {seconds:g} s ({len(lags)} changes): "
          f"p50 {pct(lags, 50) * 1000:.1f} ms, p99 {pct(lags, 99) * 1000:.1f} ms, "
          f"max {max(lags) * 1000:.1f} ms")  # fmt: skip
    await relay.close()
    await store.close()


async def api_latency(pg: object, tmp: Path, cycles: int) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from tests.fakes import FakeRunner
    from tests.pg import PgCluster
    from tests.stack import open_stack

    assert isinstance(pg, PgCluster)
    runner = FakeRunner()
    async with open_stack(settings_for(tmp, pg.dsn), runner=lambda _: runner,
                          host_id="bench-api") as host:  # fmt: skip
        assert host.sync is not None
        async with TestClient(TestServer(host.app)) as client:
            host.sync.start()
            await _api_phases(pg, host.store, client, cycles)
    await runner.close()


async def _api_phases(
    pg: PgCluster,
    store: Store,
    client: TestClient,
    cycles: int,  # type: ignore[type-arg]
) -> None:
    kinds = ("create", "get", "list", "delete")

    async def phase(into: dict[str, list[float]]) -> None:
        for _ in range(cycles):
            t = time.perf_counter()
            r = await client.post("/api/sessions", json={"wait": True})
            body = await r.json()
            if r.status != 201:
                raise SystemExit(f"bench: create answered {r.status}: {body.get('detail')}")
            sid = body["id"]
            into["create"].append(time.perf_counter() - t)
            for kind, method, path in (("get", "GET", f"/api/sessions/{sid}"),
                                       ("list", "GET", "/api/sessions"),
                                       ("delete", "DELETE", f"/api/sessions/{sid}")):  # fmt: skip
                t = time.perf_counter()
                r = await client.request(method, path)
                await r.read()
                assert r.status < 300, r.status
                into[kind].append(time.perf_counter() - t)

    up: dict[str, list[float]] = {k: [] for k in kinds}
    down: dict[str, list[float]] = {k: [] for k in kinds}
    backlog = 0
    try:
        await phase({k: [] for k in kinds})  # warm-up
        for _ in range(4):  # alternate, so drift (other load on the machine) hits both sides
            await phase(up)
            await asyncio.to_thread(pg.stop)
            await phase(down)
            backlog = max(backlog, (await store.outbox_stats())[0])
            await asyncio.to_thread(pg.start)
            while (await store.outbox_stats())[0]:
                await asyncio.sleep(0.05)
    finally:
        if not pg.running():
            await asyncio.to_thread(pg.start)
    print(
        f"2. API latency, PostgreSQL down vs up ({len(up['get'])} cycles per side; "
        f"up to {backlog} changes queued while down):"
    )
    for k in kinds:
        u, d = up[k], down[k]
        mu, md = statistics.median(u), statistics.median(d)
        print(
            f"   {k:6} up p50 {mu * 1000:6.2f} ms p99 {pct(u, 99) * 1000:6.2f} ms | down p50 "
            f"{md * 1000:6.2f} ms p99 {pct(d, 99) * 1000:6.2f} ms | ratio p50 {md / mu:.3f}x"
        )
    u_all = [x for k in kinds for x in up[k]]
    d_all = [x for k in kinds for x in down[k]]
    print(
        f"   all    ratio down/up p50 {statistics.median(d_all) / statistics.median(u_all):.3f}x,"
        f" p99 {pct(d_all, 99) / pct(u_all, 99):.3f}x (target <= 1.1x)"
    )


async def throughput(dsn: str, tmp: Path, rows: int) -> None:
    cfg = cfg_for(tmp, dsn)
    store = await Store.open(cfg.db_path)
    live = [await store.insert(row(20000 + i)) for i in range(200)]
    for i in range(rows - len(live)):
        await store.update(live[i % len(live)].id, reason=f"r{i}")
    relay = Relay.from_config(cfg, store, "bench-tp", "bench")
    t0 = time.monotonic()
    while await relay.step():
        pass
    took = time.monotonic() - t0
    assert await store.outbox_size() == 0
    print(f"3. relay throughput: {rows} outbox rows in {took:.2f} s = {rows / took:,.0f} rows/s "
          f"(batches of {cfg.postgres_batch}, one transaction each, fsync on)")  # fmt: skip
    await relay.close()
    await store.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--rows", type=int, default=20000)
    args = ap.parse_args()
    with cluster(fsync=True) as pg, tempfile.TemporaryDirectory(prefix="lovd-bench-") as t:
        tmp = Path(t)
        await lag(pg.dsn, tmp / "lag", args.seconds, args.rate)
        await api_latency(pg, tmp / "api", args.cycles)
        await throughput(pg.dsn, tmp / "tp", args.rows)


if __name__ == "__main__":
    asyncio.run(main())
