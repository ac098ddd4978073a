"""The one object the daemon and the web app hold for PostgreSQL sync."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lovd.config import Config
from lovd.metrics import Metrics
from lovd.store import Store
from lovd.sync.hosts import Hosts
from lovd.sync.postgres import Relay
from lovd.sync.status import SyncStatus


class _SyncCollector(Collector):
    def __init__(self, status: SyncStatus) -> None:
        self._status = status

    def collect(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        s, now = self._status, time.time()
        return [
            GaugeMetricFamily(
                "lovd_sync_up", "1 while the relay reaches PostgreSQL and may write", s.connected
            ),
            GaugeMetricFamily(
                "lovd_sync_backlog", "Outbox rows not yet applied to PostgreSQL", s.backlog
            ),
            GaugeMetricFamily(
                "lovd_sync_lag_seconds",
                "Age of the oldest change not yet in PostgreSQL (0: in sync)",
                s.lag(now),
            ),
            GaugeMetricFamily(
                "lovd_sync_lag_p99_seconds",
                "99th percentile of change-to-commit time over the last 2000 changes",
                s.percentile(99),
            ),
            CounterMetricFamily(
                "lovd_sync_rows_applied", "Outbox rows applied to PostgreSQL", s.rows_applied
            ),
            GaugeMetricFamily("lovd_sync_epoch", "This host's ownership epoch", s.epoch),
        ]


class Sync:
    def __init__(self, relay: Relay, hosts: Hosts) -> None:
        self.relay = relay
        self.hosts = hosts

    @classmethod
    def create(
        cls, config: Config, store: Store, host_id: str, version: str, metrics: Metrics | None
    ) -> Sync:
        relay = Relay.from_config(config, store, host_id, version)
        hosts = Hosts(
            relay.pool, host_id, config.postgres_read_timeout, config.postgres_host_stale_after
        )
        if metrics is not None:
            metrics.registry.register(_SyncCollector(relay.status))
        return cls(relay, hosts)

    @property
    def host_id(self) -> str:
        return self.relay.host_id

    def start(self) -> None:
        self.relay.start()

    async def close(self) -> None:
        await self.relay.close()

    async def health(self) -> tuple[bool, str]:
        return await self.relay.health()

    def status(self) -> dict[str, Any]:
        return self.relay.status.as_dict(time.time())
