from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from lovd import config
from lovd.metrics import Metrics
from lovd.session.lifecycle import Sessions
from lovd.store import Store
from lovd.web.app import create_app
from lovd.wiring import build_sessions
from tests.fakes import FakeRunner


@dataclass
class Api:
    client: TestClient  # type: ignore[type-arg]
    sessions: Sessions
    runner: FakeRunner
    store: Store


@contextlib.asynccontextmanager
async def open_api(tmp_path: Path, ports: list[int], **settings: Any) -> AsyncIterator[Api]:
    cfg = config.from_mapping(
        {
            "state_dir": str(tmp_path / "state"),
            "runtime_dir": str(tmp_path / "run"),  # secrets and the egress hook stay in the test
            "port_range": f"{min(ports)}-{min(ports) + 200}",
            "ready_timeout": 3,
            **settings,
        }
    )
    cfg.sessions_path.mkdir(parents=True, exist_ok=True)  # exists when a test "restarts"
    store = await Store.open(cfg.db_path)
    runner = FakeRunner()
    http = aiohttp.ClientSession()
    metrics = Metrics()
    sessions = build_sessions(
        cfg, store=store, runner=runner, http=http, metrics=metrics, host_id="h1"
    )
    app = create_app(sessions=sessions, metrics_=metrics, public_url="https://chat.example",
                     max_body=cfg.max_body)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield Api(client, sessions, runner, store)
    finally:
        await sessions.drain()
        await client.close()
        await runner.close()
        await http.close()
        await store.close()


@pytest.fixture
def free_ports(unused_tcp_port_factory: Callable[[], int]) -> list[int]:
    return [unused_tcp_port_factory() for _ in range(8)]


@pytest.fixture
async def api(tmp_path: Path, free_ports: list[int]) -> AsyncIterator[Api]:
    async with open_api(tmp_path, free_ports) as a:
        yield a
