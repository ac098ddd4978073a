"""Run a real ``lovd serve`` subprocess and talk to it over its unix socket."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 120) -> None:
        super().__init__("lovd", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def request(
    sock: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    conn = UnixHTTPConnection(sock)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        raw = r.read()
        ctype = r.getheader("Content-Type", "")
        data: Any = json.loads(raw) if raw and "json" in ctype else raw.decode(errors="replace")
        return r.status, dict(r.getheaders()), data
    finally:
        conn.close()


class LovdProc:
    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.sock = str(tmp / "api.sock")
        base = random.randrange(30000, 60000, 100)
        conf = {
            "state_dir": str(tmp / "state"),
            "runtime_dir": str(tmp / "run"),
            "image": "localhost/lovd-test:latest",
            "runner": "podman",
            "port_range": f"{base}-{base + 98}",
            "orphan_grace": 0,
            "ready_timeout": 30,
            "demo": "off",
            "caddy": {"admin": ""},
            # Parallel test daemons (and a real lovd) must not share the broker's port.
            "broker": {"listen": f"127.0.0.1:{base + 99}"},
            # Tests count containers; the warm pool has its own tests.
            "warm_pool": 0,
            # Hosts like the test machines (cgroup v1/hybrid) cannot enforce memory/CPU
            # limits for the rootless lovd user; tests/integration/test_limits.py checks
            # the refusal with true.
            "limits": {"enforce": False},
        }
        for k, v in settings.items():
            if isinstance(v, dict) and isinstance(conf.get(k), dict):
                conf[k] = {**conf[k], **v}
            else:
                conf[k] = v
        self.config_path = tmp / "lovd.conf"
        self.config_path.write_text(yaml.safe_dump(conf))
        self.log_path = tmp / "lovd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60, reconciled: bool = True) -> LovdProc:
        """Start lovd; return once its API answers and (``reconciled``) its start-up
        reconcile is done, as the tests written before it ran in the background expect."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lovd",
                "--config",
                str(self.config_path),
                "serve",
                "--listen",
                f"unix:{self.sock}",
            ],
            stdout=log,
            stderr=log,
            env={**os.environ, "LOVD_DEBUG": ""},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lovd exited: {self.log_path.read_text()[-2000:]}")
            try:
                if reconciled:
                    _, _, health = request(self.sock, "GET", "/api/health")
                    if health["checks"]["reconcile"]["ok"]:
                        return self
                elif request(self.sock, "GET", "/api/openapi.json")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"lovd did not start: {self.log_path.read_text()[-2000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json"} if data else {}
        h.update(headers or {})
        return request(self.sock, method, path, data, h)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "lovd",
                "--config",
                str(self.config_path),
                "--socket",
                self.sock,
                *args,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    def instance_id(self) -> str:
        import sqlite3

        with sqlite3.connect(self.tmp / "state" / "lovd.db") as db:
            return str(db.execute("SELECT value FROM meta WHERE key='instance_id'").fetchone()[0])


def podman(*args: str, check: bool = True) -> str:
    r = subprocess.run(["podman", *args], capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"podman {args}: {r.stderr}")
    return r.stdout


def containers(label: str) -> dict[str, str]:
    """name -> id of containers (any state) with the label."""
    out = podman("ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}} {{.ID}}")
    return dict(line.split() for line in out.splitlines() if line.strip())


def cookie_of(p: LovdProc, s: dict[str, Any]) -> str:
    """The session cookie's secret a browser gets for ``s``'s link (POST /api/sessions
    hands out a single-use link, never the cookie): the link is used up here."""
    from urllib.parse import urlsplit

    link = urlsplit(s["url"])
    status, headers, body = request(p.sock, "GET", f"{link.path}?{link.query}")
    assert status == 303, (status, body)
    value = headers["Set-Cookie"].split(";", 1)[0].split("=", 1)[1]
    return value.split(".", 1)[1]


def forward_auth(
    p: LovdProc, sid: str, token: str, uri: str = "/global/health"
) -> tuple[int, dict[str, str], Any]:
    """What Caddy's forward_auth asks lovd's public socket for one browser request
    (the gate key from the host key, the session cookie, the original method and URI)."""
    from lovd.caddy import AUTH_PATH, GATE_HEADER, gate_key

    state = Path(yaml.safe_load(p.config_path.read_text())["state_dir"])
    return request(
        str(p.tmp / "auth.sock"),
        "GET",
        AUTH_PATH,
        headers={
            GATE_HEADER: gate_key((state / "host.key").read_bytes()),
            "Cookie": f"lovd_session={sid}.{token}",
            "X-Forwarded-Method": "GET",
            "X-Forwarded-Uri": uri,
            "Accept": "application/json",
        },
    )


def remove_all(p: LovdProc) -> None:
    """Stop lovd and leave nothing behind, even when a test failed half-way."""
    p.stop()
    state = Path(yaml.safe_load(p.config_path.read_text())["state_dir"])
    if (state / "lovd.db").exists():
        import sqlite3

        with sqlite3.connect(state / "lovd.db") as db:
            iid = db.execute("SELECT value FROM meta WHERE key='instance_id'").fetchone()[0]
        for name in containers(f"lovd.instance={iid}"):
            podman("rm", "-f", "-t", "0", name, check=False)
    subprocess.run(["podman", "unshare", "rm", "-rf", str(state)], check=False)
