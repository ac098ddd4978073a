"""The one stack-building fixture: lovd as ``lovd serve`` builds it (lovd/wiring.py),
with what a harness replaces passed in (a fake runner, a clock, demo URLs, settings).

Every harness (tests/unit/conftest.py, test_gate.py, test_sync_api.py,
tests/integration/caddy_harness.py, tests/bench/) opens its stack here and serves the
apps it needs itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from lovd import config as config_mod
from lovd.config import Config
from lovd.runner import Runner
from lovd.web.allowlist import Allowlist
from lovd.web.app import HealthCheck
from lovd.wiring import Host, build


class Clock:
    """The sessions' clock, given to the build: real time until a test moves it to a time
    source of its own (``clock.use(lambda: now[0])``)."""

    def __init__(self) -> None:
        self._source: Callable[[], float] = time.time

    def use(self, source: Callable[[], float]) -> None:
        self._source = source

    def __call__(self) -> float:
        return self._source()


def settings_merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; a section given as a dict is merged key by key."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


@contextlib.asynccontextmanager
async def open_stack(
    settings: Mapping[str, Any],
    *,
    runner: Callable[[str], Runner],
    host_id: str = "h1",
    clock: Callable[[], float] = time.time,
    demo_urls: Mapping[str, str] | None = None,
    reconcile_hold: float | None = None,
    allowlist: Allowlist | None = None,
    health_checks: Mapping[str, HealthCheck] | None = None,
    version: str = "test",
) -> AsyncIterator[Host]:
    """Build lovd from ``settings``; on leaving, end its background work and close it.
    The runner is made by ``runner`` from the store's instance id."""
    cfg: Config = config_mod.from_mapping(dict(settings))
    cfg.sessions_path.mkdir(parents=True, exist_ok=True)  # exists when a test "restarts"
    host = await build(
        cfg,
        runner=runner,
        host_id=host_id,
        demo_urls=demo_urls if demo_urls is not None else {},
        clock=clock,
        reconcile_hold=reconcile_hold,
        allowlist=allowlist,
        health_checks=health_checks,
        version=version,
    )
    try:
        yield host
    finally:
        await host.drain()
        if host.caddy is not None:
            await host.caddy.close()
        await host.close()
