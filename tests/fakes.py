"""A Runner stand-in for fast API tests and fault injection.

It "starts a container" by serving the health path on the session's host port
with a real aiohttp server, so readiness probing is exercised for real. The real
runners are tested against real Podman in tests/integration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from lovd import ids, limits
from lovd.errors import LovdError
from lovd.podman import ContainerInfo, ContainerSpec
from lovd.runner import UnitState
from lovd.session.model import Session, SessionState
from lovd.store import Store


class _Client:
    def __init__(self, runner: FakeRunner) -> None:
        self.runner = runner

    async def list(self, instance_id: str) -> list[ContainerInfo]:
        return await self.runner.list()

    async def remove(self, name: str) -> None:
        sid = name.removeprefix("lovd-")
        await self.runner.stop(sid)

    async def image_exists(self, image: str) -> bool:
        return not self.runner.image_missing

    async def logs(self, name: str, tail: int = 20) -> str:
        return "fake log line"


class FakeRunner:
    name = "fake"

    def __init__(self, health_path: str = "/global/health") -> None:
        self.client = _Client(self)
        self.health_path = health_path
        self.servers: dict[str, web.AppRunner] = {}
        self.secrets: dict[str, bytes] = {}
        self.starts: list[ContainerSpec] = []
        self.fail_start: LovdError | None = None
        self.never_ready = False
        self.image_missing = False
        self.start_delay = 0.0
        self.units: dict[str, UnitState] = {}
        # Sessions whose OpenCode reports a chat in progress (GET /session/status).
        self.busy: set[str] = set()
        # Containers that still run but whose server no longer answers (hung).
        self.hung: set[str] = set()
        self.unit_queries = 0
        # The cgroup controllers this "host" delegates (lovd/limits.py); all by default.
        self.cgroup_limits: frozenset[str] = frozenset(limits.CONTROLLERS)
        # Fault injection (tests/unit/test_state_props.py): per operation ("start", "stop",
        # "list"), the next call fails with this error after hanging this many seconds
        # (a Podman call killed at its deadline, lovd/podman.py communicate).
        self.faults: dict[str, tuple[BaseException, float]] = {}
        # The next this many starts serve no health path (never ready).
        self.unready_starts = 0
        # Starts that found the session's container still there (the real runners pass
        # --replace): lovd started a second container over a live one.
        self.replaced: list[str] = []
        self.start_count = 0

    def fail_next(self, op: str, err: BaseException, after: float = 0.0) -> None:
        """The next call of ``op`` ("start", "stop" or "list") raises ``err``, after
        hanging ``after`` seconds."""
        self.faults[op] = (err, after)

    async def _fault(self, op: str) -> None:
        fault = self.faults.pop(op, None)
        if fault is not None:
            err, after = fault
            await asyncio.sleep(after)
            raise err

    async def vanish(self, session_id: str) -> None:
        """The container is gone without lovd asking (it crashed and --rm removed it, an
        operator's podman rm)."""
        await self._drop(session_id)

    async def start(self, spec: ContainerSpec) -> str:
        ids.check(spec.session_id)
        if self.fail_start:
            raise self.fail_start
        await self._fault("start")
        await asyncio.sleep(self.start_delay)
        if spec.session_id in self.servers or spec.session_id in self.hung:
            self.replaced.append(spec.session_id)  # podman run --replace
            await self._drop(spec.session_id)
        self.start_count += 1
        self.starts.append(spec)
        assert spec.secret_file.is_file()
        self.secrets[spec.session_id] = spec.secret_file.read_bytes()
        app = web.Application()
        unready = self.unready_starts > 0
        self.unready_starts = max(0, self.unready_starts - 1)
        if not (self.never_ready or unready):

            async def health(_: web.Request) -> web.Response:
                return web.json_response({"healthy": True})

            app.router.add_get(self.health_path, health)

            async def status(_: web.Request) -> web.Response:
                kind = "busy" if spec.session_id in self.busy else "idle"
                return web.json_response({"ses_fake": {"type": kind}})

            app.router.add_get("/session/status", status)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", spec.host_port).start()
        self.servers[spec.session_id] = runner
        return f"fake-{spec.session_id}"

    async def hang(self, session_id: str) -> None:
        """The container keeps running, its server stops answering (SIGSTOP)."""
        r = self.servers.pop(session_id, None)
        if r is not None:  # no container, nothing to hang
            self.hung.add(session_id)
            await r.cleanup()

    async def stop(self, session_id: str) -> None:
        await self._fault("stop")
        await self._drop(session_id)

    async def _drop(self, session_id: str) -> None:
        self.hung.discard(session_id)
        r = self.servers.pop(session_id, None)
        if r is not None:
            await r.cleanup()
        self.secrets.pop(session_id, None)

    async def list(self) -> list[ContainerInfo]:
        await self._fault("list")
        return [
            ContainerInfo(f"fake-{sid}", f"lovd-{sid}", sid, "x", "running", 0.0)
            for sid in {*self.servers, *self.hung}
        ]

    async def unit_states(self, session_ids: Sequence[str]) -> dict[str, UnitState]:
        self.unit_queries += 1
        return {sid: self.units[sid] for sid in session_ids if sid in self.units}

    def unit_name(self, session_id: str) -> str:
        return ""

    def enforcement(self, userns: str) -> limits.Enforcement:
        return limits.Enforcement(cgroup=self.cgroup_limits, userns=userns)

    async def remove_workspace(self, path: Path) -> None:
        if path.exists():
            path.rmdir()

    async def close(self) -> None:
        self.faults.clear()
        for sid in list(self.servers):
            await self.stop(sid)


async def force_state(store: Store, sid: str, status: str, **fields: object) -> Session:
    """Put a row in ``status`` through the store's write primitive, outside the transition
    table (lovd itself changes states only through lovd/session/machine.py): for tests of
    the store and the sync relay that need rows in given states."""
    return await store.write(sid, {"status": SessionState(status), **fields})
