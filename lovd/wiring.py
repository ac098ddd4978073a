"""Builds the session services from config, for the daemon and the test harnesses alike
(one wiring, so a harness tests what ``lovd serve`` runs)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import aiohttp

from lovd.config import Config
from lovd.metrics import Metrics
from lovd.runner import Runner
from lovd.session.launcher import SessionEnv, load_host_key
from lovd.session.lifecycle import Sessions
from lovd.store import Store


def build_sessions(
    config: Config,
    *,
    store: Store,
    runner: Runner,
    http: aiohttp.ClientSession,
    metrics: Metrics,
    host_id: str,
    demo_urls: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
) -> Sessions:
    """The sessions service; the host key (container passwords, Caddy's gate key) is
    created in state_dir on first use."""
    env = SessionEnv(config, load_host_key(config.state_path), dict(demo_urls or {}))
    return Sessions(config, store, runner, http, env, metrics, host_id, clock)
