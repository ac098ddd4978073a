"""What the relay reports: /api/health, /metrics and lovd doctor read it."""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SyncStatus:
    """What /api/health, /metrics and lovd doctor show about the relay."""

    configured: bool = False
    target: str = ""
    connected: bool = False
    refused: str = ""  # SyncRefused's message while it holds
    last_error: str = ""
    down_since: float | None = None  # wall clock of the first failure of an outage
    last_commit: float | None = None
    epoch: int = 0
    backlog: int = 0
    oldest: float | None = None  # created_at of the oldest unacknowledged outbox row
    rows_applied: int = 0
    batches: int = 0
    lags: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=2000))

    def lag(self, now: float) -> float:
        """Age of the oldest change not yet in PostgreSQL (0: in sync)."""
        return max(0.0, now - self.oldest) if self.oldest is not None else 0.0

    def percentile(self, q: float) -> float:
        if not self.lags:
            return 0.0
        if len(self.lags) == 1:
            return self.lags[0]
        return statistics.quantiles(self.lags, n=100, method="inclusive")[int(q) - 1]

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "configured": self.configured,
            "target": self.target,
            "connected": self.connected,
            "refused": self.refused,
            "last_error": self.last_error,
            "down_seconds": round(now - self.down_since, 3) if self.down_since else 0.0,
            "epoch": self.epoch,
            "backlog": self.backlog,
            "lag_seconds": round(self.lag(now), 3),
            "lag_p50_seconds": round(self.percentile(50), 4),
            "lag_p99_seconds": round(self.percentile(99), 4),
            "rows_applied": self.rows_applied,
            "last_commit": self.last_commit,
        }
