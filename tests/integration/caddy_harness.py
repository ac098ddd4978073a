"""A real Caddy plus lovd's browser path, wired in-process the way ``lovd serve`` wires it.

Used by tests/integration/test_caddy*.py, tests/browser and tests/bench. Caddy runs as a
child process on free ports with its admin API on a unix socket in a temp dir. lovd's
pieces are the production classes (Store, Sessions with the real Podman runner,
BrowserGate on its own unix socket, CaddyManager, the credential broker on a free port
of the host's loopback); nothing is mocked.

Host-side upstreams (``HostUpstream``) stand in for a session container only where a
container cannot show what is tested: streaming (SSE with controlled timing, idle
streams, WebSockets) and echoing exactly which headers arrived. They are registered as
session rows whose port is the host server's port — the same thing lovd routes by.

The stand-ins and the test image serve paths OpenCode does not have (``/x``, ``/sse``,
``/ws``, ``/cgi-bin/echo``…), so by default the gate allows ``STAND_IN_ROUTES`` on top
of OpenCode's allowlist. Tests of the allowlist itself, and the browser test, pass
``allowlist=Allowlist()``: OpenCode's list alone, as in production.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from lovd import config as config_mod
from lovd import ids
from lovd.broker import server as broker_server
from lovd.caddy import CaddyAdmin, CaddyManager
from lovd.podman import PodmanCLI
from lovd.runner import PodmanRunner
from lovd.session.launcher import SessionEnv
from lovd.session.lifecycle import Sessions
from lovd.store import Session, Store
from lovd.web.allowlist import OPENCODE_ROUTES, Allowlist, Route
from lovd.web.gate import BrowserGate
from lovd.web.public import serve_public
from lovd.wiring import Host
from tests.stack import open_stack, settings_merged
from tests.waiting import until

_ANY = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
STAND_IN_ROUTES = (
    Route(_ANY, "/x", "HostUpstream.echo: shows what reached the upstream", api=False),
    Route(_ANY, "/cgi-bin/echo", "the test image: names its session", api=False),
    Route(frozenset({"GET"}), "/sse", "HostUpstream.sse", api=False),
    Route(frozenset({"GET"}), "/idle", "HostUpstream.idle", api=False),
    Route(frozenset({"GET"}), "/ws", "HostUpstream.ws", api=False, websocket=True),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def caddy_binary() -> str | None:
    return shutil.which("caddy")


@dataclass(frozen=True)
class SiteCert:
    """A self-signed certificate for 127.0.0.1 (an IP SAN: browsers send no SNI for an
    address), as an operator's own certificate for a host without a public name."""

    cert: Path
    key: Path
    # base64(sha256(SubjectPublicKeyInfo DER)): what Chromium's
    # --ignore-certificate-errors-spki-list takes to trust this one certificate as if a
    # known CA had signed it (the HTTP cache stays on, unlike --ignore-certificate-errors).
    spki: str

    @classmethod
    def make(cls, where: Path) -> SiteCert:
        cert, key = where / "tls-cert.pem", where / "tls-key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec",
             "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "7", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1",
             "-addext", "extendedKeyUsage=serverAuth"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "pkey", "-in", str(key), "-pubout", "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        return cls(cert, key, base64.b64encode(hashlib.sha256(der).digest()).decode())

    def caddy_config(self) -> dict[str, Any]:
        """Caddy's own tls app holding the certificate (an operator's config, not lovd's)."""
        files = [{"certificate": str(self.cert), "key": str(self.key)}]
        return {"apps": {"tls": {"certificates": {"load_files": files}}}}

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


class CaddyProc:
    """``caddy run`` with an admin-only base config (like caddy/base.json)."""

    def __init__(self, workdir: Path, extra_config: dict[str, Any] | None = None) -> None:
        self.dir = workdir
        self.admin_sock = workdir / "caddy-admin.sock"
        self.base = workdir / "caddy-base.json"
        cfg: dict[str, Any] = {
            "admin": {"listen": f"unix/{self.admin_sock}", "config": {"persist": False}},
            "logging": {"logs": {"default": {"level": "ERROR"}}},
        }
        cfg.update(extra_config or {})
        self.base.write_text(json.dumps(cfg))
        self.log = workdir / "caddy.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def admin_address(self) -> str:
        return f"unix/{self.admin_sock}"

    async def start(self, timeout: float = 10.0) -> None:
        env = {
            **os.environ,
            "HOME": str(self.dir),
            "XDG_CONFIG_HOME": str(self.dir / "xdg-config"),
            "XDG_DATA_HOME": str(self.dir / "xdg-data"),
        }
        with contextlib.suppress(FileNotFoundError):
            self.admin_sock.unlink()
        logf = self.log.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            "caddy",
            "run",
            "--config",
            str(self.base),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            env=env,
        )
        logf.close()
        admin = CaddyAdmin(self.admin_address, timeout=1.0)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"caddy exited: {self.log.read_text()[-2000:]}")
                with contextlib.suppress(Exception):
                    status, _ = await admin.request("GET", "/config/")
                    if status == 200:
                        return
                await asyncio.sleep(0.02)
            raise RuntimeError(f"caddy did not start: {self.log.read_text()[-2000:]}")
        finally:
            await admin.close()

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class HostUpstream:
    """A host-side stand-in for a session container: SSE, idle streams, WebSocket, echo."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.seen: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        # lovd probes a session's health path (session/health.py) like a container's;
        # those probes are lovd's own, not what a browser sent, so they are not in `seen`.
        app.router.add_get("/global/health", self.health)
        app.router.add_get("/sse", self.sse)
        app.router.add_get("/idle", self.idle)
        app.router.add_get("/ws", self.ws)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"healthy": True, "upstream": self.name})

    async def echo(self, request: web.Request) -> web.Response:
        headers = dict(request.headers)
        self.seen.append(headers)
        body = await request.read()
        # ?csp=…&referrer=…: answer with those headers, as OpenCode's pages do.
        sent = {"Content-Security-Policy": request.query.get("csp"),
                "Referrer-Policy": request.query.get("referrer")}  # fmt: skip
        return web.json_response(
            {
                "upstream": self.name,
                "path": request.path_qs,
                "method": request.method,
                "headers": headers,
                "body": body.decode(errors="replace"),
            },
            headers={k: v for k, v in sent.items() if v},
        )

    async def sse(self, request: web.Request) -> web.StreamResponse:
        interval = float(request.query.get("interval", "0.2"))
        count = int(request.query.get("count", "1000000"))
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        for i in range(count):
            await resp.write(f"id: {i}\ndata: {self.name} {i}\n\n".encode())
            await asyncio.sleep(interval)
        return resp

    async def idle(self, request: web.Request) -> web.StreamResponse:
        seconds = float(request.query.get("seconds", "1"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: hello\n\n")
        await asyncio.sleep(seconds)
        await resp.write(b"data: still here\n\n")
        return resp

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"{self.name}: {msg.data}")
        return ws


@dataclass
class Harness:
    dir: Path
    config: config_mod.Config
    caddy: CaddyProc
    store: Store
    sessions: Sessions
    gate: BrowserGate
    manager: CaddyManager
    port: int
    http: aiohttp.ClientSession
    env: SessionEnv
    host: Host
    public: web.AppRunner | None = None
    upstreams: list[HostUpstream] = field(default_factory=list)
    # harness(https=True): the site's certificate (caddy.tls); None: plain HTTP.
    tls: SiteCert | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def auth_socket(self) -> str:
        return str(self.dir / "auth.sock")

    async def fake_session(
        self, upstream: HostUpstream, port: int | None = None, **changes: Any
    ) -> tuple[Session, str]:
        """A session row routed to a host-side upstream (see the module docstring)."""
        token = ids.new_token()
        now = time.time()
        row = Session(
            id=ids.new_session_id(),
            status="running",
            reason="",
            token_hash=ids.hash_token(token),
            port=port or upstream.port,
            container_id="",
            host_id="test",
            created_at=now,
            updated_at=now,
            expires_at=now + 3600,
            last_activity=now,
        )
        s = await self.store.insert(row)
        if changes:
            s = await self.store.update(s.id, **changes)
        return s, token

    async def upstream(self, name: str) -> HostUpstream:
        u = HostUpstream(name)
        await u.start()
        self.upstreams.append(u)
        return u

    async def routable(self, timeout: float = 10.0) -> float:
        """Wait until Caddy routes to lovd (the landing page answers); seconds taken."""

        async def answers() -> bool:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.http.get(
                    self.url + "/_lovd/ping", timeout=aiohttp.ClientTimeout(total=1)
                ) as r:
                    return r.status == 200
            return False

        return await until(answers, timeout, "Caddy routing to lovd")


def cookie(s: Session, token: str) -> dict[str, str]:
    return {"Cookie": f"lovd_session={s.id}.{token}"}


@contextlib.asynccontextmanager
async def harness(
    *,
    settings: dict[str, Any] | None = None,
    image: str = "localhost/lovd-test:latest",
    run_manager: bool = True,
    allowlist: Allowlist | None = None,
    https: bool = False,
) -> AsyncIterator[Harness]:
    """``https``: the site over TLS (caddy.tls, an https public_url) with a self-signed
    certificate loaded into this Caddy's tls app (``Harness.tls``); ``Harness.http``
    trusts it."""
    # Short paths: unix socket paths are limited to 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="lovd-caddy-", dir="/tmp"))
    port = free_port()
    tls = SiteCert.make(workdir) if https else None
    caddy = CaddyProc(workdir, tls.caddy_config() if tls else None)
    base = 20000 + (os.getpid() * 7 + port) % 9000
    conf: dict[str, Any] = {
        "state_dir": str(workdir / "state"),
        "broker": {"listen": f"127.0.0.1:{free_port()}"},
        # Its own runtime dir (secrets, egress rules): parallel harnesses never mix.
        "runtime_dir": str(workdir / "run"),
        "image": image,
        "runner": "podman",
        "port_range": f"{base}-{base + 499}",
        "ready_timeout": 30,
        "idle_timeout": 0,
        # This kind of host (cgroup v1/hybrid) cannot enforce memory/CPU limits for the
        # rootless lovd user; tests/integration/test_limits.py checks the refusal.
        "limits": {"max_running": 10, "enforce": False},
        "caddy": {
            "admin": caddy.admin_address,
            "listen": [f"127.0.0.1:{port}"],
            "auth_socket": str(workdir / "auth.sock"),
            "check_interval": 0.5,
        },
    }
    if tls is not None:
        conf["caddy"]["tls"] = True
        conf["public_url"] = f"https://127.0.0.1:{port}"
    conf = settings_merged(conf, settings or {})
    cfg = config_mod.from_mapping(conf)  # the Podman settings the runner is made with
    await caddy.start()
    # The tests read lovd's English texts; Norwegian, the default, is tested in
    # tests/unit/test_pages_i18n.py and with a Norwegian browser in tests/browser.
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=tls.client_context()) if tls else None,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        # Raw bodies (auto_decompress=False): ask for them uncompressed unless a test
        # asks for an encoding itself (test_ui_assets.py checks Caddy's compression).
        headers={"Accept-Language": "en", "Accept-Encoding": "identity"},
    )
    h: Harness | None = None
    try:
        async with open_stack(
            conf,
            host_id="test",
            runner=lambda iid: PodmanRunner(PodmanCLI(cfg.podman), cfg.podman, iid),
            allowlist=allowlist or Allowlist(OPENCODE_ROUTES + STAND_IN_ROUTES),
        ) as host:
            # Sessions reach LLMs and MCP servers only through the broker (lovd/broker/).
            broker_runner = await broker_server.serve_broker(
                host.broker, broker_server.bind(host.config)
            )
            manager = host.caddy
            assert manager is not None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(host.auth_socket)
            sock.listen(256)
            h = Harness(
                workdir,
                host.config,
                caddy,
                host.store,
                host.sessions,
                host.gate,
                manager,
                port,
                http,
                host.env,
                host,
                tls=tls,
            )
            try:
                h.public = await serve_public(host.public_app, sock)
                if run_manager:
                    manager.start()
                    await h.routable()
                yield h
            finally:
                await manager.close()
                for s in host.store.all():
                    with contextlib.suppress(Exception):
                        await host.sessions.discard_warm(s.id, "test teardown")  # unless warm
                        await host.sessions.delete(s.id, "test teardown")
                await host.drain()
                await broker_runner.cleanup()
                if h.public is not None:
                    await h.public.cleanup()
    finally:
        for u in h.upstreams if h is not None else []:
            await u.stop()
        await http.close()
        await caddy.stop()
        shutil.rmtree(workdir, ignore_errors=True)
