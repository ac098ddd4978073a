"""Builds lovd: every part ``lovd serve`` runs, for the daemon and for every test and
bench harness alike (one build, so a harness tests what ``lovd serve`` runs).

:func:`build` makes the store, the runner, the sessions service, the credential broker,
the browser gate, the API and public apps, PostgreSQL sync, metrics, the start-up
readiness, the warm pool's refill loop and Caddy's manager. A harness passes what it
replaces (a fake runner, a clock, demo URLs, settings) as arguments; the daemon binds the
listeners, runs the loops and shuts down (lovd/daemon.py).

Nothing is patched after construction: what two parts share is made first and given to
both — the warm containers' preparation (sessions call it, the gate serves from it), the
start-up reconcile's readiness (the daemon reports into it, requests wait on it), the
request clock ``idle_exit`` reads, the store's outbox event the relay waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from lovd import __version__, limits, procs
from lovd.broker.server import Broker
from lovd.caddy import CaddyManager, auth_socket_path, ui_root
from lovd.config import Config
from lovd.demo import mode as demo_mode
from lovd.errors import LovdError
from lovd.metrics import Metrics
from lovd.podman import PodmanAPI, PodmanCLI, PodmanClient, default_api_socket
from lovd.runner import PodmanRunner, Runner, SystemdRunner, user_manager_reachable
from lovd.session.launcher import SessionEnv, load_host_key
from lovd.session.lifecycle import Sessions
from lovd.session.reconcile import Readiness
from lovd.session.warm import WarmPool
from lovd.store import Store
from lovd.sync.restore import restore_if_lost
from lovd.sync.service import Sync
from lovd.web.allowlist import Allowlist
from lovd.web.app import HealthCheck, Requests, create_app
from lovd.web.assets import UiAssets
from lovd.web.chat_landing import ChatLanding
from lovd.web.gate import BrowserGate
from lovd.web.public import create_public_app
from lovd.web.warmprep import WarmPrep

log = logging.getLogger(__name__)

# A health check that needs Podman answers within this, or reports that it did not.
HEALTH_CHECK_SECONDS = 3.0
# How long an idle connection to a container, Caddy or a broker upstream is kept for
# reuse. Below the 5 s after which uvicorn and Node close an idle connection (Bun: 10 s):
# a connection kept longer than the server keeps it may be reused just as the server
# closes it, and a POST sent into that close fails (aiohttp retries only idempotent
# methods) — a chat's MCP call or model call lost to a race.
IDLE_KEEPALIVE_SECONDS = 2.0

# A harness's runner in place of the configured one, made from the store's instance id
# (which a real runner marks its containers with).
RunnerFactory = Callable[[str], Runner]


class StartupError(Exception):
    """lovd cannot start; the message says what to fix."""


@dataclass
class Host:
    """Everything :func:`build` made. ``close`` closes what it opened, newest first."""

    config: Config
    host_id: str
    store: Store
    runner: Runner
    http: aiohttp.ClientSession
    metrics: Metrics
    env: SessionEnv
    ready: Readiness
    requests: Requests
    sessions: Sessions
    pool: WarmPool
    broker: Broker
    sync: Sync | None
    caddy: CaddyManager | None
    gate: BrowserGate
    app: web.Application
    public_app: web.Application
    auth_socket: str
    # The runner's Podman children (None for a runner given by a harness).
    spawner: procs.Spawner | None = None
    # Podman's CLI, not its API socket: lovd may follow `podman events` (daemon.py).
    podman_cli: bool = False
    closers: list[Any] = field(default_factory=list)

    async def drain(self) -> None:
        """End the gate's and the sessions' background work (wakes, starts, checks)."""
        await self.gate.drain()
        await self.sessions.drain()

    async def close(self, timeout: float = 1.0) -> None:
        for obj in reversed(self.closers):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(obj.close(), timeout)
        self.closers.clear()


async def build(
    config: Config,
    *,
    listen: str | None = None,
    runner: RunnerFactory | None = None,
    host_id: str | None = None,
    demo_urls: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
    reconcile_hold: float | None = None,
    allowlist: Allowlist | None = None,
    health_checks: Mapping[str, HealthCheck] | None = None,
    version: str = __version__,
) -> Host:
    """lovd as ``config`` says. ``listen``: the API's address when it is not
    ``config.listen`` (the browser path's socket sits beside a unix one). ``runner``:
    makes the runner from the store's instance id; none given, Podman's (through its API
    socket if that answers, else its CLI). ``demo_urls``: none given, demo mode's
    stand-ins start as the config says.
    ``reconcile_hold``: requests about sessions wait up to this for the daemon's start-up
    reconcile (None: no reconcile to wait for). ``health_checks`` are added to (or
    replace) the built ones. Whatever was opened is closed again if building fails."""
    closers: list[Any] = []
    try:
        return await _build(
            config,
            closers,
            listen=listen or config.listen,
            runner_choice=runner,
            host_id=host_id or config.host_id or socket.gethostname(),
            demo_urls=demo_urls,
            clock=clock,
            reconcile_hold=reconcile_hold,
            allowlist=allowlist,
            health_checks=health_checks or {},
            version=version,
        )
    except BaseException:
        # aiosqlite's worker thread would otherwise keep a failed start alive.
        for obj in reversed(closers):
            with contextlib.suppress(Exception):
                await obj.close()
        raise


async def _build(
    c: Config,
    closers: list[Any],
    *,
    listen: str,
    runner_choice: RunnerFactory | None,
    host_id: str,
    demo_urls: Mapping[str, str] | None,
    clock: Callable[[], float],
    reconcile_hold: float | None,
    allowlist: Allowlist | None,
    health_checks: Mapping[str, HealthCheck],
    version: str,
) -> Host:
    store = await Store.open(c.db_path)
    closers.append(store)
    if c.postgres_dsn and c.restore_on_start:  # before the runner: it takes the instance id
        await restore_if_lost(store, c, host_id)
    http = http_client()
    closers.append(http)
    spawner: procs.Spawner | None = None
    podman_cli = False
    if runner_choice is None:
        # Every Podman child of this lovd: own group, death signal, instance marker.
        spawner = procs.Spawner(store.instance_id)
        client = await make_podman_client(c, closers, spawner)
        podman_cli = isinstance(client, PodmanCLI)
        runner = await make_runner(c, client, store.instance_id, spawner)
        limits.announce(c, runner.enforcement(c.userns))
    else:
        runner = runner_choice(store.instance_id)
    metrics = Metrics()
    if demo_urls is None:
        try:
            demo = await demo_mode.start(c)
        except (RuntimeError, OSError) as e:
            raise StartupError(f"demo: {e}") from e
        closers.append(demo)
        demo_urls = demo.urls
    # The host key (container passwords, Caddy's gate key) is created on first use.
    env = SessionEnv(c, load_host_key(c.state_path), dict(demo_urls))
    ready = Readiness(reconcile_hold) if reconcile_hold is not None else Readiness(done=True)
    requests = Requests()
    # Warm containers get their first chat and store their UI files before a claim: the
    # sessions call it when one answers, the gate serves what it prepared.
    landing = ChatLanding(http=http, password_header=env.basic_auth)
    prep = WarmPrep(
        http=http,
        password_header=env.basic_auth,
        landing=landing,
        assets=UiAssets(ui_root(c), http),
        alive=lambda sid: store.get(sid) is not None,
    )
    sessions = Sessions(
        c, store, runner, http, env, metrics, host_id, clock, ready=ready, on_warm_ready=prep.ready
    )
    pool = sessions.pool(c.warm_max_age)
    broker = await Broker.from_config(
        c,
        store=store,
        http=http,
        metrics=metrics,
        demo_urls=dict(demo_urls),
        on_request=requests.seen,
        on_session_call=sessions.touch,
    )
    sync = Sync.create(c, store, host_id, version, metrics) if c.postgres_dsn else None
    if sync is not None:
        closers.append(sync)
    auth_socket = auth_socket_path(c, listen)
    caddy = CaddyManager.from_config(c, auth_socket, env.host_key)
    gate = BrowserGate.from_config(
        c,
        sessions,
        http=http,
        prep=prep,
        # Caddy's dial syntax for the public socket: the chat requests lovd checks.
        self_upstream=f"unix/{auth_socket}",
        route_elsewhere=sync.hosts.upstream_for if sync is not None else None,
        on_request=requests.seen,
        allowlist=allowlist,
    )
    checks = _health_checks(c, store, runner, ready)
    checks["reconcile"] = ready.health
    checks["broker"] = _broker_health(c, broker)
    checks["floors"] = _floors_health(sessions)
    if sync is not None:
        checks["postgres"] = sync.health
    if caddy is not None:
        checks["caddy"] = caddy.health
    checks.update(health_checks)
    app = create_app(
        sessions=sessions,
        gate=gate,
        metrics_=metrics,
        public_url=c.public_url,
        max_body=c.max_body,
        health_checks=checks,
        version=version,
        usage=broker.usage,
        sync=sync,
        requests=requests,
    )
    return Host(
        config=c,
        host_id=host_id,
        store=store,
        runner=runner,
        http=http,
        metrics=metrics,
        env=env,
        ready=ready,
        requests=requests,
        sessions=sessions,
        pool=pool,
        broker=broker,
        sync=sync,
        caddy=caddy,
        gate=gate,
        app=app,
        public_app=create_public_app(gate),
        auth_socket=auth_socket,
        spawner=spawner,
        podman_cli=podman_cli,
        closers=closers,
    )


async def make_podman_client(
    config: Config, http_close: list[Any], spawner: procs.Spawner | None = None
) -> PodmanClient:
    path = config.podman_socket or default_api_socket()
    if path:
        api = PodmanAPI(path)
        http_close.append(api)
        try:
            # _ping: reachable without touching storage, which orphans may still lock.
            await api.ping()
            log.info("using the Podman API socket %s", path)
            return api
        except LovdError as e:
            log.warning("Podman API socket unusable (%s); falling back to the CLI", e.message)
    return PodmanCLI(config.podman, spawner)


async def make_runner(
    config: Config, client: PodmanClient, instance_id: str, spawner: procs.Spawner | None = None
) -> Runner:
    spawner = spawner or procs.Spawner(instance_id)
    kind = config.runner
    if kind == "auto":
        kind = "systemd" if await user_manager_reachable(spawner) else "podman"
    if kind == "systemd":
        if not await user_manager_reachable(spawner):
            raise StartupError(
                "runner: systemd needs the lovd user's systemd manager; enable it with "
                "'loginctl enable-linger lovd' (or set runner: podman)"
            )
        return SystemdRunner(
            client,
            config.podman,
            instance_id,
            restart_attempts=config.restart_attempts,
            ready_timeout=config.ready_timeout,
            spawner=spawner,
        )
    return PodmanRunner(client, config.podman, instance_id, spawner=spawner)


def _floors_health(sessions: Sessions) -> HealthCheck:
    async def check() -> tuple[bool, str]:
        return sessions.admission.floors.summary()

    return check


def _broker_health(config: Config, broker: Broker) -> HealthCheck:
    async def check() -> tuple[bool, str]:
        served = ", ".join(sorted(broker.upstreams)) or "nothing configured"
        return True, f"on {config.broker_listen} for {served}"

    return check


def _health_checks(
    config: Config, store: Store, runner: Runner, ready: Readiness
) -> dict[str, HealthCheck]:
    cache: dict[str, tuple[float, tuple[bool, str]]] = {}

    def cached(name: str, ttl: float, fn: Callable[[], Awaitable[tuple[bool, str]]]) -> Any:
        async def check() -> tuple[bool, str]:
            hit = cache.get(name)
            if hit and time.monotonic() - hit[0] < ttl:
                return hit[1]
            asked_ready = ready.done  # "waiting for the reconcile" is no answer to keep
            result = await fn()
            if asked_ready:
                cache[name] = (time.monotonic(), result)
            return result

        return check

    async def database() -> tuple[bool, str]:
        return True, f"{len(store.all())} sessions"

    async def podman() -> tuple[bool, str]:
        if not ready.done:  # no Podman call before the start-up sweep of orphans
            return False, "waiting for the start-up reconcile"
        try:
            n = len(await asyncio.wait_for(runner.list(), HEALTH_CHECK_SECONDS))
        except LovdError as e:
            return False, e.message
        except TimeoutError:
            return False, f"podman ps did not answer within {HEALTH_CHECK_SECONDS:g} s"
        return True, f"{n} containers ({runner.name} runner)"

    async def image() -> tuple[bool, str]:
        if not ready.done:
            return False, "waiting for the start-up reconcile"
        try:
            there = await asyncio.wait_for(
                runner.client.image_exists(config.image), HEALTH_CHECK_SECONDS
            )
        except (LovdError, TimeoutError):
            return False, f"podman image exists did not answer within {HEALTH_CHECK_SECONDS:g} s"
        if there:
            return True, config.image
        return False, f"{config.image} missing: run 'lovd image build'"

    return {
        "database": database,
        "podman": cached("podman", 5.0, podman),
        "image": cached("image", 30.0, image),
    }


def http_client() -> aiohttp.ClientSession:
    """One pool for containers, Caddy and the broker's upstreams. No per-host limit:
    every session holds an MCP event stream open to the same upstream."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=1024, limit_per_host=0, keepalive_timeout=IDLE_KEEPALIVE_SECONDS
        ),
        auto_decompress=False,
    )
