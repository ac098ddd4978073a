"""sd_notify(3): readiness, status, stopping and watchdog pings (no-ops without systemd)."""

from __future__ import annotations

import asyncio
import logging
import os

import sdnotify

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n = sdnotify.SystemdNotifier() if self.enabled else None

    def send(self, state: str) -> None:
        if self._n is not None:
            self._n.notify(state)

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self.send(f"STOPPING=1\nSTATUS={status}")

    def watchdog_interval(self) -> float | None:
        """Half of WatchdogSec, as systemd.service(5) recommends; None if not set."""
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", "0"))
            pid = int(os.environ.get("WATCHDOG_PID", str(os.getpid())))
        except ValueError:
            return None
        if usec <= 0 or pid != os.getpid() or not self.enabled:
            return None
        return usec / 2_000_000

    async def watchdog_loop(self, interval: float) -> None:
        # Pinging from the event loop itself means a wedged loop stops the pings,
        # which is exactly what the watchdog should detect.
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)
