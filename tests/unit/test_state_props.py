"""lovd's session API as a state machine, under faults (Hypothesis ``RuleBasedStateMachine``).

Random programs of API calls (create with and without waiting, get, list, the browser's
wake through the forward_auth gate, delete), operator actions (stop through
POST /api/sessions/{id}/stop, health pass, reconcile, cleanup after the clock moved), the
warm pool (``warm_pool`` 0, 1 or 2 per example: its refill pass in the foreground or
racing the other steps, creates that claim a warm container, warm containers recycled by
age, given up for a place, or vanishing) and faults (a container vanishes, a container
hangs so its probes fail, a start never gets ready, a runner call raises or hangs until
its deadline, lovd restarts mid-start on the same SQLite file) run against the real
stack: lovd as ``lovd serve`` builds it (lovd/wiring.py), the API app and the public app on
test servers, SQLite, and a PostgreSQL relay whose server is down the whole time (so the
outbox keeps every row). Containers are tests/fakes.py's FakeRunner (real HTTP servers
on the sessions' ports), so readiness and health probes are real requests.

After every step the invariants hold:

- every state change in the outbox (each session's rows in version order) is allowed by
  lovd/session/model.py's TRANSITIONS;
- the outbox has every change exactly once: per session versions 1, 2, 3, … without gap
  or repeat, nothing after its deletion, and the live row's version is its last row's;
- every session a create answered 2xx for exists, or a delete was asked for it, or the
  expiry policy deleted it (cleanup's answer);
- no session stays in ``creating``/``starting`` longer than ready_timeout + the longest
  injected hang + a bound;
- at most one container per session (the fake runner, like the real ones, runs with
  podman's --replace: a start over a live container replaces it; how often that happened
  is printed), and no session without a reason to have one (stopped, failed,
  idle-stopped, deleted) keeps one — once a Podman stop failed, only after the next
  reconcile (``settle``);
- no request was answered 500 (an unexpected exception).

In CI (CI=true) at least 2,000 steps run, deterministically (derandomize), and the warm
pool's transitions (new -> warm, a claim, a warm row dropped when its start failed) must
have happened; locally fewer, with a random seed. Run with -s to see how many examples and
steps ran and which of the table's transitions were seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from lovd import config
from lovd.caddy import GATE_HEADER, gate_key
from lovd.config import Config
from lovd.errors import LovdError
from lovd.session.lifecycle import Sessions
from lovd.session.model import TRANSITIONS, SessionState, allowed
from lovd.store import Store
from lovd.sync.service import Sync
from lovd.web.gate import BrowserGate
from lovd.wiring import Host, build
from tests.conftest import IN_CI
from tests.fakes import FakeRunner

T = TypeVar("T")
Client = TestClient[web.Request, web.Application]

READY_TIMEOUT = 1.0  # the smallest ready_timeout config allows
HANG = 0.3  # how long an injected runner hang lasts before its deadline fires
# Beyond ready_timeout + HANG, how long a start may take on a loaded 2-core machine.
BOUND = 4.0
# No step may take longer (a hung request or start is a failure, not a hung test run).
STEP_LIMIT = 30.0
# Examples and steps: CI runs at least 2,000 steps in all.
EXAMPLES, STEPS = (80, 50) if IN_CI else (10, 30)
# A longer hunt: LOVD_STATEPROP_EXAMPLES=500 (a random seed unless CI=true).
EXAMPLES = int(os.environ.get("LOVD_STATEPROP_EXAMPLES", EXAMPLES))
MIN_CI_STEPS = 2000

NAV = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate", "Accept-Language": "en"}
XHR = {"Accept": "application/json", "Sec-Fetch-Mode": "cors"}

# What ran, over every example (printed by the test, checked in CI).
RAN: Counter[str] = Counter()
SEEN: Counter[tuple[str | None, str]] = Counter()  # state changes, (from, to)

WARM_MAX_AGE = 600  # time_passes moves the clock past it: the refill recycles old ones
# The warm pool's transitions a CI run must have driven: filled, claimed, dropped when its
# start failed.
WARM_SEEN = frozenset(
    {
        (None, SessionState.WARM),
        (SessionState.WARM, SessionState.STARTING),
        (SessionState.WARM, SessionState.DELETED),
    }
)

_RESTING = frozenset({SessionState.STOPPED, SessionState.FAILED, SessionState.IDLE_STOPPED})
_IN_START = frozenset({SessionState.CREATING, SessionState.STARTING})


def _port_base() -> int:
    """The first of 201 ports no one listens on, below the ephemeral range that the other
    tests' unused_tcp_port_factory draws from."""
    for base in range(21000, 31000, 211):
        try:
            for port in range(base, base + 201):
                with socket.socket() as s:
                    # As aiohttp's sites bind: a port in TIME_WAIT is free.
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free range of 201 ports between 21000 and 31000")


class Clock:
    """lovd's clock (Sessions takes one): real time plus what the test moved it by."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclasses.dataclass
class Stack:
    """One lovd: what ``lovd serve`` builds (lovd/wiring.py) on a store file, with the fake
    runner."""

    host: Host
    store: Store
    sessions: Sessions
    sync: Sync
    api: Client
    public: Client
    gate: BrowserGate
    key: str

    @classmethod
    async def open(cls, cfg: Config, runner: FakeRunner, clock: Clock) -> Stack:
        host = await build(
            cfg, runner=lambda _: runner, host_id="h1", demo_urls={}, clock=clock, version="0"
        )
        try:
            assert host.sync is not None
            sessions = host.sessions
            # As the daemon does (_bring_up): the start-up reconcile, retried until it
            # succeeds (an injected Podman fault may fail an attempt), before sessions are
            # served.
            for attempt in range(3):
                try:
                    await sessions.reconcile(startup=True)
                    break
                except LovdError:
                    if attempt == 2:
                        raise
            # No cookie jars: every request carries exactly the cookie the test gives it.
            api = TestClient(TestServer(host.app), cookie_jar=aiohttp.DummyCookieJar())
            public = TestClient(TestServer(host.public_app), cookie_jar=aiohttp.DummyCookieJar())
            await api.start_server()
            await public.start_server()
            host.sync.start()
        except BaseException:
            await host.close()
            raise
        return cls(
            host,
            host.store,
            sessions,
            host.sync,
            api,
            public,
            host.gate,
            gate_key(sessions.host_key),
        )

    async def close(self) -> None:
        """lovd stops (the daemon's order): in-flight starts are cancelled and left for the
        next lovd, then the listeners, then the rest. Every step runs even if one fails (an
        open store's thread would keep the test process alive)."""
        try:
            await self.host.drain()
        finally:
            try:
                await self.public.close()
                await self.api.close()
            finally:
                await self.host.close()


@dataclasses.dataclass
class Row:
    """What the outbox said about one session so far."""

    version: int = 0
    status: str | None = None
    at: float = 0.0  # time.time() of its last outbox row
    closed: bool = False  # its deletion was written
    trail: list[str] = dataclasses.field(default_factory=list)


class LovdMachine(RuleBasedStateMachine):
    sids = Bundle("sids")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="lovd-stateprop-"))
        self.base = _port_base()
        self.cfg = self._config(warm_pool=0)
        self.clock = Clock()
        self.runner = FakeRunner()
        self.stack: Stack | None = None
        self.bg: set[asyncio.Task[Any]] = set()
        # The model: what the test did and saw.
        self.created: set[str] = set()  # a create answered 2xx
        self.delete_asked: set[str] = set()
        self.deleted_204: set[str] = set()
        self.expired: set[str] = set()  # cleanup answered that it deleted them
        self.links: dict[str, str] = {}  # sid -> its link token, until used
        self.cookies: dict[str, str] = {}  # sid -> the browser's cookie header
        self.rows: dict[str, Row] = {}
        self.seq = 0
        self.errors_500: list[str] = []
        self.pool_died: list[str] = []  # a refill pass raised
        # An injected stop failure fired: a container lovd could not stop may outlive its
        # session until the next reconcile.
        self.stop_armed = False
        self.stop_failed = False
        RAN["examples"] += 1

    def _config(self, warm_pool: int) -> Config:
        return config.from_mapping(
            {
                "state_dir": str(self.tmp / "state"),
                "runtime_dir": str(self.tmp / "run"),
                "public_url": "http://chat.test",
                "port_range": f"{self.base}-{self.base + 200}",
                "warm_pool": warm_pool,
                "warm_max_age": WARM_MAX_AGE,
                "ready_timeout": READY_TIMEOUT,
                "unused_timeout": 60,
                "idle_timeout": 120,
                "session_ttl": 900,
                "delete_after": 300,
                "orphan_grace": 0,
                "limits": {"max_running": 4},
                "health": {
                    "failures": 1,
                    "probe_timeout": 0.2,
                    "restart_attempts": 1,
                    "restart_window": 600,
                },
                "browser": {"auth_failures": 1000},
                "caddy": {"admin": ""},
                # PostgreSQL is down all along: nothing listens on port 1.
                "postgres": {
                    "dsn": "postgresql://lovd@127.0.0.1:1/lovd",
                    "connect_timeout": 0.5,
                    "read_timeout": 0.5,
                    "max_backoff": 0.5,
                },
            }
        )

    # --- plumbing ---

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """One step's work on the example's loop; a step that hangs fails the example."""
        RAN["steps"] += 1
        return self.loop.run_until_complete(asyncio.wait_for(coro, STEP_LIMIT))

    @property
    def s(self) -> Stack:
        assert self.stack is not None
        return self.stack

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self.loop.create_task(coro)
        self.bg.add(task)
        task.add_done_callback(self.bg.discard)

    def _seen(self, where: str, status: int, body: str) -> None:
        if status == 500:
            self.errors_500.append(f"{where}: {body[:300]}")

    async def _request(self, client: Client, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with client.request(method, path, allow_redirects=False, **kw) as r:
            text = await r.text()
            self._seen(f"{method} {path}", r.status, text)
            try:
                body = json.loads(text) if text else None
            except ValueError:
                body = text
            if "Set-Cookie" in r.headers:
                body = (body, r.cookies)
            return r.status, body

    async def _settle(self, limit: float) -> None:
        """Let every request and start under way finish (at most ``limit`` seconds)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            stack = self.stack
            pending = [t for t in self.bg if not t.done()]
            if stack is not None:  # background starts, and the gate's wakes
                pending += [t for t in stack.sessions._tasks if not t.done()]
                pending += [t for t in stack.sessions.wakes._tasks.values() if not t.done()]
            if not pending:
                return
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))

    @initialize(warm_pool=st.sampled_from([0, 1, 2]))
    def boot(self, warm_pool: int = 0) -> None:
        self.cfg = self._config(warm_pool)
        self.cfg.sessions_path.mkdir(parents=True)
        RAN[f"warm_pool={warm_pool}"] += 1
        self.stack = self.loop.run_until_complete(Stack.open(self.cfg, self.runner, self.clock))

    def teardown(self) -> None:
        try:
            if self.stack is not None:
                # The last invariant check after everything under way has finished.
                self.loop.run_until_complete(self._settle(READY_TIMEOUT + HANG + BOUND))
                self.loop.run_until_complete(self._check())
        finally:
            RAN["replaced"] += len(self.runner.replaced)
            try:
                self.loop.run_until_complete(self._close())
            finally:
                self.loop.close()
                shutil.rmtree(self.tmp, ignore_errors=True)

    async def _close(self) -> None:
        for t in list(self.bg):
            t.cancel()
        await asyncio.gather(*self.bg, return_exceptions=True)
        try:
            if self.stack is not None:
                await self.stack.close()
        finally:
            self.stack = None
            await self.runner.close()

    # --- the API ---

    @rule(target=sids, wait=st.booleans())
    def create(self, wait: bool) -> Any:
        status, body = self.run(
            self._request(self.s.api, "POST", "/api/sessions", json={"wait": wait})
        )
        if not 200 <= status < 300:
            assert status in (429, 502, 503, 504), (status, body)
            return multiple()
        sid = body["id"]
        self.created.add(sid)
        self.links[sid] = body["token"]
        return sid

    @rule(sid=sids)
    def get(self, sid: str) -> None:
        status, body = self.run(self._request(self.s.api, "GET", f"/api/sessions/{sid}"))
        row = self.s.store.get(sid)
        if row is None:
            assert status == 404, (status, body)
        else:
            assert status == 200, (status, body)

    @rule()
    def list_all(self) -> None:
        status, body = self.run(self._request(self.s.api, "GET", "/api/sessions"))
        assert status == 200
        listed = {s["id"] for s in body["sessions"]}
        assert listed == {s.id for s in self.s.sessions.all()}

    @rule(sid=sids)
    def delete(self, sid: str) -> None:
        self.delete_asked.add(sid)
        status, body = self.run(self._request(self.s.api, "DELETE", f"/api/sessions/{sid}"))
        if status == 204:
            self.deleted_204.add(sid)
        else:
            # 404: deleted before; 5xx: an injected runner fault cut the delete short (the
            # session is gone for the API either way; reconcile finishes it).
            assert status in (404, 502, 503, 504), (status, body)

    @rule(sid=sids, nav=st.booleans(), background=st.booleans())
    def wake(self, sid: str, nav: bool, background: bool) -> None:
        """The browser comes back: its link for a cookie (once), then a request through
        Caddy's forward_auth, which wakes a stopped session."""
        if sid not in self.cookies and sid in self.links:
            status, body = self.run(
                self._request(self.s.api, "GET", f"/c/{sid}?token={self.links.pop(sid)}")
            )
            if status == 303 and isinstance(body, tuple):
                morsel = next(iter(body[1].values()))
                self.cookies[sid] = f"{morsel.key}={morsel.value}"
        cookie = self.cookies.get(sid)
        if cookie is None:
            return
        headers = {
            GATE_HEADER: self.s.key,
            "X-Forwarded-For": "192.0.2.1",
            "X-Forwarded-Method": "GET",
            "X-Forwarded-Uri": "/" if nav else "/global/health",
            "Cookie": cookie,
            **(NAV if nav else XHR),
        }
        req = self._request(self.s.public, "GET", "/_lovd/auth", headers=headers)
        if background:
            self._spawn(req)
            self.run(asyncio.sleep(0.01))
        else:
            self.run(req)

    # --- the operator and the daemon's loops ---

    @rule(sid=sids)
    def stop(self, sid: str) -> None:
        """An operator's stop (POST /api/sessions/{id}/stop, ``lovd session stop``)."""
        status, body = self.run(self._request(self.s.api, "POST", f"/api/sessions/{sid}/stop"))
        if status == 200:
            assert body["id"] == sid and body["status"] == "stopped", body
        else:
            # 404: deleted; 5xx: an injected runner fault cut the stop short (it stays
            # stopping; the next stop or reconcile finishes it).
            assert status in (404, 502, 503, 504), (status, body)

    @rule()
    def health_pass(self) -> None:
        async def go() -> None:
            with contextlib.suppress(LovdError):
                await self.s.sessions.health_pass()

        self.run(go())

    @rule()
    def reconcile(self) -> None:
        async def go() -> None:
            with contextlib.suppress(LovdError):
                await self.s.sessions.reconcile()

        self.run(go())

    @rule(seconds=st.sampled_from([0, 30, 65, 130, 310, 1000]))
    def time_passes(self, seconds: int) -> None:
        """The clock moves, then the housekeeping pass (POST /api/cleanup)."""
        self.clock.offset += seconds
        status, body = self.run(self._request(self.s.api, "POST", "/api/cleanup"))
        assert status == 200, (status, body)
        self.expired.update(d["id"] for d in body["deleted"])

    @rule()
    def settle(self) -> None:
        """Real time passes until everything under way is done. Then no session may say
        it is starting: nothing is starting it, so it would stay so until some later pass
        (the ready_timeout bound holds only for starts that run)."""
        self.run(self._settle(READY_TIMEOUT + HANG + BOUND))
        self.loop.run_until_complete(self._read_outbox(self.s.store))
        stuck = [
            s
            for s in self.s.store.all()
            if s.status in _IN_START and not self.s.sessions.lock(s.id).locked()
        ]
        assert not stuck, "; ".join(
            f"{s.id} stuck: {self.rows.get(s.id, Row()).trail}" for s in stuck
        )
        self._fired()
        if self.stop_failed:
            # What the daemon's next health pass does: reconcile stops what a failed stop
            # left (an attempt may hit an injected fault: the next one runs).
            self.stop_failed = False
            for _ in range(3):
                with contextlib.suppress(LovdError):
                    self.loop.run_until_complete(self.s.sessions.reconcile())
                    break
            self.loop.run_until_complete(self._settle(READY_TIMEOUT + HANG + BOUND))
            self._fired()

    # --- the warm pool ---

    @rule(background=st.booleans())
    def warm_refill(self, background: bool) -> None:
        """A pass of the warm pool's refill loop (the daemon's runs one whenever a claim or
        a freed place kicks it): recycle old containers, start as many as there are free
        places. In the background it races the steps that follow: a create claims a
        container still booting, a wake takes its place."""

        async def fill() -> None:
            try:
                await self.s.host.pool.fill()
            except Exception as e:  # the daemon's loop would have died: no more refills
                self.pool_died.append(repr(e))

        if background:
            self._spawn(fill())
            self.run(asyncio.sleep(0.01))
        else:
            self.run(fill())

    @rule()
    def warm_container_vanishes(self) -> None:
        """An unclaimed warm container is gone (reconcile then gives its row up)."""
        warm = self.s.sessions.warm()
        if warm:
            self.run(self.runner.vanish(warm[0].id))

    # --- faults ---

    @rule(sid=sids)
    def container_vanishes(self, sid: str) -> None:
        self.run(self.runner.vanish(sid))

    @rule(sid=sids)
    def container_hangs(self, sid: str) -> None:
        """Its server stops answering (SIGSTOP): probes fail, the container is there."""
        self.run(self.runner.hang(sid))

    @rule()
    def next_start_never_ready(self) -> None:
        self.runner.unready_starts = 1
        RAN["steps"] += 1

    @rule(op=st.sampled_from(["start", "stop", "list"]), hang=st.booleans())
    def runner_call_fails(self, op: str, hang: bool) -> None:
        """The next Podman call of ``op`` fails, or hangs until its deadline kills it."""
        what = f"podman {op} did not finish within {HANG:g} s" if hang else f"podman {op} failed"
        self.runner.fail_next(op, LovdError("runner-failed", what), HANG if hang else 0.0)
        self.stop_armed = self.stop_armed or op == "stop"
        RAN["steps"] += 1

    @rule(target=sids, mid_start=st.sampled_from(["", "podman run", "readiness"]))
    def lovd_restarts(self, mid_start: str) -> Any:
        """lovd stops and starts again on the same store file; with ``mid_start``, while a
        session it just created is still starting: in its ``podman run``, or waiting for
        its container to answer."""
        made: list[str] = []

        async def go() -> None:
            if mid_start:
                if mid_start == "podman run":
                    self.runner.start_delay = 0.05
                else:
                    self.runner.unready_starts = 1
                status, body = await self._request(
                    self.s.api, "POST", "/api/sessions", json={"wait": False}
                )
                self.runner.start_delay = 0.0
                if 200 <= status < 300:
                    made.append(body["id"])
                    self.created.add(body["id"])
                    self.links[body["id"]] = body["token"]
                await asyncio.sleep(0.02 if mid_start == "podman run" else 0.2)
            for t in list(self.bg):
                t.cancel()
            await asyncio.gather(*self.bg, return_exceptions=True)
            await self.s.close()
            self.stack = None
            self.stack = await Stack.open(self.cfg, self.runner, self.clock)

        self.run(go())
        return multiple(*made)

    # --- invariants ---

    @invariant()
    def invariants_hold(self) -> None:
        if self.stack is not None:
            self.loop.run_until_complete(self._check())

    async def _check(self) -> None:
        store = self.s.store
        # Under the store's writer lock no write is half-done: a committed change is in the
        # in-memory rows too (the writer updates them right after COMMIT, without an await).
        async with store._lock:
            await self._read_outbox(store)
            live = {s.id: s for s in store.all()}
            tombstones = set(await store.tombstones())
        # The outbox reflects every change: the live row is its last outbox row.
        for sid, s in live.items():
            r = self.rows.get(sid)
            assert r is not None and not r.closed, f"{sid} is live without outbox rows: {r}"
            assert (r.version, r.status) == (s.version, s.status), (
                f"{sid}: the row is v{s.version} {s.status}, its last outbox row "
                f"v{r.version} {r.status}: {r.trail}"
            )
        for sid, r in self.rows.items():
            if sid not in live:
                assert r.closed, f"{sid} left the store without a deletion row: {r.trail}"
        # Every 2xx create exists, or a delete was asked for, or the expiry policy took it.
        for sid in self.created:
            if sid not in live:
                assert sid in self.delete_asked | self.expired, (
                    f"{sid} (created 2xx) is gone, neither deleted nor expired: "
                    f"{self.rows[sid].trail}"
                )
        for sid in self.deleted_204 | self.expired:
            assert sid not in live, f"{sid} was deleted but is back: {self.rows[sid].trail}"
        # No session stays in a start longer than ready_timeout + the hang + a bound.
        now = time.time()
        for sid, s in live.items():
            if s.status in _IN_START:
                age = now - self.rows[sid].at
                assert age <= READY_TIMEOUT + HANG + BOUND, (
                    f"{sid} is {s.status} for {age:.1f} s: {self.rows[sid].trail}"
                )
        # At most one container per session.
        assert not set(self.runner.servers) & self.runner.hung
        self._fired()
        running = {*self.runner.servers, *self.runner.hung}
        for sid in running:
            if self.stop_failed or self.s.sessions.lock(sid).locked() or sid in tombstones:
                continue  # a stop that failed, or a start, stop or delete under way
            row = live.get(sid)
            assert row is not None and row.status not in _RESTING, (
                f"{sid} ({row.status if row else 'deleted'}) still has a container: "
                f"{self.rows[sid].trail if sid in self.rows else ''}"
            )
        assert not self.errors_500, self.errors_500
        assert not self.pool_died, f"the warm pool's refill loop died: {self.pool_died}"
        # PostgreSQL is down: nothing was taken off the outbox.
        assert not self.s.sync.relay.status.connected

    def _fired(self) -> None:
        """Note whether the injected stop failure has fired."""
        if self.stop_armed and "stop" not in self.runner.faults:
            self.stop_armed, self.stop_failed = False, True

    async def _read_outbox(self, store: Store) -> None:
        """Fold the outbox rows not seen yet into ``self.rows``, checking each."""
        for o in await store.outbox_read(1_000_000):
            if o.seq <= self.seq:
                continue
            assert o.seq > self.seq
            self.seq = o.seq
            payload = json.loads(o.payload)
            status = payload["status"]
            r = self.rows.setdefault(o.key, Row())
            r.trail.append(f"v{o.version} {status} ({payload['event']}: {payload['reason']})")
            assert not r.closed, f"{o.key}: a row after its deletion: {r.trail}"
            assert o.version == r.version + 1, (
                f"{o.key}: outbox version {o.version} after {r.version}: {r.trail}"
            )
            assert (o.op == "delete") == (status == SessionState.DELETED), r.trail
            if status != r.status:
                assert allowed(r.status, status), (
                    f"{o.key}: {r.status} -> {status} is not in TRANSITIONS: {r.trail}"
                )
                SEEN[(r.status, status)] += 1
            r.version, r.status, r.at = o.version, status, o.created_at
            r.closed = o.op == "delete"


LovdMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=IN_CI,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


def test_session_state_machine(capsys: Any) -> None:
    RAN.clear()
    SEEN.clear()
    t0 = time.monotonic()
    try:
        run_state_machine_as_test(LovdMachine, settings=LovdMachine.TestCase.settings)
    finally:
        took = time.monotonic() - t0
        with capsys.disabled():
            print(
                f"\nstate machine: {RAN['examples']} examples, {RAN['steps']} steps in "
                f"{took:.1f} s ({RAN['replaced']} starts replaced a live container)"
            )
            table = {(f, t) for f, tos in TRANSITIONS.items() for t in tos}
            seen = {(f and SessionState(f), SessionState(t)) for f, t in SEEN}
            print(f"state changes: {len(seen & table)} of the table's {len(table)} seen")
            print("  seen:", ", ".join(f"{f or 'new'}->{t}: {n}" for (f, t), n in SEEN.items()))
            print(
                "  never:",
                ", ".join(f"{f or 'new'}->{t}" for f, t in sorted(table - seen, key=str)),
            )
            pools = ", ".join(f"{k}: {n}" for k, n in sorted(RAN.items()) if k.startswith("warm"))
            print(f"  examples by {pools}")
    if IN_CI:
        assert RAN["steps"] >= MIN_CI_STEPS, f"only {RAN['steps']} steps ran"
        missing = WARM_SEEN - seen
        assert not missing, f"the warm pool's transitions never happened: {missing}"


# --- what the machine found, replayed (each failed before its fix in lovd/session/) ---


def _replay(steps: Any, warm_pool: int = 0) -> None:
    machine = LovdMachine()
    try:
        machine.boot(warm_pool=warm_pool)
        machine.invariants_hold()
        steps(machine)
        machine.invariants_hold()
    finally:
        machine.teardown()


def test_a_failed_start_whose_stop_fails_is_failed_not_left_starting() -> None:
    """A start that never got ready, whose container then could not be stopped (Podman
    stuck), stayed "starting" with nothing to finish it (launcher.py); a wake queued
    behind it started a second container over the first."""

    def steps(m: LovdMachine) -> None:
        m.runner_call_fails(op="stop", hang=False)
        m.next_start_never_ready()
        m.create(wait=False)
        m.settle()  # asserts that nothing is left starting, and reconciles

    _replay(steps)


def test_cleanup_reports_a_session_it_deleted_whose_container_removal_failed() -> None:
    """cleanup tombstoned a session past delete_after, removing its container failed, and
    POST /api/cleanup's answer left it out (housekeeping.py): the API said nothing was
    deleted although the session was gone."""

    def steps(m: LovdMachine) -> None:
        m.create(wait=True)
        m.time_passes(seconds=65)  # unused_timeout: idle-stopped
        m.runner_call_fails(op="stop", hang=False)
        m.time_passes(seconds=310)  # delete_after: deleted; the container removal fails

    _replay(steps)


def test_a_warm_container_whose_stop_fails_does_not_end_the_refill_loop() -> None:
    """A warm container recycled by age whose ``podman stop`` failed: the error left the
    refill pass (the daemon's loop would have ended, and the pool never refilled again),
    and its row stayed "stopping", a session no one owns (warm.py)."""

    def steps(m: LovdMachine) -> None:
        m.warm_refill(background=False)
        m.runner_call_fails(op="stop", hang=False)
        m.time_passes(seconds=WARM_MAX_AGE + 60)  # the next pass recycles it
        m.warm_refill(background=False)
        m.invariants_hold()
        m.settle()  # reconcile removes the container lovd could not stop

    _replay(steps, warm_pool=1)
