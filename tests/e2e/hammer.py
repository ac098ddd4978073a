"""Hammer lovd's API socket with GET /api/health, one connection per request.

Run inside the machine: ``python hammer.py SECONDS``. Prints one JSON line:
requests, ok, refused (connect() failed: the socket was not there or not listening),
dropped (connected, then the connection died without a response: a request that was
in flight when lovd was killed), other (any other status), max_latency.
"""

from __future__ import annotations

import json
import socket
import sys
import time

SOCK = "/run/lovd/api.sock"
REQ = b"GET /api/health HTTP/1.1\r\nHost: lovd\r\nConnection: close\r\n\r\n"


def one() -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    try:
        try:
            s.connect(SOCK)
        except OSError:
            return "refused"
        try:
            s.sendall(REQ)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        except OSError:
            return "dropped"
        if not data:
            return "dropped"
        status = data.split(b" ", 2)[1] if data.startswith(b"HTTP/") else b""
        return "ok" if status in (b"200", b"503") else "other"
    finally:
        s.close()


def main() -> None:
    end = time.monotonic() + float(sys.argv[1])
    counts = {"requests": 0, "ok": 0, "refused": 0, "dropped": 0, "other": 0}
    worst = 0.0
    while time.monotonic() < end:
        t0 = time.monotonic()
        result = one()
        worst = max(worst, time.monotonic() - t0)
        counts["requests"] += 1
        counts[result] += 1
        time.sleep(0.01)
    print(json.dumps({**counts, "max_latency": round(worst, 3)}))


if __name__ == "__main__":
    main()
