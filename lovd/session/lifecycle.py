"""The facade the web layer and the daemon use: create, get, wake, stop, delete, touch.

Every state change is a transition of the one writer (machine.py: the table, the
compare-and-set, the outbox, the waiters); waiting for a session (a wake) is a wait on
those transitions (wakes.py), one wake per session whichever socket asked. Each session has its own
lock (launcher.py), so concurrent requests for one session serialize while different
sessions proceed in parallel; the admission lock is always taken before a session's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp

from lovd import ids
from lovd.config import Config
from lovd.errors import LovdError
from lovd.metrics import Metrics
from lovd.runner import Runner
from lovd.session.admission import Admission
from lovd.session.health import VOUCH_SECONDS, Health
from lovd.session.housekeeping import Activity, Housekeeping
from lovd.session.launcher import Launcher, SessionEnv
from lovd.session.links import Links
from lovd.session.machine import StateMachine
from lovd.session.model import Session, SessionState
from lovd.session.quota import DiskQuota, podman_du
from lovd.session.reconcile import Readiness, Reconciler
from lovd.session.starts import Starts
from lovd.session.wakes import Wakes
from lovd.session.warm import Warm, WarmPool
from lovd.store import StaleRow, Store

log = logging.getLogger(__name__)


class Sessions:
    def __init__(
        self,
        config: Config,
        store: Store,
        runner: Runner,
        http: aiohttp.ClientSession,
        env: SessionEnv,
        metrics: Metrics,
        host_id: str,
        clock: Callable[[], float] = time.time,
        *,
        ready: Readiness | None = None,
        on_warm_ready: Callable[[Session], Awaitable[None]] | None = None,
    ) -> None:
        """Built by lovd/wiring.py. ``ready``: the start-up reconcile's progress (the
        daemon reports into it; requests about sessions wait for it); none given, the
        facade is ready at once. ``on_warm_ready``: called with each warm container once it
        answers (web/warmprep.py)."""
        self._config = config
        self._store = store
        self._runner = runner
        self._env = env
        self._metrics = metrics
        self.host_id = host_id
        self._clock = clock
        now = self._now  # every part reads the clock through here
        self._tasks: set[asyncio.Task[None]] = set()
        self._activity = Activity(store, now)
        self.machine = StateMachine(store, metrics)
        self.launcher = Launcher(config, store, runner, http, env, metrics)
        self.starts = Starts(store, self.machine, self.launcher, now)
        self.housekeeping = Housekeeping(
            config,
            store,
            self._activity,
            stop=self.stop,
            delete=self.delete,
            busy=self.launcher.busy,
            clock=now,
        )
        self.admission = Admission(
            config, store, self.housekeeping.frees_at, now, host_id, self.machine
        )
        self.warm_pool = Warm(
            config,
            store,
            self.launcher,
            self.admission,
            machine=self.machine,
            starts=self.starts,
            spawn=self._spawn,
            clock=now,
            on_ready=on_warm_ready,
        )
        # One wake per session, whichever socket asked; it waits out a row someone else
        # is moving for as long as the gate holds a request (web/gate.py).
        self.wakes = Wakes(self.machine, self.wake, config.ready_timeout + 5.0)
        self.health = Health(
            config,
            store,
            self.launcher,
            machine=self.machine,
            starts=self.starts,
            clock=now,
            lost=self._lost,
        )
        self.disk = DiskQuota(
            config.disk_quota,
            workspace=lambda sid: config.sessions_path / sid,
            fallback=functools.partial(podman_du, config.podman),
        )
        self.links = Links(store, now)
        self.reconciler = Reconciler(
            config,
            store,
            self.launcher,
            metrics,
            machine=self.machine,
            discard_warm=self.discard_warm,
        )
        self._ready = ready or Readiness(done=True)
        # Set whenever a place may have freed up or a warm container was used; the warm
        # pool's refill loop (:meth:`pool`) waits on it.
        self._refill = asyncio.Event()
        metrics.track_sessions(self.count_by_state)

    def _now(self) -> float:
        return self._clock()

    def pool(self, max_age: float, retry_delay: float = 30.0) -> WarmPool:
        """The warm pool's refill loop, kicked whenever capacity changes."""
        return WarmPool(
            self.warm_pool, max_age, self._now, retry_delay=retry_delay, kick=self._refill
        )

    def capacity_changed(self) -> None:
        """A place may have freed up or a warm container was used: the pool refills."""
        self._refill.set()

    def _claimed(self) -> None:
        """A warm container was claimed: refill after ``warm_refill_delay``, so the next
        container's boot does not compete for CPU with the claimed chat's first page."""
        delay = self._config.warm_refill_delay
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self.capacity_changed)
        else:
            self.capacity_changed()

    async def wait_ready(self) -> None:
        """Until the start-up reconcile is done (bounded: then LovdError 503)."""
        await self._ready.wait()

    # --- queries ---

    def count_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self._store.all():
            counts[s.status] = counts.get(s.status, 0) + 1
        return counts

    def lock(self, session_id: str) -> asyncio.Lock:
        return self.launcher.lock(session_id)

    def get(self, session_id: str) -> Session:
        s = self._store.get(ids.check(session_id))
        if s is None or not s.visible:
            raise LovdError("session-not-found", f"no session {session_id}")
        return s

    def all(self) -> list[Session]:
        return [s for s in self._store.all() if s.visible]

    def warm(self) -> list[Session]:
        return self.warm_pool.rows()

    def running_count(self) -> int:
        return self.admission.running_count()

    # --- what the web layer needs, without reaching into the store or the settings ---

    def find(self, session_id: str) -> Session | None:
        """The row of ``session_id`` whatever its state (a warm one too), or None."""
        return self._store.get(session_id)

    def container_auth(self, session_id: str) -> str:
        """The ``Authorization`` header of the session's own OpenCode server."""
        return self._env.basic_auth(session_id)

    def now(self) -> float:
        return self._clock()

    def allowed_models(self) -> frozenset[str]:
        """The models ("provider/model") a session may use."""
        return self._config.allowed_models(self._env.demo_urls.get("model", ""))

    @property
    def limit(self) -> int:
        """limits.max_running: the places."""
        return self._config.max_running

    @property
    def host_key(self) -> bytes:
        return self._env.host_key

    async def history(self, session_id: str) -> dict[str, list[dict[str, Any]]]:
        return await self._store.history(session_id)

    def retry_after(self) -> int:
        return self.admission.retry_after()

    def next_deadline(self) -> float | None:
        return self.housekeeping.next_deadline()

    def warm_wanted(self) -> int:
        return self.warm_pool.wanted()

    @property
    def secrets_dir(self) -> Path:
        return self.launcher.secrets_dir

    # --- activity ---

    @property
    def activity(self) -> dict[str, float]:
        return self._activity.seen

    def touch(self, sid: str) -> None:
        """Record activity (cheap, in memory; flushed to the store periodically)."""
        self._activity.touch(sid)

    def mark_used(self, sid: str) -> None:
        """The session's browser sent a chat request: it no longer counts as unused."""
        self._activity.mark_used(sid)

    async def flush_activity(self) -> None:
        await self._activity.flush()

    async def cleanup(self) -> list[tuple[str, str]]:
        """Apply the expiry and idle policy once; what it deleted, as (id, reason)."""
        return await self.housekeeping.cleanup()

    async def reconcile(self, *, startup: bool = False) -> dict[str, list[str]]:
        """Make actual containers match the store: adopt, mark vanished, collect orphans,
        and start again what the previous lovd was starting when it stopped."""
        finished = await self.finish_deletes()
        report = await self.reconciler.reconcile(startup=startup)
        report["deletes_finished"] = finished
        for sid in report["resume"]:
            self._spawn(self._logged(self.starts.start(sid), sid))
        return report

    async def _lost(self, sid: str) -> None:
        """A running session's container is gone (a check, a Podman event): reconcile
        records it (``stopped``, its secret dropped) through the one path that does."""
        await self.reconcile()

    def vouched(self, s: Session) -> bool:
        """Has the session's container answered lately: a probe, or the readiness check
        of a start within the last VOUCH_SECONDS?"""
        return self.health.vouched(s.id) or 0 <= self._now() - s.started_at < VOUCH_SECONDS

    def check_container(self, sid: str, why: str) -> asyncio.Task[str]:
        """Look at the session's container now (health.py, Health.check_now)."""
        return self.health.check_now(sid, why)

    async def health_pass(self) -> dict[str, list[str]]:
        """Every health.interval: reconcile, then probe running sessions (health.py)."""
        await self.reconcile()
        return await self.health.check()

    async def health_report(self, sid: str) -> dict[str, Any]:
        """GET /api/sessions/{id}/health: the probe history, restarts, failure class."""
        s = self.get(sid)
        report: dict[str, Any] = {"id": s.id, **self.health.view(s)}
        report["history"] = (await self._store.history(s.id, self._config.health_history))["health"]
        return report

    # --- create / wake ---

    async def create(self, wait: bool = True, client: str = "") -> tuple[Session, str]:
        """Create and start a session. Returns the session and its cookie secret (shown
        once; a link is made with :meth:`new_link`). ``client``: the browser's address key
        (web/ratelimit.py client_key), for browser.max_running_per_client."""
        self.check_limits()
        token = ids.new_token()
        token_hash = ids.hash_token(token)
        async with self.admission.lock:
            self.admission.admit(client)
            self.admission.check_floors()
            now = self._clock()
            session = await self._claim_warm(token_hash, now)
            warm = session is not None
            if session is None:
                session = await self.admission.insert(SessionState.CREATING, token_hash, now)
            self.admission.hold(session.id, client)
        sid = session.id
        log.info("session created%s", " (warm pool)" if warm else "", extra={"SESSION_ID": sid})
        self._metrics.sessions_created.inc()
        self._metrics.warm_claims.labels("hit" if warm else "miss").inc()
        start = self.warm_pool.claim(sid) if warm else self.starts.start(sid)
        if warm:
            self._claimed()
        if wait:
            session = await start
        else:
            self._spawn(self._logged(start, sid))
        return session, token

    def check_limits(self) -> None:
        """503 before any row changes where a session's limits would not hold (the
        launcher checks again at every start)."""
        self.launcher.check_limits()

    async def _claim_warm(self, token_hash: str, now: float) -> Session | None:
        """Give a warm row to a new owner. A compare-and-set on its state: a discard that
        got there first wins and the claim tries the next row (or a cold start)."""
        while (warm := self.warm_pool.pick()) is not None:
            try:
                # "starting" until the claim has confirmed the container still answers.
                return await self.machine.transition(
                    warm.id,
                    SessionState.STARTING,
                    expect=(SessionState.WARM,),
                    reason="from the warm pool",
                    event="claimed",
                    token_hash=token_hash,
                    created_at=now,
                    expires_at=self._config.expires_at(now),
                    last_activity=now,
                )
            except (StaleRow, KeyError):
                continue
        return None

    async def wake(self, sid: str, client: str = "") -> Session:
        """Start a stopped session again (same workspace), subject to admission (and to
        browser.max_running_per_client for the ``client`` that woke it)."""
        session = self.get(sid)
        if session.serving:
            return session
        secret = ""
        if session.status != SessionState.STARTING:
            self.check_limits()
            async with self.admission.lock:
                self.admission.admit(client)
                self.admission.hold(sid, client)
                async with self.lock(sid):
                    session = self.get(sid)  # a delete may have won the lock: 404, not 500
                    if session.serving:
                        return session
                    secret = await self.starts.begin(sid, "waking")
                self.warm_pool.make_room()
        return await self.starts.start(sid, secret=secret)

    def ensure_waking(self, sid: str, client: str = "") -> asyncio.Task[None]:
        """The one wake of ``sid`` (wakes.py), whichever socket's request asked."""
        return self.wakes.ensure(sid, client)

    def wake_error(self, sid: str) -> LovdError | None:
        """Why the last wake of ``sid`` failed, while no other is under way."""
        return None if self.wakes.waking(sid) else self.wakes.error(sid)

    async def wait(
        self, sid: str, until: Callable[[Session], bool], timeout: float
    ) -> Session | None:
        """``sid``'s row once ``until`` holds (None: it is gone); woken by its state
        changes, ``TimeoutError`` after ``timeout``."""
        return await self.machine.wait(sid, until, timeout)

    async def drain_wakes(self) -> None:
        await self.wakes.drain()

    # --- links (session/links.py) ---

    async def new_link(self, sid: str) -> str:
        """A fresh single-use link token for ``sid``; earlier links stop working."""
        self.get(sid)
        return await self.links.mint(sid)

    async def redeem_link(
        self, sid: str, token: str, *, rotate: bool = True
    ) -> tuple[Session, str]:
        """Use ``sid``'s link up; with ``rotate``, the browser's new cookie secret."""
        return await self.links.redeem(sid, token, rotate=rotate)

    # --- stop / delete ---

    async def stop(
        self, sid: str, to: SessionState = SessionState.STOPPED, reason: str = ""
    ) -> Session:
        """Stop ``sid``'s container (under its lock: a start under way finishes first) and
        make it ``to``; its workspace stays, its next request wakes it. A row that is
        ``to`` already is left as it is. ``LovdError`` from the runner leaves it
        ``stopping`` (a later stop retries)."""
        async with self.lock(sid):
            current = self.get(sid)
            if current.status == to:
                return current
            await self.machine.transition(sid, SessionState.STOPPING, reason=reason)
            await self.launcher.stop_container(sid)
            session = await self.machine.transition(
                sid, to, reason=reason, container_id="", broker_hash=""
            )
        self.capacity_changed()
        return session

    async def delete(self, sid: str, reason: str = "deleted by request") -> None:
        """Crash-safe, in this order: a tombstone (the session is gone for the API and
        for PostgreSQL, which sees the delete once), the container, the workspace, the
        tombstone. Cut anywhere, the next reconcile finishes it (finish_deletes)."""
        async with self.lock(sid):
            self.get(sid)
            await self.machine.delete(sid, reason)
            self._forget(sid)
            await self._remove(sid)
        self.launcher.forget(sid)
        log.info("session deleted: %s", reason, extra={"SESSION_ID": sid})
        self.capacity_changed()

    def _forget(self, sid: str) -> None:
        self._activity.forget(sid)
        self.health.forget(sid)

    async def _remove(self, sid: str) -> None:
        await self.launcher.stop_container(sid)
        await self._runner.remove_workspace(self._config.sessions_path / sid)
        await self._store.purge(sid)

    async def finish_deletes(self) -> list[str]:
        """Finish deletes a crash (or a failed container or workspace removal) cut short:
        each tombstone's container and workspace go, then the tombstone."""
        done = []
        for sid in await self._store.tombstones():
            lock = self.lock(sid)
            if lock.locked():
                continue  # its delete is still running
            async with lock:
                try:
                    await self._remove(sid)
                except LovdError as e:
                    log.warning(
                        "finishing an interrupted delete failed (retried at the next "
                        "reconcile): %s",
                        e.message,
                        extra={"SESSION_ID": sid},
                    )
                    continue
            self.launcher.forget(sid)
            self._forget(sid)
            log.info("finished an interrupted delete", extra={"SESSION_ID": sid})
            done.append(sid)
        return done

    # --- the warm pool ---

    async def discard_warm(self, sid: str, reason: str) -> None:
        await self.warm_pool.discard(sid, reason)

    # --- background work ---

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _logged(self, start: Coroutine[Any, Any, Session], sid: str) -> None:
        try:
            await start
        except LovdError as e:
            log.warning("session start failed: %s", e.message, extra={"SESSION_ID": sid})

    async def drain(self) -> None:
        await self.wakes.drain()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.health.drain()
