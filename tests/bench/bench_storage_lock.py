"""Creates while deletes run: what serialising Podman's storage commands (run, rm, unshare rm
on one lock in lovd, lovd/runner.py) costs a create.

    runuser -u lovd -- python -m tests.bench.bench_storage_lock [--rounds 3] [--n 4]

Each round: N sessions exist; N creates (wait: true) and N deletes of the existing ones
start at once. Prints the create→running and delete→204 times (p50, max) over all rounds.
Run it from a checkout without the lock to compare (the tiny test image, the direct runner).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.lovdproc import LovdProc, remove_all


def timed(p: LovdProc, method: str, path: str, body: object = None) -> tuple[int, float]:
    t0 = time.monotonic()
    status, _, _ = p.api(method, path, body)
    return status, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=4)
    args = ap.parse_args()
    n = args.n
    p = LovdProc(Path(tempfile.mkdtemp(prefix="lovd-bench-lock-")), limits={"max_running": 3 * n})
    p.start()
    creates: list[float] = []
    deletes: list[float] = []
    try:
        existing = [p.api("POST", "/api/sessions")[2]["id"] for _ in range(n)]
        with ThreadPoolExecutor(2 * n) as pool:
            for _ in range(args.rounds):
                made = [pool.submit(timed, p, "POST", "/api/sessions") for _ in range(n)]
                gone = [pool.submit(timed, p, "DELETE", f"/api/sessions/{s}") for s in existing]
                for f in made:
                    status, t = f.result()
                    assert status == 201, status
                    creates.append(t)
                for f in gone:
                    status, t = f.result()
                    assert status == 204, status
                    deletes.append(t)
                existing = [s["id"] for s in p.api("GET", "/api/sessions")[2]["sessions"]]
    finally:
        remove_all(p)
    print(f"{args.rounds} rounds of {n} creates (wait: true) beside {n} deletes")
    print(f"  create→running p50 {statistics.median(creates):.2f} s, max {max(creates):.2f} s")
    print(f"  delete→204     p50 {statistics.median(deletes):.2f} s, max {max(deletes):.2f} s")


if __name__ == "__main__":
    main()
