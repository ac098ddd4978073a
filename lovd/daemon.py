"""``lovd serve``: wire the components together and run until told to stop.

Start-up: open the store, accept requests and tell systemd we are ready at once, then,
in the background, end what a previous lovd of this instance left running (lovd/procs.py)
and reconcile with the containers that really exist (re-adopting sessions that survived a
crash), retrying with backoff until it succeeds. Until then requests about sessions wait
for it (bounded, then 503 with Retry-After) and /api/health reports "reconcile" as not
done; the periodic loops start once it is. Shutdown never stops session containers: they
belong to the user's systemd manager (or conmon), not to us.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from lovd import __version__, egress, limits, procs, runtime_events
from lovd.broker import server as broker_server
from lovd.broker.server import Broker
from lovd.caddy import CaddyManager, auth_socket_path
from lovd.config import Config
from lovd.demo import mode as demo_mode
from lovd.errors import LovdError
from lovd.metrics import Metrics
from lovd.podman import PodmanAPI, PodmanCLI, PodmanClient, default_api_socket
from lovd.runner import PodmanRunner, Runner, SystemdRunner, user_manager_reachable
from lovd.session.lifecycle import Sessions
from lovd.session.reconcile import Readiness
from lovd.store import Store
from lovd.sync.postgres import discard_outbox
from lovd.sync.restore import restore_if_lost
from lovd.sync.service import Sync
from lovd.systemd.activation import listen_fds
from lovd.systemd.notify import Notifier
from lovd.web.app import STATE, create_app
from lovd.web.gate import BrowserGate
from lovd.web.public import serve_public
from lovd.wiring import build_sessions

log = logging.getLogger(__name__)

ACTIVITY_FLUSH_SECONDS = 5.0
# The longest a SIGTERM/SIGINT waits for in-flight work before lovd exits anyway.
SHUTDOWN_SECONDS = 3.0
# One start-up reconcile attempt past this is a stall: it is cancelled (its Podman reads
# are ended) and tried again, after RECONCILE_RETRY doubling up to RECONCILE_RETRY_MAX.
RECONCILE_ATTEMPT_SECONDS = 30.0
RECONCILE_RETRY = 1.0
RECONCILE_RETRY_MAX = 30.0
# How long a request about sessions waits for the start-up reconcile before its 503.
RECONCILE_HOLD_SECONDS = 10.0
# A health check that needs Podman answers within this, or reports that it did not.
HEALTH_CHECK_SECONDS = 3.0


def _exit_now() -> None:
    log.warning("second stop signal: exiting now (session containers keep running)")
    os._exit(1)


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix."""


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


def _process_age() -> float:
    """Seconds since this process was forked (10 ms resolution; 0 if unknown): the time
    before lovd's code runs (systemd's sandbox set-up, the interpreter, imports) is most
    of a socket-activated cold start."""
    try:
        stat_fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(stat_fields[19]) / os.sysconf("SC_CLK_TCK")
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError):
        return 0.0


def _bind_unix(path: str) -> socket.socket:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(p.lstat().st_mode):
            # Ours from a previous run (systemd-owned sockets come via LISTEN_FDS instead).
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(path)
            except OSError:
                p.unlink()
            else:
                raise StartupError(f"another process is already listening on {path}")
            finally:
                probe.close()
        else:
            raise StartupError(f"{path} exists and is not a socket; remove it or change listen")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(512)
    return sock


def _bind(listen: str) -> tuple[socket.socket, str | None]:
    kind, _, where = listen.partition(":")
    if kind == "unix":
        return _bind_unix(where), where
    host, _, port = where.rpartition(":")
    sock = socket.create_server((host or "127.0.0.1", int(port)), backlog=512)
    return sock, None


def _split_activated(
    socks: list[socket.socket], listen: str, auth_path: str, broker: tuple[str, int]
) -> tuple[list[socket.socket], socket.socket | None, socket.socket | None]:
    """Socket activation passes the API socket (lovd.socket), the browser path's
    (lovd-auth.socket) and the broker's (lovd-broker.socket). Each is recognised by the
    exact address its setting names; anything else is refused rather than served as the
    operator API (a mismatch would hand the API to whoever can reach that socket)."""
    api: list[socket.socket] = []
    auth = brk = None
    kind, _, where = listen.partition(":")
    for s in socks:
        name = s.getsockname()
        if s.family == socket.AF_UNIX and name == auth_path:
            auth = s
        elif s.family == socket.AF_UNIX and kind == "unix" and name == where:
            api.append(s)
        elif s.family in (socket.AF_INET, socket.AF_INET6) and (name[0], name[1]) == broker:
            brk = s
        elif (
            s.family in (socket.AF_INET, socket.AF_INET6)
            and kind == "tcp"
            and f"{name[0]}:{name[1]}" == where
        ):
            api.append(s)
        else:
            raise StartupError(
                f"systemd passed a socket lovd does not expect ({name!r}): it is none of "
                f"listen ({listen}), caddy.auth_socket ({auth_path}) or broker.listen "
                f"({broker[0]}:{broker[1]}); make the socket units and lovd.conf agree"
            )
    return api, auth, brk


@dataclass
class Daemon:
    config: Config
    listen_override: str | None = None
    notifier: Notifier = field(default_factory=Notifier)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    app: web.Application | None = None
    sessions: Sessions | None = None
    spawner: procs.Spawner | None = None
    _closers: list[Any] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _unlink: list[str] = field(default_factory=list)

    async def run(self) -> int:
        try:
            return await self._run()
        except BaseException:
            # A failed start must exit at once: aiosqlite's non-daemon worker thread would
            # otherwise keep the process alive until systemd's start timeout.
            for obj in reversed(self._closers):
                with contextlib.suppress(Exception):
                    await obj.close()
            raise

    async def _run(self) -> int:
        t_entry = time.monotonic()
        fork_age = _process_age()
        if os.geteuid() == 0:
            raise StartupError(
                "lovd must not run as root: run it as the lovd user "
                "(systemctl start lovd, or runuser -u lovd -- lovd serve)"
            )
        c = self.config
        for d in (c.state_path, c.sessions_path):
            try:
                d.mkdir(parents=True, exist_ok=True, mode=0o750)
            except OSError as e:
                raise StartupError(f"state_dir: cannot create {d}: {e.strerror}") from e
        try:  # session egress: the OCI hook and its rules (lovd/egress.py)
            egress.install(c)
        except egress.EgressError as e:
            raise StartupError(str(e)) from e
        store = await Store.open(c.db_path)
        self._closers.append(store)
        host_id = c.host_id or socket.gethostname()
        if c.postgres_dsn and c.restore_on_start:  # before the runner: it takes the instance id
            await restore_if_lost(store, c, host_id)
        # One pool for containers, Caddy and the broker's upstreams. No per-host limit:
        # every session holds an MCP event stream open to the same upstream.
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=30),
            auto_decompress=False,
        )
        self._closers.append(http)
        # Every Podman child of this lovd: own group, death signal, instance marker.
        spawner = self.spawner = procs.Spawner(store.instance_id)
        client = await make_podman_client(c, self._closers, spawner)
        runner = await make_runner(c, client, store.instance_id, spawner)
        limits.announce(c, runner.enforcement(c.userns))
        metrics = Metrics()
        try:
            demo = await demo_mode.start(c)
        except (RuntimeError, OSError) as e:
            raise StartupError(f"demo: {e}") from e
        self._closers.append(demo)
        sessions = build_sessions(
            c,
            store=store,
            runner=runner,
            http=http,
            metrics=metrics,
            host_id=host_id,
            demo_urls=demo.urls,
        )
        self.sessions = sessions
        ready = sessions.ready = Readiness(RECONCILE_HOLD_SECONDS)
        broker = await Broker.from_config(
            c,
            store=store,
            http=http,
            metrics=metrics,
            demo_urls=demo.urls,
            on_request=self._seen,
            on_session_call=sessions.touch,
        )

        t_setup = time.monotonic() - t_entry
        checks = _health_checks(c, store, runner, ready)
        checks["reconcile"] = ready.health
        checks["broker"] = lambda: _broker_health(c, broker)
        checks["floors"] = _floors_health(sessions)
        sync = Sync.create(c, store, host_id, __version__, metrics) if c.postgres_dsn else None
        if sync is not None:
            self._closers.append(sync)
            checks["postgres"] = sync.health
        auth_socket = auth_socket_path(c, self.listen_override or c.listen)
        caddy = CaddyManager.from_config(c, auth_socket)
        if caddy is not None:
            checks["caddy"] = caddy.health
        self.app = create_app(
            sessions=sessions,
            metrics_=metrics,
            public_url=c.public_url,
            max_body=c.max_body,
            health_checks=checks,
            version=__version__,
            usage=broker.usage,
            sync=sync,
        )
        app_runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await app_runner.setup()
        socks, auth_sock, broker_sock = _split_activated(
            listen_fds(),
            self.listen_override or c.listen,
            auth_socket,
            (c.broker_host, c.broker_port),
        )
        if not socks:
            sock, unlink = _bind(self.listen_override or c.listen)
            socks = [sock]
            self._unlink += [unlink] if unlink else []
        for s in socks:
            await web.SockSite(app_runner, s, shutdown_timeout=1).start()
        activated = auth_sock is not None
        if auth_sock is None:
            auth_sock = _bind_unix(auth_socket)
            self._unlink.append(auth_socket)
        public = await self._serve_browser_path(sessions, caddy, auth_sock, activated, sync)
        if broker_sock is None:
            try:
                broker_sock = broker_server.bind(c)
            except OSError as e:
                raise StartupError(e.strerror or str(e)) from e
        broker_runner = await broker_server.serve_broker(broker, broker_sock)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        self._every(ACTIVITY_FLUSH_SECONDS, sessions.flush_activity)
        self._every(ACTIVITY_FLUSH_SECONDS, broker.flush)
        if sync is not None:
            sync.start()
        else:
            self._every(60.0, lambda: discard_outbox(store))
        wd = self.notifier.watchdog_interval() if c.watchdog else None
        if wd:
            self._tasks.append(asyncio.create_task(self.notifier.watchdog_loop(wd)))
        if c.idle_exit > 0:
            self._tasks.append(asyncio.create_task(self._idle_exit(c.idle_exit)))
        # Podman events through its CLI only where lovd runs Podman's CLI anyway. With the
        # API socket (a systemd host) lovd never execs podman: a podman started from the
        # hardened lovd.service (NoNewPrivileges: no setuid newuidmap) that finds no pause
        # process makes one inside lovd's sandbox, and every other Podman command then
        # joins namespaces in which no container's network namespace can be reached.
        # There, deaths are found by Caddy's error route and the gate's checks.
        watch_events = isinstance(client, PodmanCLI)
        self._tasks.append(
            asyncio.create_task(self._bring_up(sessions, spawner, runner.name, watch_events))
        )

        where = ", ".join(str(s.getsockname()) for s in socks)
        self.notifier.ready(f"serving on {where}; {len(store.all())} sessions; reconciling")
        t_total = time.monotonic() - t_entry
        log.info(
            "lovd %s serving on %s, %.0f ms after fork (sandbox, interpreter, imports, config "
            "%.0f ms; store, podman and runner %.0f ms; listeners %.0f ms)",
            __version__,
            where,
            (fork_age + t_total) * 1000,
            fork_age * 1000,
            t_setup * 1000,
            (t_total - t_setup) * 1000,
        )
        await self.stop_event.wait()

        self.notifier.stopping("shutting down; session containers keep running")
        log.info("shutting down (session containers keep running)")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _exit_now)  # a second signal: no more waiting
        try:
            await asyncio.wait_for(
                self._shutdown(sessions, caddy, [public, broker_runner, app_runner], broker),
                SHUTDOWN_SECONDS,
            )
        except TimeoutError:
            log.warning(
                "shutdown took longer than %.0f s; exiting anyway (containers keep running, "
                "the next lovd adopts them)",
                SHUTDOWN_SECONDS,
            )
        # What still runs would get lovd's death signal (its group leader only): end the
        # whole groups now, so nothing of ours outlives lovd holding Podman's locks.
        spawner.terminate()
        for path in self._unlink:  # only sockets we bound; systemd's stay for re-activation
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for obj in reversed(self._closers):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(obj.close(), 1.0)
        return 0

    async def _shutdown(
        self,
        sessions: Sessions,
        caddy: CaddyManager | None,
        runners: list[web.AppRunner],
        broker: Broker,
    ) -> None:
        """Stop taking work first (in-flight starts are left for the next lovd, which
        adopts or restarts them), then close the listeners, then write what is pending."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await sessions.drain()
        if caddy is not None:
            await caddy.close()
        await asyncio.gather(*(r.cleanup() for r in runners), return_exceptions=True)
        await sessions.flush_activity()
        await broker.flush()
        if self.spawner is not None:  # a `podman run` under way finishes: the next lovd adopts
            await self.spawner.settle(SHUTDOWN_SECONDS)

    async def _bring_up(
        self, sessions: Sessions, spawner: procs.Spawner, runner: str, watch_events: bool
    ) -> None:
        """In the background, while the API answers: end a previous lovd's orphaned Podman
        children, then reconcile until one attempt succeeds, then start the loops that need
        a reconciled store. A failed or stalled attempt is retried with backoff."""
        c = self.config
        delay = RECONCILE_RETRY
        t0 = time.monotonic()
        while True:
            try:
                await procs.sweep(spawner.instance_id)  # before this lovd's first Podman call
                report = await asyncio.wait_for(
                    sessions.reconcile(startup=True), RECONCILE_ATTEMPT_SECONDS
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure is retried, none is fatal
                if isinstance(e, LovdError):
                    why = e.message
                elif isinstance(e, TimeoutError):
                    why = f"no answer within {RECONCILE_ATTEMPT_SECONDS:g} s"
                else:
                    why = f"{type(e).__name__}: {e}"
                sessions.ready.failed(why, delay)
                log.warning(
                    "start-up reconcile failed (attempt %d): %s; the API answers meanwhile, "
                    "trying again in %g s",
                    sessions.ready.attempts,
                    why,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONCILE_RETRY_MAX)
                continue
            break
        took = time.monotonic() - t0
        summary = (
            f"{len(report['adopted'])} adopted, {len(report['lost'])} lost, "
            f"{len(report['orphans_removed'])} orphans removed (runner {runner})"
        )
        sessions.ready.finished(f"done in {took:.3f} s: {summary}")
        log.info("reconciled in %.3f s: %s", took, summary)
        self.notifier.status(f"serving; {len(sessions.all())} sessions; reconciled")
        self._every(c.health_interval, sessions.health_pass)
        if watch_events:
            # A container's death is known when Podman reports it, not at the next pass.
            events = runtime_events.ContainerEvents(
                c.podman, spawner.instance_id, runtime_events.on_death(sessions), spawn=spawner.exec
            )
            self._tasks.append(asyncio.create_task(events.run(), name="podman-events"))
        self._tasks.append(asyncio.create_task(self._housekeeping(sessions)))
        pool = sessions.pool(c.warm_max_age)
        pool.kick()
        self._tasks.append(asyncio.create_task(pool.run()))

    async def _serve_browser_path(
        self,
        sessions: Sessions,
        caddy: CaddyManager | None,
        auth_sock: socket.socket,
        activated: bool,
        sync: Sync | None = None,
    ) -> web.AppRunner:
        """The public socket Caddy talks to (web/gate.py, web/public.py), then keep Caddy
        configured."""
        gate = BrowserGate.from_config(self.config, sessions, on_request=self._seen)
        if sync is not None:
            gate.route_elsewhere = sync.hosts.upstream_for
        public = await serve_public(gate, auth_sock, ours=not activated)
        if caddy is not None:
            caddy.start()
        return public

    async def _housekeeping(self, sessions: Sessions) -> None:
        """Cleanup when the next session reaches its unused/idle deadline (at least once a
        minute): a place is freed when the landing page said it would be."""
        c = self.config
        # A session created while this sleeps reaches its first deadline no sooner than
        # the shortest timeout: waking at least that often keeps every stop on time.
        timeouts = [t for t in (c.idle_timeout, c.unused_timeout) if t > 0]
        longest = max(1.0, min([60.0, *(t / 2 for t in timeouts)]))
        while True:
            wait = sessions.next_deadline()
            await asyncio.sleep(min(longest, max(1.0, wait + 0.05 if wait is not None else 60)))
            try:
                await sessions.cleanup()
            except Exception:
                log.exception("periodic cleanup failed")

    def _seen(self) -> None:
        """Browser and broker traffic count as activity for idle_exit."""
        if self.app is not None:
            self.app[STATE].last_request = time.monotonic()

    def _every(self, seconds: float, fn: Callable[[], Awaitable[Any]]) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(seconds)
                try:
                    await fn()
                except Exception:
                    log.exception("periodic %s failed", getattr(fn, "__name__", fn))

        self._tasks.append(asyncio.create_task(loop()))

    async def _idle_exit(self, seconds: float) -> None:
        assert self.app is not None
        st = self.app[STATE]
        while True:
            idle = time.monotonic() - st.last_request
            if idle >= seconds:
                log.info("no API requests for %.0f s (idle_exit): exiting", idle)
                self.stop_event.set()
                return
            await asyncio.sleep(max(0.5, seconds - idle))


def _floors_health(sessions: Sessions) -> Callable[[], Awaitable[tuple[bool, str]]]:
    async def check() -> tuple[bool, str]:
        return sessions.admission.floors.summary()

    return check


async def _broker_health(config: Config, broker: Broker) -> tuple[bool, str]:
    served = ", ".join(sorted(broker.upstreams)) or "nothing configured"
    return True, f"on {config.broker_listen} for {served}"


def _health_checks(
    config: Config, store: Store, runner: Runner, ready: Readiness
) -> dict[str, Callable[[], Awaitable[tuple[bool, str]]]]:
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
