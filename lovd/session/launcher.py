"""Starting and stopping one session's container: its settings, the container spec, the
image check, readiness. The launcher writes no state: a start returns its outcome
(``Started`` or ``StartFailed``) and starts.py records it through the one writer.

The container's settings (``SessionEnv``) hold no operator secret: LLM and MCP calls go
through lovd's broker with a per-session credential that is new at every start (its hash
is stored; the previous container's dies).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from lovd import ids, limits
from lovd.config import Config
from lovd.errors import LovdError
from lovd.metrics import Metrics
from lovd.podman import ContainerSpec, cgroup_v2
from lovd.runner import Runner
from lovd.session.model import Session
from lovd.store import Store

log = logging.getLogger(__name__)

_IMAGE_CHECK_TTL = 60.0


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
            # The models OpenCode lists (its per-provider whitelist): all a session may
            # use; the gate and the broker refuse any other.
            "LOVD_MODELS": ",".join(sorted(c.allowed_models(self.demo_urls.get("model", "")))),
            # No single file (the chat database) may outgrow the disk quota
            # (lovd/session/quota.py); the entrypoint turns this into RLIMIT_FSIZE.
            "LOVD_FILE_MAX_KB": str(c.disk_quota // 1024) if c.disk_quota else "",
        }
        for k, v in env.items():
            if "\n" in v or "\0" in v:
                raise LovdError("internal", f"setting for {k} contains a newline or NUL")
        return env


@dataclass(frozen=True)
class Started:
    """The container answers."""

    container_id: str
    seconds: float  # from the image check to the first good probe


@dataclass(frozen=True)
class StartFailed:
    """The start failed (its container is stopped, or left for reconcile to stop)."""

    error: LovdError


class Launcher:
    """Brings a row's container up (``launch``) or down (``stop_container``). Holds the
    per-session locks: every change to one session's container runs under its lock."""

    def __init__(
        self,
        config: Config,
        store: Store,
        runner: Runner,
        http: aiohttp.ClientSession,
        env: SessionEnv,
        metrics: Metrics,
    ) -> None:
        self.config = config
        # Read only (the instance id, a row during readiness): the launcher writes nothing.
        self.store = store
        self.runner = runner
        self.http = http
        self.env = env
        self.metrics = metrics
        self._locks: dict[str, asyncio.Lock] = {}
        self._start_lock = asyncio.Lock()
        self._image_checked = float("-inf")

    def lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    def forget(self, session_id: str) -> None:
        self._locks.pop(session_id, None)

    @property
    def secrets_dir(self) -> Path:
        # Per instance, so two lovd instances sharing a runtime dir never collect each
        # other's files.
        return self.config.secrets_path / f"secrets-{self.store.instance_id}"

    def drop_secret(self, sid: str) -> None:
        (self.secrets_dir / ids.secret_file_name(sid)).unlink(missing_ok=True)

    def spec(self, session: Session) -> ContainerSpec:
        from lovd import egress  # here, not at the top: keeps egress's edit inside spec()

        c = self.config
        enforcement = self.check_limits()
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
            cgroup_limits=enforcement.cgroup,
            secret_file=self.secrets_dir / ids.secret_file_name(session.id),
            systemd_unit=self.runner.unit_name(session.id),
            # The egress hook (rules in the container's netns before it runs); checked
            # on disk for every start, since Podman ignores a missing hooks dir.
            hooks_dir=egress.ensure(c),
        )

    def check_limits(self) -> limits.Enforcement:
        """503 where a session's memory/CPU/pids limit would not hold, unless
        limits.enforce is false (lovd/limits.py); else what the runner enforces."""
        enforcement = self.runner.enforcement(self.config.userns)
        limits.check(self.config, enforcement)
        return enforcement

    def _network_args(self) -> list[str]:
        # Every session calls the broker on the host's loopback (session_network); the
        # egress hook then lets it reach host_gateway:broker port and egress.allow only.
        if self.config.session_network:
            return ["--network", self.config.session_network]
        return []

    async def launch(self, session: Session, secret: str) -> Started | StartFailed:
        """Bring up ``session``'s container with ``secret`` as its broker credential and
        wait until it answers. Writes no state: the caller (starts.py) records the outcome
        under the session's lock. A failed start's container is stopped; if that fails
        too, the failure is still the outcome (reconcile stops what is left)."""
        sid = session.id
        t0 = time.monotonic()
        workspace = self.config.sessions_path / sid
        workspace.mkdir(parents=True, exist_ok=True)
        try:
            await self.check_image()
            try:
                self.env.write(sid, self.secrets_dir, f"{sid}.{secret}")
                # One `podman run` at a time: concurrent --userns=auto allocations
                # race in rootless Podman; the run is short next to readiness.
                async with self._start_lock:
                    cid = await self.runner.start(self.spec(session))
            except LovdError:
                self._image_checked = float("-inf")
                await self.check_image()  # a vanished image gets its own clear error
                raise
            await self.wait_ready(sid)
        except LovdError as e:
            await self._stop_failed_start(sid)
            return StartFailed(e)
        except asyncio.CancelledError:
            # lovd is shutting down: leave the container (and so the row) as they are;
            # the next lovd adopts the container, or records that it is gone (reconcile).
            log.info("start interrupted by shutdown", extra={"SESSION_ID": sid})
            raise
        except Exception as e:
            # A bug, not the container's failure: its traceback goes to the log, and the
            # session is failed like any other start that went wrong.
            log.exception("start failed unexpectedly", extra={"SESSION_ID": sid})
            await self._stop_failed_start(sid)
            err = LovdError("internal", f"start failed: {e!r}")
            err.__cause__ = e
            return StartFailed(err)
        seconds = time.monotonic() - t0
        self.metrics.start_seconds.observe(seconds)
        return Started(cid, seconds)

    async def stop_container(self, sid: str) -> None:
        await self.runner.stop(sid)
        self.drop_secret(sid)

    async def _stop_failed_start(self, sid: str) -> None:
        """Stop what a failed start left. If that fails too, the failure is still
        recorded: a row left "starting" would have no one to finish it (reconcile stops a
        container that a stopped or failed row still has)."""
        try:
            await self.stop_container(sid)
        except LovdError as e:
            log.warning(
                "could not stop the container of a failed start (reconcile will): %s",
                e.message,
                extra={"SESSION_ID": sid},
            )

    async def check_image(self) -> None:
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

    async def remove_workspace(self, sid: str) -> None:
        await self.runner.remove_workspace(self.config.sessions_path / sid)

    async def _get(self, session: Session, path: str, timeout: float) -> tuple[int, bytes]:
        """GET ``path`` from the session's own server, with its password."""
        async with self.http.get(
            f"http://127.0.0.1:{session.port}{path}",
            headers={"Authorization": self.env.basic_auth(session.id)},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            return r.status, await r.read()

    async def probe(self, session: Session, timeout: float = 0.3) -> tuple[bool, str]:
        try:
            status, _ = await self._get(session, self.config.health_path, timeout)
        except (aiohttp.ClientError, TimeoutError) as e:
            return False, type(e).__name__
        return status < 400, f"HTTP {status}"

    async def busy(self, session: Session, timeout: float = 2.0) -> bool:
        """Is OpenCode answering a question right now (its ``GET /session/status``: a chat
        whose status is not "idle")? Made for OpenCode 1.18.33; a server that does not
        answer counts as not busy (the health probes deal with hung servers)."""
        try:
            status, body = await self._get(session, "/session/status", timeout)
            data = json.loads(body) if status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        if not isinstance(data, dict):
            return False
        return any(isinstance(v, dict) and v.get("type") != "idle" for v in data.values())

    async def wait_ready(self, sid: str) -> None:
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
            if checks % 20 == 0 and not await self.container_alive(sid):
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

    async def container_alive(self, sid: str) -> bool:
        return any(c.session_id == sid and c.state == "running" for c in await self.runner.list())


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
