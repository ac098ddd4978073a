from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from lovd.config import Config
from lovd.session.launcher import SessionEnv
from lovd.session.lifecycle import Sessions
from lovd.store import Store
from lovd.web.app import HealthCheck
from lovd.wiring import Host
from tests.fakes import FakeRunner
from tests.stack import Clock, open_stack, settings_merged


@dataclass
class Api:
    client: TestClient  # type: ignore[type-arg]
    sessions: Sessions
    runner: FakeRunner
    store: Store
    config: Config
    env: SessionEnv
    clock: Clock
    host: Host


def unit_settings(tmp_path: Path, ports: list[int], **settings: Any) -> dict[str, Any]:
    """A unit harness's lovd: in tmp_path, on free ports, without Caddy."""
    return settings_merged(
        {
            "state_dir": str(tmp_path / "state"),
            "runtime_dir": str(tmp_path / "run"),  # secrets and the egress hook stay in the test
            "port_range": f"{min(ports)}-{min(ports) + 200}",
            "ready_timeout": 3,
            "public_url": "https://chat.example",
            "caddy": {"admin": ""},
        },
        settings,
    )


@contextlib.asynccontextmanager
async def open_api(
    tmp_path: Path,
    ports: list[int],
    *,
    reconcile_hold: float | None = None,
    health_checks: Mapping[str, HealthCheck] | None = None,
    version: str = "test",
    **settings: Any,
) -> AsyncIterator[Api]:
    """The API app on a test server; ``reconcile_hold``: as for the daemon, requests about
    sessions wait for a start-up reconcile the test reports into (``host.ready``)."""
    runner = FakeRunner()
    clock = Clock()
    try:
        async with (
            open_stack(
                unit_settings(tmp_path, ports, **settings),
                runner=lambda _: runner,
                clock=clock,
                reconcile_hold=reconcile_hold,
                health_checks=health_checks,
                version=version,
            ) as host,
            TestClient(TestServer(host.app)) as client,
        ):
            yield Api(client, host.sessions, runner, host.store, host.config, host.env, clock, host)
    finally:
        await runner.close()


@pytest.fixture
def free_ports(unused_tcp_port_factory: Callable[[], int]) -> list[int]:
    return [unused_tcp_port_factory() for _ in range(8)]


@pytest.fixture
async def api(tmp_path: Path, free_ports: list[int]) -> AsyncIterator[Api]:
    async with open_api(tmp_path, free_ports) as a:
        yield a
