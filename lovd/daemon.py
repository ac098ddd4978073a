"""``lovd serve``: build lovd (lovd/wiring.py), serve its listeners, run its loops until
told to stop.

Start-up: build (open the store, …), accept requests and tell systemd we are ready at once, then,
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

from aiohttp import web

from lovd import __version__, egress, procs, runtime_events
from lovd.broker import server as broker_server
from lovd.config import Config
from lovd.errors import LovdError
from lovd.session.lifecycle import Sessions
from lovd.sync.postgres import discard_outbox
from lovd.systemd.activation import listen_fds
from lovd.systemd.notify import Notifier
from lovd.web.public import serve_public
from lovd.wiring import Host, StartupError, build

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


def _exit_now() -> None:
    log.warning("second stop signal: exiting now (session containers keep running)")
    os._exit(1)


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
    host: Host | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _unlink: list[str] = field(default_factory=list)

    async def run(self) -> int:
        try:
            return await self._run()
        except BaseException:
            # A failed start must exit at once: aiosqlite's non-daemon worker thread would
            # otherwise keep the process alive until systemd's start timeout.
            if self.host is not None:
                await self.host.close()
            raise

    async def _run(self) -> int:
        t_entry = time.monotonic()
        fork_age = _process_age()
        self._prepare()
        listen = self.listen_override or self.config.listen
        host = self.host = await build(
            self.config, listen=listen, reconcile_hold=RECONCILE_HOLD_SECONDS
        )
        t_setup = time.monotonic() - t_entry
        runners, where = await self._serve(host, listen)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        self._start_loops(host)
        self.notifier.ready(f"serving on {where}; {len(host.store.all())} sessions; reconciling")
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
            await asyncio.wait_for(self._shutdown(host, runners), SHUTDOWN_SECONDS)
        except TimeoutError:
            log.warning(
                "shutdown took longer than %.0f s; exiting anyway (containers keep running, "
                "the next lovd adopts them)",
                SHUTDOWN_SECONDS,
            )
        # What still runs would get lovd's death signal (its group leader only): end the
        # whole groups now, so nothing of ours outlives lovd holding Podman's locks.
        if host.spawner is not None:
            host.spawner.terminate()
        for path in self._unlink:  # only sockets we bound; systemd's stay for re-activation
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        await host.close()
        return 0

    def _prepare(self) -> None:
        """What must hold before anything is built: not root, the state directories, the
        session egress hook and its rules (lovd/egress.py)."""
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
        try:
            egress.install(c)
        except egress.EgressError as e:
            raise StartupError(str(e)) from e

    async def _serve(self, host: Host, listen: str) -> tuple[list[web.AppRunner], str]:
        """The API, the browser path (then Caddy is kept configured) and the broker, on
        sockets systemd passed or bound here; the runners and where the API listens."""
        c = self.config
        app_runner = web.AppRunner(host.app, access_log=None, handle_signals=False)
        await app_runner.setup()
        socks, auth_sock, broker_sock = _split_activated(
            listen_fds(), listen, host.auth_socket, (c.broker_host, c.broker_port)
        )
        if not socks:
            sock, unlink = _bind(listen)
            socks = [sock]
            self._unlink += [unlink] if unlink else []
        for s in socks:
            await web.SockSite(app_runner, s, shutdown_timeout=1).start()
        activated = auth_sock is not None
        if auth_sock is None:
            auth_sock = _bind_unix(host.auth_socket)
            self._unlink.append(host.auth_socket)
        public = await serve_public(host.public_app, auth_sock, ours=not activated)
        if host.caddy is not None:
            host.caddy.start()
        if broker_sock is None:
            try:
                broker_sock = broker_server.bind(c)
            except OSError as e:
                raise StartupError(e.strerror or str(e)) from e
        broker_runner = await broker_server.serve_broker(host.broker, broker_sock)
        where = ", ".join(str(s.getsockname()) for s in socks)
        return [public, broker_runner, app_runner], where

    def _start_loops(self, host: Host) -> None:
        c = self.config
        self._every(ACTIVITY_FLUSH_SECONDS, host.sessions.flush_activity)
        self._every(ACTIVITY_FLUSH_SECONDS, host.broker.flush)
        if host.sync is not None:
            host.sync.start()
        else:
            self._every(60.0, lambda: discard_outbox(host.store))
        wd = self.notifier.watchdog_interval() if c.watchdog else None
        if wd:
            self._tasks.append(asyncio.create_task(self.notifier.watchdog_loop(wd)))
        if c.idle_exit > 0:
            self._tasks.append(asyncio.create_task(self._idle_exit(host, c.idle_exit)))
        self._tasks.append(asyncio.create_task(self._bring_up(host)))

    async def _shutdown(self, host: Host, runners: list[web.AppRunner]) -> None:
        """Stop taking work first (in-flight starts are left for the next lovd, which
        adopts or restarts them), then close the listeners, then write what is pending."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await host.sessions.drain()
        if host.caddy is not None:
            await host.caddy.close()
        await asyncio.gather(*(r.cleanup() for r in runners), return_exceptions=True)
        await host.sessions.flush_activity()
        await host.broker.flush()
        if host.spawner is not None:  # a `podman run` under way finishes: the next lovd adopts
            await host.spawner.settle(SHUTDOWN_SECONDS)

    async def _bring_up(self, host: Host) -> None:
        """In the background, while the API answers: end a previous lovd's orphaned Podman
        children, then reconcile until one attempt succeeds, then start the loops that need
        a reconciled store. A failed or stalled attempt is retried with backoff."""
        c = self.config
        sessions, ready, spawner = host.sessions, host.ready, host.spawner
        assert spawner is not None  # the daemon's runner is always Podman's
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
                ready.failed(why, delay)
                log.warning(
                    "start-up reconcile failed (attempt %d): %s; the API answers meanwhile, "
                    "trying again in %g s",
                    ready.attempts,
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
            f"{len(report['orphans_removed'])} orphans removed (runner {host.runner.name})"
        )
        ready.finished(f"done in {took:.3f} s: {summary}")
        log.info("reconciled in %.3f s: %s", took, summary)
        self.notifier.status(f"serving; {len(sessions.all())} sessions; reconciled")
        self._every(c.health_interval, sessions.health_pass)
        # Podman events through its CLI only where lovd runs Podman's CLI anyway. With the
        # API socket (a systemd host) lovd never execs podman: a podman started from the
        # hardened lovd.service (NoNewPrivileges: no setuid newuidmap) that finds no pause
        # process makes one inside lovd's sandbox, and every other Podman command then
        # joins namespaces in which no container's network namespace can be reached.
        # There, deaths are found by Caddy's error route and the gate's checks.
        if host.podman_cli:
            # A container's death is known when Podman reports it, not at the next pass.
            events = runtime_events.ContainerEvents(
                c.podman, spawner.instance_id, runtime_events.on_death(sessions), spawn=spawner.exec
            )
            self._tasks.append(asyncio.create_task(events.run(), name="podman-events"))
        self._tasks.append(asyncio.create_task(self._housekeeping(sessions)))
        host.pool.kick()
        self._tasks.append(asyncio.create_task(host.pool.run()))

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

    def _every(self, seconds: float, fn: Callable[[], Awaitable[Any]]) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(seconds)
                try:
                    await fn()
                except Exception:
                    log.exception("periodic %s failed", getattr(fn, "__name__", fn))

        self._tasks.append(asyncio.create_task(loop()))

    async def _idle_exit(self, host: Host, seconds: float) -> None:
        """Browser, broker and API traffic count as activity (wiring.py's Requests)."""
        while True:
            idle = time.monotonic() - host.requests.last
            if idle >= seconds:
                log.info("no API requests for %.0f s (idle_exit): exiting", idle)
                self.stop_event.set()
                return
            await asyncio.sleep(max(0.5, seconds - idle))
