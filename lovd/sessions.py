"""The session lifecycle: create, start, wait for readiness, stop, wake, delete, cleanup.

All state changes go through the store (and so the outbox). Each session has its
own lock, so concurrent requests for one session serialize while different
sessions proceed in parallel.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from lovd import ids
from lovd.config import Config
from lovd.errors import LovdError
from lovd.metrics import Metrics
from lovd.podman import ContainerSpec, cgroup_v2
from lovd.runner import Runner
from lovd.store import ACTIVE_STATES, Session, Store

WARM = "warm"

log = logging.getLogger(__name__)

# After a failed start, how long the admission slot estimate assumes a session runs.
_RETRY_AFTER_DEFAULT = 30
_IMAGE_CHECK_TTL = 60.0
# Unit states in which systemd, not lovd, decides what happens next.
_UNIT_BUSY = frozenset({"activating", "active", "deactivating", "reloading"})


@dataclass
class SessionEnv:
    """Builds the secret environment of a session container from config."""

    config: Config
    host_key: bytes
    demo_urls: dict[str, str] = field(default_factory=dict)

    def password(self, session_id: str) -> str:
        return ids.derive_password(self.host_key, session_id)

    def basic_auth(self, session_id: str) -> str:
        raw = f"opencode:{self.password(session_id)}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def write(self, session_id: str, directory: Path, broker_credential: str) -> Path:
        """Write the session's secret env file (KEY=VALUE lines) and return its path.

        The directory is 0700 and lovd's own; the file is 0444 so the container's user
        (an unmapped uid under --userns=auto) can read it through the bind mount."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / ids.secret_file_name(session_id)
        env = self.build(session_id, broker_credential)
        data = "".join(f"{k}={v}\n" for k, v in env.items())
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data.encode())
            os.fchmod(fd, 0o444)
        finally:
            os.close(fd)
        tmp.replace(path)
        return path

    def build(self, session_id: str, broker_credential: str) -> dict[str, str]:
        """The container's settings. No operator secret is among them: LLM and MCP calls
        go to lovd's broker (at host_gateway) with ``broker_credential``, and the broker
        adds the real keys (lovd/broker/)."""
        c = self.config
        broker = f"http://{c.host_gateway}:{c.broker_port}"
        mcp = bool(c.mcp_lovdata_url or self.demo_urls.get("mcp"))
        lovd_llm = bool(c.llm_base_url or self.demo_urls.get("llm"))

        def cred(configured: object) -> str:
            return broker_credential if configured else ""

        env = {
            "OPENCODE_SERVER_PASSWORD": self.password(session_id),
            "LOVD_SESSION_ID": session_id,
            "LOVD_BROKER_URL": broker,
            "LOVDATA_MCP_URL": f"{broker}/mcp/lovdata" if mcp else "",
            "LOVDATA_MCP_TOKEN": cred(mcp),
            "LOVD_SEQUENTIAL_THINKING": "1" if c.sequential_thinking else "0",
            "LOVD_MODEL": c.model or self.demo_urls.get("model", ""),
            "LOVD_LLM_BASE_URL": f"{broker}/llm/lovd" if lovd_llm else "",
            "LOVD_LLM_API_KEY": cred(lovd_llm),
            "OPENAI_API_KEY": cred(c.openai_api_key),
            "ANTHROPIC_API_KEY": cred(c.anthropic_api_key),
            "GOOGLE_GENERATIVE_AI_API_KEY": cred(c.google_api_key),
            "LOVD_PERMISSIONS_DENY": ",".join(c.permissions_deny),
        }
        for k, v in env.items():
            if "\n" in v or "\0" in v:
                raise LovdError("internal", f"setting for {k} contains a newline or NUL")
        return env


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
    ) -> None:
        self.config = config
        self.store = store
        self.runner = runner
        self.http = http
        self.env = env
        self.metrics = metrics
        self.host_id = host_id
        self.clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._admission = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._orphans_seen: dict[str, float] = {}
        self._image_checked = float("-inf")
        self.activity: dict[str, float] = {}
        self._used: dict[str, float] = {}
        # Called whenever a place may have freed up or a warm container was used; the
        # warm pool sets it to its refill trigger.
        self.capacity_changed: Callable[[], None] = lambda: None
        metrics.track_sessions(self.count_by_state)

    def count_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.store.all():
            counts[s.status] = counts.get(s.status, 0) + 1
        return counts

    def lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    # --- queries ---

    def get(self, session_id: str) -> Session:
        s = self.store.get(ids.check(session_id))
        if s is None or s.status == WARM:
            raise LovdError("session-not-found", f"no session {session_id}")
        return s

    def all(self) -> list[Session]:
        return [s for s in self.store.all() if s.status != WARM]

    def warm(self) -> list[Session]:
        """Unclaimed warm-pool rows, oldest first."""
        return [s for s in self.store.all() if s.status == WARM]

    def running_count(self) -> int:
        return self.store.count(ACTIVE_STATES)

    # --- create / start ---

    def _place_frees_at(self, s: Session) -> float | None:
        """When housekeeping will stop ``s`` and free its place: the end of its
        unused_timeout (no chat request yet) or of its idle_timeout, whichever is first."""
        c = self.config
        ends: list[float] = []
        if c.unused_timeout and not s.used_at and s.id not in self._used:
            ends.append(max(s.created_at, s.started_at) + c.unused_timeout)
        if c.idle_timeout:
            ends.append(max(s.last_activity, self.activity.get(s.id, 0.0)) + c.idle_timeout)
        return min(ends, default=None)

    def _idle_reason(self, s: Session, now: float) -> str:
        """Why housekeeping stops ``s`` now ("" while it may keep running)."""
        c = self.config
        unused = c.unused_timeout and not s.used_at and s.id not in self._used
        if unused and max(s.created_at, s.started_at) + c.unused_timeout <= now:
            return "no chat request within unused_timeout"
        last = max(s.last_activity, self.activity.get(s.id, 0.0))
        if c.idle_timeout and last + c.idle_timeout <= now:
            return "no activity for idle_timeout"
        return ""

    def next_deadline(self) -> float | None:
        """Seconds until the soonest running session reaches its unused/idle deadline."""
        ends = [
            t
            for s in self.store.all()
            if s.status == "running" and (t := self._place_frees_at(s)) is not None
        ]
        return min(ends) - self.clock() if ends else None

    def retry_after(self) -> int:
        """Seconds until a place may free up, counting unused and idle sessions."""
        ends = [
            t
            for s in self.store.all()
            if s.status in ACTIVE_STATES and (t := self._place_frees_at(s)) is not None
        ]
        if not ends:
            return _RETRY_AFTER_DEFAULT
        return max(1, min(math.ceil(min(ends) - self.clock()), 3600))

    def mark_used(self, sid: str) -> None:
        """The session's browser sent a chat request: it no longer counts as unused
        (cheap, in memory; flushed with the activity)."""
        s = self.store.get(sid)
        if s is not None and not s.used_at:
            self._used.setdefault(sid, self.clock())

    def _admit(self) -> None:
        if self.running_count() >= self.config.max_running:
            retry = self.retry_after()
            raise LovdError(
                "too-many-sessions",
                f"all {self.config.max_running} session places are in use; try again in {retry} s",
                retry_after=retry,
                extra={"limit": self.config.max_running},
            )

    def _pick_port(self) -> int:
        used = self.store.used_ports()
        for port in self.config.ports:
            if port in used:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise LovdError(
            "unavailable",
            f"no free port in port_range {self.config.port_range}; widen it in lovd.conf",
        )

    async def create(self, wait: bool = True) -> tuple[Session, str]:
        """Create and start a session. Returns the session and its token (shown once)."""
        token = ids.new_token()
        async with self._admission:
            self._admit()
            now = self.clock()
            token_hash = ids.hash_token(token)
            warm = self._pick_warm()
            if warm is not None:
                sid = warm.id
                # "starting" until the claim has confirmed the container still answers.
                session = await self.store.update(
                    sid,
                    status="starting",
                    reason="from the warm pool",
                    event="claimed",
                    token_hash=token_hash,
                    created_at=now,
                    expires_at=now + self.config.session_ttl,
                    last_activity=now,
                )
            else:
                session = await self._insert("creating", token_hash, now)
                sid = session.id
        log.info("session created%s", " (warm pool)" if warm else "", extra={"SESSION_ID": sid})
        self.metrics.sessions_created.inc()
        self.metrics.warm_claims.labels("hit" if warm else "miss").inc()
        start = self._claim(sid) if warm else self._start(sid)
        if warm:
            self.capacity_changed()
        if wait:
            session = await start
        else:
            self._spawn(self._logged(start, sid))
        return session, token

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _logged(self, start: Coroutine[Any, Any, Session], sid: str) -> None:
        try:
            await start
        except LovdError as e:
            log.warning("session start failed: %s", e.message, extra={"SESSION_ID": sid})

    # --- warm pool ---

    def _pick_warm(self) -> Session | None:
        """A warm row to hand out: a ready one first, else the one furthest along."""
        rows = self.warm()
        ready = [s for s in rows if not self.lock(s.id).locked()]
        return (ready or rows)[0] if rows else None

    def warm_wanted(self) -> int:
        """How many more warm containers the pool may start now."""
        warm = len(self.warm())
        free = self.config.max_running - self.running_count() - warm
        return max(0, min(self.config.warm_pool - warm, free))

    async def start_warm(self) -> Session | None:
        """Start one warm-pool container (no owner, no token) if there is a free place."""
        async with self._admission:
            if self.warm_wanted() < 1:
                return None
            sid = (await self._insert(WARM, "", self.clock(), event="warm")).id
        return await self._start(sid, warm=True)

    async def _insert(
        self, status: str, token_hash: str, now: float, event: str = "created"
    ) -> Session:
        """A new row with a fresh id and port (call with the admission lock held)."""
        return await self.store.insert(
            Session(
                id=ids.new_session_id(),
                status=status,
                reason="",
                token_hash=token_hash,
                port=self._pick_port(),
                container_id="",
                host_id=self.host_id,
                created_at=now,
                updated_at=now,
                expires_at=now + self.config.session_ttl,
                last_activity=now,
            ),
            event=event,
        )

    async def _claim(self, sid: str) -> Session:
        """Hand a claimed warm container to its new owner: wait for it if it is still
        booting, check it still answers, and fall back to a fresh start if not."""
        async with self.lock(sid):
            s = self.store.get(sid)
            if s is not None and s.status == "running":
                return s  # its warm start finished after the claim
            if s is not None and s.status == "starting" and s.container_id:
                ok, why = await self.probe(s, timeout=1.0)
                if ok:
                    return await self._running(sid, s.container_id, time.monotonic())
                log.info(
                    "warm container did not answer (%s); starting afresh",
                    why,
                    extra={"SESSION_ID": sid},
                )
        return await self._start(sid)

    async def discard_warm(self, sid: str, reason: str) -> None:
        """Remove an unclaimed warm container and its row (claimed ones are left alone)."""
        async with self.lock(sid):
            s = self.store.get(sid)
            if s is None or s.status != WARM:
                return
            await self._stop_container(sid)
            await self.runner.remove_workspace(self.config.sessions_path / sid)
            await self.store.delete(sid, reason)
        self._locks.pop(sid, None)
        log.info("warm container removed: %s", reason, extra={"SESSION_ID": sid})

    def _make_room(self) -> None:
        """A session took a place a warm container holds: give that place up."""
        warm = self.warm()
        if warm and self.running_count() + len(warm) > self.config.max_running:
            self._spawn(self.discard_warm(warm[-1].id, "its place went to a session"))

    @property
    def secrets_dir(self) -> Path:
        # Per instance, so two lovd instances sharing a runtime dir never collect each
        # other's files.
        return self.config.secrets_path / f"secrets-{self.store.instance_id}"

    def _drop_secret(self, sid: str) -> None:
        (self.secrets_dir / ids.secret_file_name(sid)).unlink(missing_ok=True)

    def spec(self, session: Session) -> ContainerSpec:
        from lovd import egress  # here, not at the top: keeps egress's edit inside spec()

        c = self.config
        return ContainerSpec(
            session_id=session.id,
            instance_id=self.store.instance_id,
            image=c.image,
            host_port=session.port,
            container_port=c.container_port,
            workspace=c.sessions_path / session.id,
            memory_max=c.memory_max,
            cpus=c.cpus,
            tasks_max=c.tasks_max,
            userns=c.userns,
            user=c.container_user,
            stop_timeout=c.stop_timeout,
            extra_args=self._network_args() + list(c.extra_run_args),
            cgroup_v2=cgroup_v2(),
            secret_file=self.secrets_dir / ids.secret_file_name(session.id),
            systemd_unit=ids.unit_name(session.id) if self.runner.name == "systemd" else "",
            # The egress hook (rules in the container's netns before it runs); checked
            # on disk for every start, since Podman ignores a missing hooks dir.
            hooks_dir=egress.ensure(c),
        )

    def _network_args(self) -> list[str]:
        # Every session calls the broker on the host's loopback (session_network); the
        # egress hook then lets it reach host_gateway:broker port and egress.allow only.
        if self.config.session_network:
            return ["--network", self.config.session_network]
        return []

    async def _start(self, sid: str, warm: bool = False) -> Session:
        async with self.lock(sid):
            session = self.store.get(sid)
            if session is None:
                raise LovdError("session-not-found", f"no session {sid}")
            if session.status == "running":
                return session
            t0 = time.monotonic()
            # A new broker credential for every start: the previous container's dies.
            secret = ids.new_token()
            changes: dict[str, Any] = {"broker_hash": ids.hash_token(secret)}
            if not warm:
                changes.update(status="starting", reason="")
            session = await self.store.update(sid, **changes)
            workspace = self.config.sessions_path / sid
            workspace.mkdir(parents=True, exist_ok=True)
            try:
                await self._check_image()
                try:
                    self.env.write(sid, self.secrets_dir, f"{sid}.{secret}")
                    # One `podman run` at a time: concurrent --userns=auto allocations
                    # race in rootless Podman; the run is short next to readiness.
                    async with self._start_lock:
                        cid = await self.runner.start(self.spec(session))
                except LovdError:
                    self._image_checked = float("-inf")
                    await self._check_image()  # a vanished image gets its own clear error
                    raise
                await self._wait_ready(sid)
            except LovdError as e:
                await self._stop_container(sid)
                return await self._fail(sid, e)
            except (asyncio.CancelledError, Exception) as e:
                await self._stop_container(sid)
                await self._fail(sid, LovdError("internal", f"start interrupted: {e!r}"))
                raise
            self.metrics.start_seconds.observe(time.monotonic() - t0)
            current = self.store.get(sid)
            if warm and current is not None and current.status == WARM:
                log.info(
                    "warm container ready in %.3f s",
                    time.monotonic() - t0,
                    extra={"SESSION_ID": sid, "CONTAINER_ID": cid},
                )
                return await self.store.update(sid, container_id=cid)
            # A warm container claimed while it booted lands here too.
            return await self._running(sid, cid, t0)

    async def _running(self, sid: str, cid: str, t0: float) -> Session:
        session = await self.store.update(
            sid,
            status="running",
            reason="",
            container_id=cid,
            started_at=self.clock(),
            last_activity=self.clock(),
        )
        log.info(
            "session running (ready in %.3f s)",
            time.monotonic() - t0,
            extra={"SESSION_ID": sid, "CONTAINER_ID": cid},
        )
        return session

    async def _stop_container(self, sid: str) -> None:
        await self.runner.stop(sid)
        self._drop_secret(sid)

    async def _check_image(self) -> None:
        """Is the image present? A positive answer is trusted for a minute: the check
        costs a Podman round trip on every start otherwise."""
        if time.monotonic() - self._image_checked < _IMAGE_CHECK_TTL:
            return
        if not await self.runner.client.image_exists(self.config.image):
            raise LovdError(
                "image-missing",
                f"session image {self.config.image} is not present in the lovd "
                "user's Podman store; build it with: lovd image build",
            )
        self._image_checked = time.monotonic()

    async def _fail(self, sid: str, err: LovdError) -> Session:
        current = self.store.get(sid)
        if current is not None and current.status == WARM:
            # Nobody owns it: drop the row (the pool retries later) rather than show a
            # failed session no one asked for.
            await self.runner.remove_workspace(self.config.sessions_path / sid)
            await self.store.delete(sid, f"warm start failed: {err.message}")
            log.warning("warm container failed: %s", err.message, extra={"SESSION_ID": sid})
            raise err
        await self.store.update(sid, status="failed", reason=err.message, broker_hash="")
        log.warning("session failed: %s", err.message, extra={"SESSION_ID": sid})
        raise err

    async def probe(self, session: Session, timeout: float = 0.3) -> tuple[bool, str]:
        url = f"http://127.0.0.1:{session.port}{self.config.health_path}"
        try:
            async with self.http.get(
                url,
                headers={"Authorization": self.env.basic_auth(session.id)},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as r:
                await r.read()
                return r.status < 400, f"HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError) as e:
            return False, type(e).__name__

    async def _wait_ready(self, sid: str) -> None:
        """Poll the health path with short timeouts: OpenCode may hang a request sent in
        the first second after its port opens, so a long timeout would stall readiness."""
        deadline = time.monotonic() + self.config.ready_timeout
        delay = 0.01
        checks = 0
        while time.monotonic() < deadline:
            session = self.store.get(sid)
            if session is None:
                raise LovdError("session-not-found", f"session {sid} was deleted while starting")
            ok, _ = await self.probe(session)
            if ok:
                return
            checks += 1
            if checks % 20 == 0 and not await self._container_alive(sid):
                name = ids.container_name(sid)
                logs = (await self.runner.client.logs(name)).strip().splitlines()
                raise LovdError(
                    "runner-failed",
                    "session container exited while starting" + (f": {logs[-1]}" if logs else ""),
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.1)
        raise LovdError(
            "start-timeout",
            f"session did not answer {self.config.health_path} within "
            f"{self.config.ready_timeout:g} s (ready_timeout)",
        )

    async def _container_alive(self, sid: str) -> bool:
        return any(c.session_id == sid and c.state == "running" for c in await self.runner.list())

    # --- stop / wake / delete ---

    async def stop(self, sid: str, status: str = "stopped", reason: str = "") -> Session:
        async with self.lock(sid):
            self.get(sid)
            await self.store.update(sid, status="stopping", reason=reason)
            await self._stop_container(sid)
            session = await self.store.update(
                sid, status=status, reason=reason, container_id="", broker_hash=""
            )
        self.capacity_changed()
        return session

    async def wake(self, sid: str) -> Session:
        """Start a stopped session again (same workspace), subject to admission."""
        session = self.get(sid)
        if session.status in ("running", "starting"):
            return session if session.status == "running" else await self._start(sid)
        async with self._admission:
            self._admit()
            await self.store.update(sid, status="starting", reason="waking")
            self._make_room()
        return await self._start(sid)

    async def delete(self, sid: str, reason: str = "deleted by request") -> None:
        async with self.lock(sid):
            self.get(sid)
            await self.store.update(sid, status="stopping", reason=reason)
            await self._stop_container(sid)
            await self.runner.remove_workspace(self.config.sessions_path / sid)
            await self.store.delete(sid, reason)
        self._locks.pop(sid, None)
        self.activity.pop(sid, None)
        log.info("session deleted: %s", reason, extra={"SESSION_ID": sid})
        self.capacity_changed()

    def touch(self, sid: str) -> None:
        """Record activity (cheap, in memory; flushed to the store periodically)."""
        self.activity[sid] = self.clock()

    async def flush_activity(self) -> None:
        pending, self.activity = self.activity, {}
        await self.store.touch(pending)
        used, self._used = self._used, {}
        for sid, at in used.items():
            s = self.store.get(sid)
            if s is not None and not s.used_at:
                await self.store.update(sid, used_at=at, event="first-chat")

    async def cleanup(self) -> list[str]:
        """Delete expired and dead sessions; stop idle ones. Returns deleted ids."""
        await self.flush_activity()
        now = self.clock()
        removed: list[str] = []
        for s in self.all():  # warm rows are the pool's (warm_max_age)
            try:
                if s.expires_at <= now:
                    await self.delete(s.id, "expired (session_ttl)")
                    removed.append(s.id)
                elif s.status in ("failed", "stopped"):
                    await self.delete(s.id, f"cleanup of {s.status} session")
                    removed.append(s.id)
                elif s.status == "running" and (why := self._idle_reason(s, now)):
                    await self.stop(s.id, "idle-stopped", why)
            except LovdError as e:
                log.warning("cleanup of %s failed: %s", s.id, e.message, extra={"SESSION_ID": s.id})
        return removed

    # --- reconcile ---

    async def reconcile(self, *, startup: bool = False) -> dict[str, list[str]]:
        """Make actual containers match the store: adopt, mark vanished, collect orphans."""
        with self.metrics.reconcile_seconds.time():
            return await self._reconcile(startup)

    async def _reconcile(self, startup: bool) -> dict[str, list[str]]:
        containers = {c.session_id: c for c in await self.runner.list()}
        report: dict[str, list[str]] = {"adopted": [], "lost": [], "orphans_removed": []}
        for s in self.store.all():
            if self.lock(s.id).locked():
                continue  # a start/stop is in flight; it will settle the row itself
            c = containers.get(s.id)
            alive = c is not None and c.state == "running"
            unit = await self.runner.unit_state(s.id) if self.runner.name == "systemd" else None
            if s.status == WARM:
                if alive and c is not None and s.container_id != c.id:
                    await self.store.update(s.id, container_id=c.id)
                elif not alive and (unit is None or unit.active not in _UNIT_BUSY):
                    await self.discard_warm(s.id, "warm container stopped")
                continue
            if s.status in ("running", "starting", "idle-stopped", "stopping") and alive:
                assert c is not None
                if s.status != "running" or s.container_id != c.id:
                    await self.store.update(
                        s.id, status="running", reason="re-adopted", container_id=c.id
                    )
                report["adopted"].append(s.id)
            elif s.status in ("running", "starting", "creating", "stopping") and not alive:
                if unit is not None and unit.active in _UNIT_BUSY:
                    # systemd is still acting on it: stopping it now would cancel the
                    # restart policy (ExecStopPost keeps a crashed unit "deactivating").
                    continue
                if unit is not None and unit.active == "failed":
                    reason = (  # NRestarts also counts the attempt refused at the start limit
                        f"unit failed ({unit.result}); gave up after "
                        f"{max(0, unit.restarts - 1)} restarts"
                    )
                    status = "failed"
                elif c is not None and c.exit_code:
                    reason, status = f"container exited with code {c.exit_code}", "failed"
                elif s.status == "creating":
                    reason, status = "lovd stopped while the session was being created", "failed"
                else:
                    reason = (
                        "container vanished while lovd was down"
                        if startup
                        else "container stopped unexpectedly"
                    )
                    status = "stopped"
                await self._stop_container(s.id)
                await self.store.update(
                    s.id, status=status, reason=reason, container_id="", broker_hash=""
                )
                report["lost"].append(s.id)
                log.warning("session %s: %s", status, reason, extra={"SESSION_ID": s.id})
        now = time.monotonic()
        known = {s.id for s in self.store.all()}
        for sid, c in containers.items():
            if sid in known:
                continue
            first = self._orphans_seen.setdefault(c.id, now)
            # Podman's Created is wall-clock; the grace also runs from when we first saw it.
            age = max(time.time() - c.created, now - first)
            if age >= self.config.orphan_grace:
                log.info("removing orphan container %s", c.name, extra={"CONTAINER_ID": c.id})
                await self.runner.client.remove(c.name)
                if ids.is_valid(sid):
                    self._drop_secret(sid)
                self._orphans_seen.pop(c.id, None)
                report["orphans_removed"].append(c.name)
        for f in self.secrets_dir.glob("*.env") if self.secrets_dir.is_dir() else ():
            if f.stem not in known and f.stem not in containers:
                f.unlink(missing_ok=True)
        return report

    async def drain(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def load_host_key(state: Path) -> bytes:
    """A 32-byte key, created once per state dir (0600), that derives container passwords."""
    path = state / "host.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    key = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key
